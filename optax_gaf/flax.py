"""Microgradients of a Flax model: NNX modules and Linen ``apply`` functions.

Flax is an optional dependency of optax_gaf: this module imports it, and only
this module does (``import optax_gaf`` never needs Flax). Install it with
``pip install "optax_gaf[examples]"`` or ``pip install flax``.

Both helpers split the batch into N microbatches and ``vmap`` the gradient
over them, as :func:`optax_gaf.microbatch_grads` does, and take care of what
a Flax model adds:

* **Batch statistics** (BatchNorm's running mean and variance, and any other
  non-parameter state the loss updates): each microbatch updates its own copy;
  ``batch_stats="mean"`` (the default) keeps their mean (what data-parallel
  workers that average their statistics keep), an int ``k`` keeps microbatch
  k's.
* **Randomness** (Dropout, stochastic depth): every microbatch gets its own
  RNG stream, so the N dropout masks are independent; one shared key would
  correlate the N microgradients and bias the agreement test.
* **Aux outputs** come back per microbatch, with a leading N axis.
"""

import contextlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from optax_gaf import _checks
from optax_gaf._ghost.producer import GhostMicrogradients
from optax_gaf._ghost.producer import NotArraysError
from optax_gaf._ghost.producer import ghost_microgradients
from optax_gaf._microbatching import split_microbatches

try:
  from flax import nnx
  from flax.nnx import graphlib
except ImportError as e:  # pragma: no cover - exercised without flax only
  raise ImportError(
    "optax_gaf.flax needs Flax, an optional dependency: install it with"
    ' pip install "optax_gaf[examples]" (or pip install flax).'
  ) from e

__all__ = ("linen_microgradients", "nnx_microgradients")


def _ghost_flatten(ghost):
  tree = ghost.tree()
  impl = graphlib.get_node_impl(tree)
  if impl is None:  # params a single array
    return [(0, tree)], None
  return impl.flatten(tree)


def _ghost_unflatten(nodes, aux):
  del nodes, aux
  raise NotArraysError(
    "GhostMicrogradients lives inside one traced step: pass it to the"
    " optimizer there, never out of an nnx.jit."
  )


def _register_ghost() -> None:
  """``nnx.state(ghost, wrt)`` gives the ghost's ``tree()`` filtered.

  ``nnx.Optimizer.update(model, ghost)`` filters the gradients with
  ``nnx.state(grads, wrt)`` (NNX's default graph mode); the placeholders
  keep the params' Variable types and paths, and ``gaf`` takes them as the
  ghost restricted to those leaves.
  """
  registry = getattr(graphlib, "PYTREE_REGISTRY", None)
  if registry is None or GhostMicrogradients in registry:
    return
  graphlib.register_pytree_node_type(
    GhostMicrogradients, _ghost_flatten, _ghost_unflatten
  )


_register_ghost()


def _check_batch_stats(batch_stats, n: int):
  """``"mean"`` or an int microbatch index in ``[-n, n)``."""
  if batch_stats == "mean":
    return batch_stats
  if isinstance(batch_stats, bool) or not isinstance(batch_stats, int):
    raise TypeError(
      f'batch_stats must be "mean" or an int microbatch index, got'
      f" {batch_stats!r}."
    )
  if not -n <= batch_stats < n:
    raise ValueError(
      f"batch_stats={batch_stats} is no microbatch of {n}; pass an index in"
      f' [{-n}, {n}) or "mean".'
    )
  return batch_stats


def _reduce_state(tree, batch_stats):
  """Collapses the leading N axis of per-microbatch model state.

  ``"mean"``: floating leaves averaged (a leaf equal in every microbatch is
  kept exactly), other leaves (counters) taken from microbatch 0. An int:
  every leaf taken from that microbatch.
  """

  def reduce(x):
    if batch_stats != "mean":
      return x[batch_stats]
    if not jnp.issubdtype(x.dtype, jnp.inexact):
      return x[0]
    same = jnp.all(x == x[0], axis=0)
    return jnp.where(same, x[0], jnp.mean(x, 0).astype(x.dtype))

  return jax.tree.map(reduce, tree)


def _route(one, n, ghost, params, rngs, batch, state):
  """``one(params, rngs, microbatch, state)``'s gradients per microbatch.

  ``rngs`` (leaves ``[N, ...]``, or None) one a microbatch; ``state``
  shared. Stacked (``vmap``) or, with ``ghost``, the ghost route.
  """
  micro = split_microbatches(batch, n)  # checks the batch on both routes
  if ghost:
    return _ghost_grads(one, n, params, rngs, batch, state)
  in_axes = (None, None if rngs is None else 0, 0, None)
  grad_fn = jax.vmap(jax.value_and_grad(one, has_aux=True), in_axes)
  return grad_fn(params, rngs, micro, state)


def _ghost_grads(one, n, params, rngs, batch, state):
  """``one(params, rngs, microbatch, state)`` through the ghost route.

  ``rngs`` (leaves ``[N, ...]``, one a microbatch) travel in the batch:
  each is repeated over its microbatch's examples, and each microbatch
  takes its first copy. ``state`` is shared.
  """
  size = jax.tree.leaves(batch)[0].shape[0]
  each = jax.tree.map(lambda x: jnp.repeat(x, size // n, axis=0), rngs)

  def loss(params, b, state):
    b, rngs = b
    return one(params, jax.tree.map(lambda x: x[0], rngs), b, state)

  ghost_fn = ghost_microgradients(loss, n, has_aux=True)
  return ghost_fn(params, (batch, each), state)


@contextlib.contextmanager
def _split_streams(model, n: int):
  """``nnx.split_rngs(model, splits=n)`` for streams of any key shape.

  Each stream draws one key (a stack of layers made under ``nnx.vmap`` holds
  ``[L]`` keys: one each) and splits it into ``[N, ...]`` keys with zero
  counts; leaving the block restores the stream, advanced by one draw.
  """
  backups = []
  for _, stream in nnx.iter_graph(model):
    if not isinstance(stream, nnx.RngStream):
      continue
    key, count = stream.key[...], stream.count[...]
    backups.append((stream, key, count + 1))
    flat = jax.vmap(jax.random.fold_in)(key.reshape(-1), count.reshape(-1))
    keys = jax.vmap(lambda k: jax.random.split(k, n))(flat)  # [K, N]
    stream.key.set_value(keys.T.reshape(n, *key.shape))
    stream.count.set_value(jnp.zeros((n, *count.shape), jnp.uint32))
  try:
    yield
  finally:
    for stream, key, count in backups:
      stream.key.set_value(key)
      stream.count.set_value(count)


def _refuse_rngs_args(args):
  for a in args:
    if isinstance(a, nnx.Rngs | nnx.RngStream):
      raise TypeError(
        "An nnx.Rngs passed as an argument would give every microbatch the"
        " same dropout masks. Keep the streams in the model (e.g."
        " nnx.Dropout(rate, rngs=rngs)): nnx_microgradients gives each"
        " microbatch its own."
      )


def nnx_microgradients(
  loss_fn: Callable[..., Any],
  num_microbatches: int,
  *,
  has_aux: bool = False,
  batch_stats: str | int = "mean",
  wrt: Any = None,
  ghost: bool = False,
) -> Callable[..., tuple[Any, Any]]:
  """Per-microbatch losses and gradients of an NNX module, for ``gaf``.

  ``fn(model, batch, *args)`` runs ``loss_fn(model, microbatch, *args)`` on
  each of N microbatches: parameters (``wrt``) shared and differentiated
  per microbatch; every RNG stream split N ways (own dropout masks); other
  state (BatchNorm statistics) reduced by ``batch_stats``. In ``nnx.jit``.

  Args:
    loss_fn: ``loss_fn(model, batch, *args) -> loss`` (or ``(loss, aux)``),
      the mean loss of one microbatch, in the mode the caller set.
    num_microbatches: N; the batch size must be a multiple of it.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
    batch_stats: how the N updated copies of the other state become one:
      ``"mean"`` averages float leaves (BatchNorm's running statistics),
      others from microbatch 0; an int ``k`` takes microbatch k's.
    wrt: an NNX filter of what to differentiate; default ``nnx.Param``.
    ghost: ``grads`` a :class:`optax_gaf.GhostMicrogradients` (no N copies
      of the gradient), for ``nnx.Optimizer.update`` or ``gaf``.

  Returns:
    ``fn(model, batch, *args) -> (losses, grads)`` (``((losses, aux),
    grads)`` with ``has_aux``): ``[N]`` losses, aux and ``nnx.State``
    gradients (or the ghost) with a leading N axis; ``model`` updated.

  Raises:
    TypeError: an ``nnx.Rngs`` in ``args`` (keep streams in the model).
    ValueError: a batch that N does not divide, or a bad ``batch_stats``.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> from flax import nnx
    >>> import optax_gaf.flax
    >>> class Net(nnx.Module):
    ...   def __init__(self, rngs):
    ...     self.linear = nnx.Linear(3, 2, rngs=rngs)
    ...     self.bn = nnx.BatchNorm(2, rngs=rngs)
    ...     self.dropout = nnx.Dropout(0.5, rngs=rngs)
    ...   def __call__(self, x):
    ...     return self.dropout(self.bn(self.linear(x)))
    >>> model = Net(nnx.Rngs(0))
    >>> loss = lambda m, b: jnp.mean((m(b["x"]) - b["y"]) ** 2)
    >>> fn = optax_gaf.flax.nnx_microgradients(loss, 4)
    >>> batch = {"x": jnp.ones((8, 3)), "y": jnp.zeros((8, 2))}
    >>> losses, grads = fn(model, batch)
    >>> losses.shape, grads["linear"]["kernel"].shape
    ((4,), (4, 3, 2))
  """
  n = _checks.num_microbatches(num_microbatches, minimum=1)
  batch_stats = _check_batch_stats(batch_stats, n)
  wrt = nnx.Param if wrt is None else wrt

  def fn(model, batch, *args):
    _refuse_rngs_args(args)
    # Every stream gets [N, ...] keys inside the block (the split State holds
    # the Variables themselves); leaving it advances each stream once.
    with _split_streams(model, n):
      graphdef, params, rngs, rest = nnx.split(model, wrt, nnx.RngState, ...)

      def one(params, rngs, b, rest):
        # copy=True: fresh Variables in this trace, so BatchNorm may update.
        m = nnx.merge(graphdef, params, rngs, rest, copy=True)
        out = loss_fn(m, b, *args)
        loss, aux = out if has_aux else (out, None)
        return loss, (aux, nnx.state(m, wrt, nnx.RngState, ...)[2])

      out, grads = _route(one, n, ghost, params, rngs, batch, rest)
    losses, (aux, new_rest) = out
    nnx.update(model, _reduce_state(new_rest, batch_stats))
    return ((losses, aux) if has_aux else losses), grads

  return fn


def linen_microgradients(
  loss_fn: Callable[..., Any],
  num_microbatches: int,
  *,
  has_aux: bool = False,
  batch_stats: str | int = "mean",
  ghost: bool = False,
) -> Callable[..., tuple[Any, Any, Any]]:
  """Per-microbatch losses and gradients of a Linen model with state.

  For a Linen ``apply`` with mutable collections (BatchNorm's
  ``batch_stats``) and RNGs (Dropout). Without either,
  :func:`optax_gaf.microbatch_grads` is all you need.

  Args:
    loss_fn: ``loss_fn(params, model_state, batch, rng, *args)`` returning
      ``(loss, new_model_state)`` (``(loss, (new_model_state, aux))`` with
      ``has_aux``). ``model_state`` holds the other collections (e.g.
      ``{"batch_stats": ...}``, or ``{}``); typically it calls
      ``apply({"params": params, **model_state}, x, rngs={"dropout": rng},
      mutable=list(model_state))``.
    num_microbatches: N; the batch size must be a multiple of it.
    has_aux: whether ``loss_fn`` also returns ``aux``.
    batch_stats: ``"mean"`` (average the N updated copies of the
      floating-point state) or an int ``k`` (keep microbatch k's).
    ghost: ``grads`` a :class:`optax_gaf.GhostMicrogradients` (no N copies
      of the gradient), for ``TrainState.apply_gradients`` or ``gaf``.

  Returns:
    ``fn(params, model_state, batch, rng, *args) -> (losses, grads,
    new_model_state)`` (``((losses, aux), grads, new_model_state)`` with
    ``has_aux``). ``rng`` is split into N keys, one a microbatch (None
    passes None to every microbatch). ``grads`` leaves are
    ``[N, *param.shape]`` (or the ghost); ``new_model_state`` is reduced.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import flax.linen as nn
    >>> import optax_gaf.flax
    >>> class Net(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x, train):
    ...     x = nn.BatchNorm(use_running_average=not train)(nn.Dense(2)(x))
    ...     return nn.Dropout(0.5, deterministic=not train)(x)
    >>> net = Net()
    >>> variables = net.init(jax.random.key(0), jnp.ones((1, 3)), False)
    >>> def loss(params, state, b, rng):
    ...   out, new_state = net.apply({"params": params, **state}, b["x"], True,
    ...                              rngs={"dropout": rng}, mutable=list(state))
    ...   return jnp.mean((out - b["y"]) ** 2), new_state
    >>> fn = optax_gaf.flax.linen_microgradients(loss, 4)
    >>> batch = {"x": jnp.ones((8, 3)), "y": jnp.zeros((8, 2))}
    >>> state = {"batch_stats": variables["batch_stats"]}
    >>> losses, grads, state = fn(variables["params"], state, batch,
    ...                           jax.random.key(1))
    >>> losses.shape, grads["Dense_0"]["kernel"].shape
    ((4,), (4, 3, 2))
  """
  n = _checks.num_microbatches(num_microbatches, minimum=1)
  batch_stats = _check_batch_stats(batch_stats, n)

  def fn(params, model_state, batch, rng, *args):
    rngs = None if rng is None else jax.random.split(rng, n)

    def one(params, rng, b, model_state):
      loss, out = loss_fn(params, model_state, b, rng, *args)
      new_state, aux = out if has_aux else (out, None)
      return loss, (aux, new_state)

    out, grads = _route(one, n, ghost, params, rngs, batch, model_state)
    losses, (aux, new_state) = out
    new_state = _reduce_state(new_state, batch_stats)
    return ((losses, aux) if has_aux else losses), grads, new_state

  return fn
