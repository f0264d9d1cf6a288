"""``per_microgradient``: a stateless transform of each microgradient."""

import jax
import optax


def _check_stateless(inner, params):
  state = jax.eval_shape(inner.init, params)
  if jax.tree.leaves(state):
    raise ValueError(
      "per_microgradient maps a stateless transformation over the N"
      f" microgradients, but this one keeps state ({type(state).__name__}"
      " with arrays): one state cannot follow N microgradients. Use a"
      " stateless transformation (optax.clip_by_global_norm, optax.clip,"
      " optax.scale, ...), or put this one after gaf, as the"
      " postprocessor of optax_gaf.process."
    )
  return state


def _check_stacked(grads, params):
  """Every leaf has a leading N axis that params lack."""
  leaves = jax.tree.leaves(grads)
  if not leaves:
    return
  if any(jax.numpy.ndim(g) < 1 for g in leaves):
    raise ValueError(
      "per_microgradient needs microgradients, every leaf [N, *param.shape];"
      " got a scalar leaf."
    )
  for g, p in zip(leaves, jax.tree.leaves(() if params is None else params)):
    if jax.numpy.shape(g) == jax.numpy.shape(p):
      raise ValueError(
        "per_microgradient got params-shaped gradients, so it sits after"
        " gaf. It transforms each of the N microgradients: put it before"
        " gaf, as the preprocessor of optax_gaf.process (or before gaf in"
        " optax.chain)."
      )
  if len({g.shape[0] for g in leaves}) > 1:
    raise ValueError(
      "per_microgradient: the leaves disagree on N (their leading axis):"
      f" {sorted({g.shape[0] for g in leaves})}."
    )


def per_microgradient(
  inner: optax.GradientTransformation,
) -> optax.GradientTransformationExtraArgs:
  """Applies a stateless transformation to each microgradient on its own.

  A plain transformation before :func:`optax_gaf.gaf` sees the stacked
  ``[N, ...]`` tree as *one* gradient: ``optax.clip_by_global_norm(1.0)``
  there clips the norm of all N microgradients together (four identical
  microgradients of norm 1 come out as an update of norm 0.5). This wrapper
  ``vmap``\\ s ``inner.update`` over the N axis instead, so each microgradient
  is clipped (or scaled, or sign-flipped) by itself before gaf compares them.

  Only stateless transformations can be mapped: one state cannot follow N
  microgradients, so a transformation whose state holds arrays (momentum,
  a step count, an RNG key) is refused at ``init``.

  Args:
    inner: a stateless :class:`optax.GradientTransformation`, e.g.
      ``optax.clip_by_global_norm(1.0)``. Extra arguments (``value=``) reach
      it unmapped.

  Returns:
    A transformation of microgradients (every leaf ``[N, *param.shape]``) to
    microgradients of the same shapes: the preprocessor of
    :func:`optax_gaf.process`, or a stage before gaf in ``optax.chain``.

  Raises:
    ValueError: at ``init`` for a stateful ``inner``; at ``update`` for
      params-shaped gradients (it was placed after gaf) or leaves that
      disagree on N.

  Examples:
    >>> import jax.numpy as jnp, optax, optax_gaf
    >>> clip = optax_gaf.per_microgradient(optax.clip_by_global_norm(1.0))
    >>> tx = optax_gaf.process(clip, optax_gaf.gaf(2.0), optax.sgd(-1.0))
    >>> params = jnp.zeros(2)
    >>> state = tx.init(params)
    >>> grads = jnp.array([[3.0, 4.0], [0.0, 0.5]])  # norms 5 and 0.5
    >>> updates, state = tx.update(grads, state, params)
    >>> updates  # the mean of [0.6, 0.8] and [0, 0.5]
    Array([0.3 , 0.65], dtype=float32)
  """
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    return _check_stateless(inner, params)

  def update_fn(updates, state, params=None, **extra_args):
    _check_stacked(updates, params)

    def one(g):
      return inner.update(g, state, params, **extra_args)[0]

    return jax.vmap(one)(updates), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
