"""The embedding lookup ``table[ids]``: a layer kind of its own.

Its microgradient is a scatter-add of the output gradients ``d_ns`` into the
rows ``ids_ns``, so ``<g_n, g_m> = sum_{s,t} [ids_ns == ids_mt] (d_ns .
d_mt)`` over the ids whose gradient autodiff keeps. Which ids those are is
the gather's mode, as autodiff's transpose (a scatter-add of the same mode)
has it:

- ``clip``: an id past the table reads, and is differentiated at, the
  nearest row;
- ``fill`` (``FILL_OR_DROP``): an id past the table reads nothing and gets no
  gradient;
- ``promise_in_bounds`` (``table[ids]``'s): an id past the table reads the
  nearest row, but the scatter drops its gradient.

Other gathers (``ONE_HOT``, ``unique_indices=True``, slices that are not
whole rows) are :class:`~optax_gaf._ghost.layers.Opaque`.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp

from optax_gaf import _gram
from optax_gaf._ghost import layers
from optax_gaf._ghost import numerics

_MODES = jax.lax.GatherScatterMode
# Whether an id past the table is dropped from the gradient, per mode.
_DROPS = {
  _MODES.CLIP: False,
  _MODES.FILL_OR_DROP: True,
  _MODES.PROMISE_IN_BOUNDS: True,
}


def is_embedding_lookup(op: layers.LinearOp) -> bool:
  """Whether a gather is ``table[ids]``: whole rows of the parameter."""
  dn = op.params["dimension_numbers"]
  table = op.operand.shape
  out_rank = len(op.out.shape)
  return (
    op.param_pos == 0
    and tuple(dn.collapsed_slice_dims) == (0,)
    and tuple(dn.start_index_map) == (0,)
    and not dn.operand_batching_dims
    and tuple(op.params["slice_sizes"]) == (1, *table[1:])
    and tuple(dn.offset_dims)
    == tuple(range(out_rank - len(table) + 1, out_rank))
    and op.ins[1].shape[-1] == 1
  )


@layers.register("gather", operands=(0,))
@dataclasses.dataclass(frozen=True, eq=False)
class Embedding(layers.Layer):
  """An embedding lookup ``table[ids]``; other gathers are Opaque.

  Its microgradients are formed by ``jax.vjp`` (a scatter-add per example).

  Attributes:
    lookups: the ids looked up per microbatch.
    drops: whether an id past the table gets no gradient (``fill``,
      ``promise_in_bounds``); else it is clipped to the table (``clip``).
  """

  lookups: int
  drops: bool

  @classmethod
  def from_op(cls, op):
    mode = op.params["mode"]
    if (
      not is_embedding_lookup(op)
      or mode not in _DROPS
      or op.params["unique_indices"]
    ):
      return None
    return cls(
      op.operand,
      op.out,
      op.apply,
      lookups=math.prod(op.ins[1].shape[:-1]),
      drops=_DROPS[mode],
    )

  def costs(self, n):
    width = math.prod(self.operand.shape[1:])
    p = math.prod(self.operand.shape)
    ghost = (n * self.lookups) ** 2 * width
    return ghost, n * self.lookups * width + n * n * p

  def _ids(self, others, n):
    """``([N, L] ids in the table, [N, L] whether autodiff keeps them)``."""
    ids = others[0][..., 0].reshape(n, -1)
    rows = self.operand.shape[0]
    if self.drops:
      valid = (ids >= 0) & (ids < rows)
    else:
      valid = jnp.ones(ids.shape, bool)
    return jnp.clip(ids, 0, rows - 1), valid

  def ghost_gram(self, others, d, dtype, factors=None):
    """``sum_{s,t} [ids_ns == ids_mt] (d_ns . d_mt)`` over kept ids."""
    n = d.shape[0]
    ids, valid = self._ids(others, n)
    d, e = numerics.scaled(d.reshape(n, ids.shape[1], -1), dtype)
    d = jnp.where(valid[..., None], d, 0)
    flat = d.reshape(n * ids.shape[1], -1)
    dd = jnp.matmul(
      flat, flat.T, precision=_gram.PRECISION, preferred_element_type=dtype
    )
    dd = dd.reshape(n, ids.shape[1], n, -1)
    same = ids[:, :, None, None] == ids[None, None, :, :]
    gram = jnp.sum(jnp.where(same, dd, 0), axis=(1, 3))
    b = jnp.sum(jnp.square(d.astype(dtype)), axis=(1, 2))  # sum ||d_ns||^2

    def row(k):  # microgradient k as a table, against every microbatch
      g = jnp.zeros((self.operand.shape[0], d.shape[-1]), dtype)
      g = g.at[ids[k]].add(d[k].astype(dtype))
      r = jnp.einsum(
        "mtj,mtj->m",
        g[ids],
        d,
        precision=_gram.PRECISION,
        preferred_element_type=dtype,
      )
      return r.at[k].set(jnp.sum(g * g))

    gram = numerics.with_exact_rows(gram, numerics.flagged(gram, b), row)
    return numerics.finish(gram, e, factors)
