"""The running-aggregate rules and their engine: streams, blocks, guards.

``sequential`` and ``pairwise`` compare each microgradient only with the
running aggregate of those accepted before it. One engine serves them all:

* :func:`stream_decisions` replays the stream on a Gram matrix (the Gram
  route: the rules themselves);
* :func:`absorb` folds a block of microgradients into a :class:`Carry`, with
  one small Gram matrix for the in-block comparisons and one dot product per
  microgradient with the aggregate carried in: :func:`filter_blocks` walks
  stacked microgradients in blocks of :data:`BLOCK_SIZE` (``O(NP)``, no
  ``N x N`` matrix; ``gaf`` takes it on one device for N above one block),
  and ``_streaming.py`` folds one microgradient at a time;
* :func:`finish_guarded` refuses a step whose running sums could overflow.
"""

from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp

from optax_gaf import _combine
from optax_gaf import _gram
from optax_gaf import _rules


class StreamResult(NamedTuple):
  """The outcome of :func:`stream_decisions` (see there)."""

  alpha: jax.Array
  w: jax.Array
  sq_norm: jax.Array
  has_anchor: jax.Array
  taken: jax.Array
  agreed: jax.Array
  cosine_distance: jax.Array


def stream_decisions(
  gram, usable, tau, shrink, cross=None, sq_norm=0.0, has_anchor=False
) -> StreamResult:
  """Streams microgradients in order against a running aggregate.

  The aggregate is ``A = alpha * C + sum_j w_j g_j``, where ``C`` is an
  aggregate carried in from earlier microgradients (none by default), so
  ``<g_j, A> = alpha * <g_j, C> + G[j] @ w`` and ``||A||^2`` is updated
  incrementally. On acceptance ``A <- shrink * (A + g_j)``: ``shrink=1`` is
  the running sum (its direction is the running mean's), ``shrink=1/2`` the
  pairwise average. The Gram route is one call with nothing carried in; the
  block route calls it once per block.

  Args:
    gram: ``[B, B]`` sanitized Gram matrix of these microgradients.
    usable: ``[B]`` bool.
    tau: the threshold.
    shrink: 1 or 1/2, as above.
    cross: ``[B]`` float32 ``<g_j, C>`` (zero for unusable ones), or None.
    sq_norm: ``||C||^2``.
    has_anchor: whether ``C`` holds an anchor already.

  Returns:
    The aggregate's coefficients and state after the stream, and per
    microgradient whether it was taken (anchor or agreed), agreed, and its
    distance (0 for the anchor, NaN when unusable).
  """
  n, dtype = gram.shape[-1], gram.dtype
  if cross is None:
    cross = jnp.zeros([n], dtype)

  def step(carry, xs):
    alpha, w, sq, has = carry
    j, row, cross_j, sq_j, ok = xs
    dot = alpha * cross_j + jnp.dot(row, w, precision=_gram.PRECISION)
    dist = _rules.cosine_distance(dot, sq_j, sq)
    is_anchor = ok & ~has
    agrees = ok & has & _rules.within_tau(dist, tau)
    e_j = jax.nn.one_hot(j, n, dtype=dtype)
    alpha = jnp.where(agrees, shrink * alpha, alpha)
    w = jnp.where(is_anchor, e_j, jnp.where(agrees, shrink * (w + e_j), w))
    sq = jnp.where(
      is_anchor,
      sq_j,
      jnp.where(agrees, shrink**2 * (sq + 2 * dot + sq_j), sq),
    )
    dist = jnp.where(is_anchor, 0.0, jnp.where(ok, dist, jnp.nan))
    return (alpha, w, sq, has | ok), (is_anchor | agrees, agrees, dist)

  # From the Gram matrix: inside shard_map it varies as the matrix does.
  zero = jnp.zeros_like(gram[0, 0])
  init = (
    zero + 1,
    jnp.zeros_like(gram[0]),
    zero + jnp.asarray(sq_norm, dtype),
    (zero == 0) & jnp.asarray(has_anchor, bool),
  )
  xs = (jnp.arange(n), gram, cross, jnp.diagonal(gram), usable)
  (alpha, w, sq, has), (taken, agreed, dist) = jax.lax.scan(step, init, xs)
  return StreamResult(alpha, w, sq, has, taken, agreed, dist.astype(dtype))


def running_output(w, taken, agreed, dist, shrink) -> _rules.RuleOutput:
  """The :class:`RuleOutput` of a finished stream with coefficients ``w``.

  On a no-agreement step only the anchor stays marked. The running sum's
  coefficients are 1 on the taken ones, so ``shrink=1`` divides by their
  number; the pairwise average's are the weights already.
  """
  ready = jnp.any(agreed)
  accepted = jnp.where(ready, taken, taken & ~agreed)
  norm = jnp.maximum(jnp.sum(w), 1.0) if shrink == 1.0 else 1.0
  weights = jnp.where(ready, w / norm, 0.0)
  return _rules.RuleOutput(weights, ready, accepted, dist)


def sequential(gram, usable, tau) -> _rules.RuleOutput:
  """The paper's Algorithm 1 against the running mean of accepted ones.

  The first usable microgradient is the anchor; each later one is accepted iff
  its cosine distance to the mean of those accepted so far is ``<= tau`` (up
  to rounding: ``within_tau``). The
  output weights are ``1/k`` on the ``k`` accepted microgradients.
  """
  s = stream_decisions(gram, usable, tau, 1.0)
  return running_output(s.w, s.taken, s.agreed, s.cosine_distance, 1.0)


def pairwise(gram, usable, tau) -> _rules.RuleOutput:
  """The authors' package ``step_GAF``: on agreement ``G <- (G + g_i) / 2``.

  Earlier microgradients' weights halve with each later acceptance.
  """
  s = stream_decisions(gram, usable, tau, 0.5)
  return running_output(s.w, s.taken, s.agreed, s.cosine_distance, 0.5)


# The running-aggregate rules and their shrink factor: they compare each
# microgradient only with the aggregate of those before it, so they can take
# the O(NP) block route and stream.
SHRINK: dict[Any, float] = {sequential: 1.0, pairwise: 0.5}


def shrink_of(rule: Any) -> float | None:
  """The shrink factor of a running-aggregate rule function, else None."""
  try:
    return SHRINK.get(rule)
  except TypeError:  # an unhashable callable is no built-in rule
    return None


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
  s = stream_decisions(
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
) -> tuple[list, _rules.RuleOutput, jax.Array]:
  """The update leaves, the decisions and the gradient diversity.

  ``carry.sq_norms`` tells whether the float range held (see
  :func:`optax_gaf._gram.in_safe_range`).
  """
  out = running_output(
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


def finish_guarded(carry, shrink: float, dtypes):
  """:func:`finish`, a no-agreement step where sums may overflow.

  Nothing here rescales: the running sums of N microgradients reach ``N^2``
  times their squared norms, so these must stay below
  :func:`optax_gaf._gram.sum_limit` (float32: norms below about
  ``1.3e19 / N``). Beyond it later distances would read as 1: the step is
  refused.
  """
  updates, out, diversity = finish(carry, shrink, dtypes)
  sq = jnp.where(jnp.isfinite(carry.sq_norms), carry.sq_norms, 0.0)
  ok = jnp.max(sq) <= _gram.sum_limit(sq.dtype, sq.shape[-1])
  out = out._replace(
    weights=jnp.where(ok, out.weights, 0.0),
    ready=out.ready & ok,
    accepted=jnp.where(ok, out.accepted, out.accepted & ~carry.agreed),
  )
  updates = [jnp.where(ok, u, jnp.zeros((), u.dtype)) for u in updates]
  return updates, out, diversity


def by_blocks(placement, tau, shrink: float, fallback):
  """O(NP) without the Gram matrix; ``fallback()`` where norms leave range.

  Args:
    placement: a bound local placement (its leaves are ``[N, ...]``).
    tau: the threshold.
    shrink: the rule's (:func:`shrink_of`).
    fallback: ``() -> (updates, RuleOutput, diversity)``, the Gram route.
  """
  leaves = placement.leaves
  carry = filter_blocks(leaves, tau, shrink)
  dtypes = [x.dtype for x in leaves]
  return jax.lax.cond(
    _gram.in_safe_range(carry.sq_norms),
    lambda: finish(carry, shrink, dtypes),
    fallback,
  )
