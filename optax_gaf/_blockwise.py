"""The block route: running-aggregate rules in O(NP), without the Gram matrix.

``sequential`` and ``pairwise`` compare each microgradient only with the
running aggregate of those accepted before it. So instead of the ``N x N`` Gram
matrix (``2 N^2 P`` flops) they need ``N`` dot products with a materialized
aggregate (``O(N P)``). One kernel, :func:`absorb`, folds a block of
microgradients into a :class:`Carry`:

* :func:`filter_blocks` walks stacked microgradients (leaves ``[N, ...]``, the
  ``vmap`` path) in blocks of :data:`BLOCK_SIZE`: one small Gram matrix per
  block for the in-block comparisons, one dot product per microgradient with
  the aggregate carried in from earlier blocks, one pass to fold the block in.
  ``gaf()`` takes this route on one device for N above one block.
* ``_streaming.py`` folds one microgradient at a time (blocks of one), so the
  N microgradients never sit in memory together.
"""

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from optax_gaf import _combine
from optax_gaf import _gram
from optax_gaf import rules

# Microgradients per block on the vmap path: up to 16 one Gram matrix is
# cheapest, beyond it blocks of 16 (measured with benchmarks/block_size.py).
BLOCK_SIZE = 16


class Carry(NamedTuple):
  """The running aggregate after some microgradients (Gram-dtype leaves)."""

  aggregate: list | None  # running sum (sequential) or average (pairwise)
  total: list | None  # sum of all usable microgradients (for diversity)
  agg_sq_norm: jax.Array
  has_anchor: jax.Array
  weights: jax.Array  # [N]: aggregate = sum_i weights[i] g_i
  taken: jax.Array  # [N]: anchor or agreed
  agreed: jax.Array  # [N]
  distance: jax.Array  # [N]
  sq_norms: jax.Array  # [N]: ||g_i||^2 as computed (NaN, inf or 0 included)
  sum_sq_norms: jax.Array


def init_carry(
  shapes: Sequence[tuple[int, ...]] | None, n: int, dtype=jnp.float32
) -> Carry:
  """An empty carry for N microgradients; ``shapes=None`` defers the leaves."""
  aggregate = None
  if shapes is not None:
    aggregate = [jnp.zeros(shape, dtype) for shape in shapes]
  zeros = jnp.zeros([n], dtype)
  return Carry(
    aggregate=aggregate,
    total=aggregate,
    agg_sq_norm=jnp.zeros([], dtype),
    has_anchor=jnp.zeros([], bool),
    weights=zeros,
    taken=jnp.zeros([n], bool),
    agreed=jnp.zeros([n], bool),
    distance=zeros,
    sq_norms=zeros,
    sum_sq_norms=jnp.zeros([], dtype),
  )


def _dot_with(x: jax.Array, y: jax.Array) -> jax.Array:
  """``<x_i, y>`` for ``x [B, ...]`` and ``y [...]``, ``[B]`` in y's dtype.

  A fused multiply and sum, not a matrix-vector product: XLA's CPU matvec
  accumulates in one long float32 chain (1,300 ulps off at 4e6 entries),
  which would make exact copies disagree at ``tau=0``; the reduction is
  accurate to an ulp or so.
  """
  flat = x.reshape(x.shape[0], -1).astype(y.dtype)
  return jnp.sum(flat * y.reshape(-1), axis=1)


def absorb(
  carry: Carry, block: Sequence[jax.Array], offset, tau, shrink: float
) -> Carry:
  """Compares microgradients ``block`` (leaves ``[B, ...]``) in order.

  They sit at positions ``offset .. offset + B - 1``. Within the block the
  aggregate is ``alpha * carried + sum_j w_j x_j``, so the dot product of
  ``x_j`` with it is ``alpha * <x_j, carried> + (G_block w)_j``: one ``B x B``
  Gram matrix and ``B`` dot products with the carried aggregate, then one pass
  to fold the block in.
  """
  raw = _gram.gram(block)
  gram, ok = _gram.sanitized(raw)
  cross = None
  if carry.aggregate is not None:
    cross = sum(_dot_with(x, a) for x, a in zip(block, carry.aggregate))
    cross = jnp.where(ok, cross, 0.0)
  s = rules.stream_decisions(
    gram, ok, tau, shrink, cross, carry.agg_sq_norm, carry.has_anchor
  )
  rows = jnp.stack([s.w, ok.astype(s.w.dtype)])
  folded = [_combine.masked_tensordot(rows, x, ok) for x in block]
  if carry.aggregate is None:
    aggregate = [f[0] for f in folded]
    total = [f[1] for f in folded]
  else:
    aggregate = [s.alpha * a + f[0] for a, f in zip(carry.aggregate, folded)]
    total = [t + f[1] for t, f in zip(carry.total, folded)]

  def put(vec, new):
    return jax.lax.dynamic_update_slice(vec, new.astype(vec.dtype), (offset,))

  return Carry(
    aggregate=aggregate,
    total=total,
    agg_sq_norm=s.sq_norm,
    has_anchor=s.has_anchor,
    weights=put(s.alpha * carry.weights, s.w),
    taken=put(carry.taken, s.taken),
    agreed=put(carry.agreed, s.agreed),
    distance=put(carry.distance, s.cosine_distance),
    sq_norms=put(carry.sq_norms, jnp.diagonal(raw)),
    sum_sq_norms=carry.sum_sq_norms + jnp.sum(jnp.diagonal(gram)),
  )


def finish(
  carry: Carry, shrink: float, dtypes
) -> tuple[list, rules.RuleOutput, jax.Array]:
  """The update leaves, the decisions and the gradient diversity.

  ``carry.sq_norms`` tells whether the float range held (see
  :func:`optax_gaf._gram.in_safe_range`).
  """
  out = rules.running_output(
    carry.weights, carry.taken, carry.agreed, carry.distance, shrink
  )
  # The update's weights over the aggregate's: 1/k, 1, or 0 if not ready.
  scale = jnp.where(
    out.ready,
    1.0 / jnp.maximum(jnp.sum(carry.weights), 1.0) if shrink == 1.0 else 1.0,
    0.0,
  )
  updates = [(scale * a).astype(dt) for a, dt in zip(carry.aggregate, dtypes)]
  sq_norm_of_sum = sum(jnp.sum(jnp.square(t)) for t in carry.total)
  return updates, out, _gram.diversity(carry.sum_sq_norms, sq_norm_of_sum)


def filter_blocks(
  leaves: Sequence[jax.Array],
  tau,
  shrink: float,
  block_size: int = BLOCK_SIZE,
) -> Carry:
  """A running-aggregate rule on stacked microgradients, block by block.

  Args:
    leaves: arrays ``[N, ...]``.
    tau: the cosine distance threshold (a scalar, possibly traced).
    shrink: 1 (``sequential``) or 1/2 (``pairwise``).
    block_size: microgradients per block; ``>= N`` is one Gram matrix of all
      N, 1 a pure stream.

  Returns:
    The final :class:`Carry`; :func:`finish` turns it into the update, with
    the same decisions as the rule on the whole Gram matrix.
  """
  if block_size < 1:
    raise ValueError(f"block_size must be positive; got {block_size}.")
  n = leaves[0].shape[0]
  b = min(n, block_size)
  # The first block starts the aggregate; whole blocks follow in a scan (so
  # the program does not grow with N), then the remainder.
  empty = init_carry(None, n, _gram.stat_dtype(leaves))
  carry = absorb(empty, [x[:b] for x in leaves], 0, tau, shrink)
  m = (n - b) // b
  if m:
    blocks = [x[b : b + m * b].reshape((m, b) + x.shape[1:]) for x in leaves]

    def body(carry, xs):
      k, block = xs
      return absorb(carry, block, b + k * b, tau, shrink), None

    carry, _ = jax.lax.scan(body, carry, (jnp.arange(m), blocks))
  if b + m * b < n:
    rest = [x[b + m * b :] for x in leaves]
    carry = absorb(carry, rest, b + m * b, tau, shrink)
  return carry
