"""One vmapped forward and backward pass that captures every layer.

``trace.run`` evaluates the loss of each microbatch with a zero perturbation
on each layer's output (its gradient is the layer's output gradient ``d``)
and returns the layers' inputs. Autodiff gives the other leaves' gradients:
N copies of each direct leaf (and of each residual that may differ per
microbatch), one copy of each residual that no microbatch changes.
Everything here also runs inside ``jax.shard_map`` (per-device gradients)
and under Explicit mesh axes (captures sharded as the microbatches).
"""

import jax
import jax.numpy as jnp
import numpy as np

from optax_gaf._ghost import layers
from optax_gaf._ghost import trace


def static_args(loss_fn, args):
  """``(fn, arrays)``: ``loss_fn`` with the non-array leaves of ``args``
  (Python bools, numbers, callables) closed over, as ``microbatch_grads``
  passes them, and the array leaves as its trailing arguments."""
  leaves, tree = jax.tree.flatten(args)
  arrays = [
    i
    for i, x in enumerate(leaves)
    if isinstance(x, jax.Array | np.ndarray | np.generic)
  ]

  def fn(params, batch, *dynamic):
    full = list(leaves)
    for i, x in zip(arrays, dynamic):
      full[i] = x
    return loss_fn(params, batch, *tree.unflatten(full))

  return fn, [leaves[i] for i in arrays]


def _run_loss(plan, has_aux, full, mb, args, zs, originals):
  """``(loss, (value, captures))`` of one microbatch, through ``trace.run``."""
  flat = list(full) + jax.tree.leaves(mb) + list(args)
  outs, caps = trace.run(plan, flat, zs, originals)
  value = plan.out_tree.unflatten(outs)
  return (value[0] if has_aux else value), (value, caps)


def _with(leaves, index, values) -> list:
  full = list(leaves)
  for i, x in zip(index, values):
    full[i] = x
  return full


def residual_leaves(plan, params, one, args, has_aux) -> tuple[list, list]:
  """``(per microbatch, shared)``: the residual sites' leaves, split by
  whether their residual may differ between microbatches (an L2 term's
  does not: it is taken once)."""
  index = [s.leaf for s in plan.sites if s.residual]
  if not index:
    return [], []
  leaves, one_leaves = jax.tree.leaves(params), jax.tree.leaves(one)
  n_p, n_mb = len(leaves), len(one_leaves)
  zs = [jnp.zeros(s.layer.out.shape, s.layer.out.dtype) for s in plan.sites]

  def residuals(*xs):
    flat, rest = list(xs[:n_p]), xs[n_p + n_mb :]
    mb = jax.tree.unflatten(jax.tree.structure(one), xs[n_p : n_p + n_mb])
    loss = lambda c: _run_loss(
      plan, has_aux, _with(flat, index, c), mb, rest, zs, flat
    )[0]
    return jax.grad(loss)([flat[i] for i in index])

  tainted = [False] * n_p + [True] * n_mb + [False] * len(args)
  deps = trace.data_dependent(residuals, (*leaves, *one_leaves, *args), tainted)
  per = [i for i, dep in zip(index, deps) if dep]
  return per, [i for i, dep in zip(index, deps) if not dep]


def capture(plan, n, params, micro, args, has_aux, residual):
  """One vmapped forward and backward: losses, aux and the layer captures.

  ``residual`` is ``(per microbatch, shared)`` from :func:`residual_leaves`.
  Returns ``(value, captures, ds, grads)``, ``grads`` mapping each direct and
  residual leaf to its gradient (``[N, ...]``, or ``[...]`` when shared).
  """
  leaves = jax.tree.leaves(params)
  batched, shared = list(plan.direct) + residual[0], residual[1]
  stacked = [
    jnp.broadcast_to(leaves[i], (n, *leaves[i].shape)) for i in batched
  ]
  outs = [s.layer.out for s in plan.sites]
  zs = [jnp.zeros((n, *o.shape), o.dtype) for o in outs]
  stacked, zs = _shard_like(stacked, micro), _shard_like(zs, micro)
  # Inside shard_map: per-device gradients, not their psum over devices.
  axes = _micro_axes(micro)
  stacked = [layers.varying(x, axes) for x in stacked]
  once = [layers.varying(leaves[i], axes) for i in shared]
  zs = [layers.varying(z, axes) for z in zs]
  originals = leaves if residual[0] or shared else None
  arg_leaves = jax.tree.leaves(args)

  def one(direct, once, z, mb):
    full = _with(_with(leaves, batched, direct), shared, once)
    return _run_loss(plan, has_aux, full, mb, arg_leaves, z, originals)

  def total(direct, once, z):
    losses, rest = jax.vmap(one, in_axes=(0, None, 0, 0))(
      direct, once, z, micro
    )
    return jnp.sum(losses), rest

  grad = jax.grad(total, argnums=(0, 1, 2), has_aux=True)
  (direct, once, ds), (value, caps) = grad(stacked, once, zs)
  grads = dict(zip(batched, direct))
  # The same residual in every microbatch: their sum over N, divided.
  grads.update((i, g / n) for i, g in zip(shared, once))
  return value, caps, ds, grads


def _micro_axes(micro) -> frozenset:
  """The manual axes the microbatches vary over (inside shard_map)."""
  return frozenset().union(*map(layers.varying_axes, jax.tree.leaves(micro)))


def traced_like(params, micro):
  """``(params, one microbatch)`` to trace the loss with.

  Inside shard_map the params vary as the microbatches do (each device's
  gradients are its own) and the loss is traced with varying values.
  """
  axes = _micro_axes(micro)
  if axes:
    params = jax.tree.map(lambda x: layers.varying(x, axes), params)
    return params, jax.tree.map(lambda x: x[0], micro)
  shape = lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype)
  return params, jax.tree.map(shape, micro)


def _batch_axis(micro):
  """The Explicit mesh axes the microbatches are sharded over, or None."""
  spec = getattr(jax.typeof(jax.tree.leaves(micro)[0]).sharding, "spec", ())
  return spec[0] if spec else None


def _shard_like(arrays, micro):
  """With Explicit mesh axes vmap needs N sharded as the microbatches are."""
  axis = _batch_axis(micro)
  if axis is None:
    return arrays
  out = jax.sharding.PartitionSpec(axis)
  return [jax.sharding.reshard(x, out) for x in arrays]


def gathered(tree, micro):
  """Captures sharded over Explicit axes, gathered for the Gram matrix."""
  if _batch_axis(micro) is None:
    return tree
  spec = jax.sharding.PartitionSpec()
  return jax.tree.map(lambda x: jax.sharding.reshard(x, spec), tree)
