"""Stage 1: the Gram matrix of the microgradients, safe from float range.

Every microgradient is a pytree whose leaves carry a leading axis of size N.
Stage 1 reduces them to the ``N x N`` Gram matrix of inner products. The
array functions here know nothing about rules or devices: the placements call
them on whatever part of the microgradients a device holds, and
:func:`safe_gram` asks a placement for the matrix, rescaled on the rare step
whose norms leave the float range. Stage 3, the weighted sum, is
``_combine.py``.
"""

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

# Inner products are accumulated in float32 at full precision, whatever the
# gradient dtype: bf16 x bf16 products are exact in float32, and TPU default
# precision would otherwise round the Gram matrix to bf16 passes.
PRECISION = jax.lax.Precision.HIGHEST

# Squared norms inside [tiny**0.625, max**0.78] (float32: about 1e-24 to
# 1e30) leave every Gram entry far from under- and overflow; the rules' sums
# of up to N^2 of them also need N^2 * norm^2 below max / _SUM_HEADROOM.
_SAFE_POWERS = (0.625, 0.78)
_SUM_HEADROOM = 2.0

# A microgradient whose largest entry is below this fraction of the largest
# one's is rescaled to it for the decisions (see ``rescale_factors``).
SCALE_FLOOR = 1e-12


def stat_dtype(leaves: Sequence[jax.Array]) -> jnp.dtype:
  """float64 if any leaf is float64 (under ``jax_enable_x64``), else float32."""
  dtypes = [getattr(x, "dtype", None) or jnp.result_type(x) for x in leaves]
  wide = any(jnp.dtype(d) == jnp.float64 for d in dtypes)
  return jnp.dtype(jnp.float64 if wide else jnp.float32)


def cross_gram(x: jax.Array, y: jax.Array, dtype=jnp.float32) -> jax.Array:
  """Returns ``<x_i, y_j>`` as an ``[n, m]`` matrix of ``dtype``.

  Args:
    x: ``[n, ...]``.
    y: ``[m, ...]`` with the same trailing size as ``x``.
    dtype: the accumulation and output dtype.
  """
  return jnp.einsum(
    "ip,jp->ij",
    x.reshape(x.shape[0], -1),
    y.reshape(y.shape[0], -1),
    precision=PRECISION,
    preferred_element_type=dtype,
  )


def gram(
  leaves: Sequence[jax.Array], per_leaf: bool = False, factors=None
) -> jax.Array:
  """Gram matrix of the microgradients, without concatenating the leaves.

  Args:
    leaves: arrays ``[N, ...]``, one per parameter tensor.
    per_leaf: if True, return one matrix per leaf, stacked ``[L, N, N]``.
    factors: None, or ``[N]`` (``[L, N]``) factors ``f``: the Gram matrix of
      the ``f_i g_i`` instead (see :func:`rescale_factors`).

  Returns:
    ``[N, N]`` (the whole-pytree inner products), or ``[L, N, N]``, in
    :func:`stat_dtype`.
  """
  dtype = stat_dtype(leaves)
  if factors is not None:
    leaves = scale_leaves(leaves, factors)
  grams = [cross_gram(x, x, dtype) for x in leaves]
  if per_leaf:
    return jnp.stack(grams)
  return sum(grams[1:], grams[0])


def sanitized(gram_matrix: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Finds the usable microgradients and zeroes the others' rows and columns.

  ``||g_i||^2`` is non-finite exactly when ``g_i`` holds a NaN or an inf (or
  overflows float32 when squared), and zero exactly when ``g_i`` is zero.

  Returns:
    ``(gram, usable)``: the matrix with unusable rows and columns zeroed
    (NaN-safe), and the ``[..., N]`` bool mask of usable microgradients.
  """
  sq_norms = jnp.diagonal(gram_matrix, axis1=-2, axis2=-1)
  usable = jnp.isfinite(sq_norms) & (sq_norms > 0)
  both = usable[..., :, None] & usable[..., None, :]
  return jnp.where(both, gram_matrix, 0.0), usable


def diversity(sum_sq_norms: jax.Array, sq_norm_of_sum: jax.Array) -> jax.Array:
  """``sum_i ||g_i||^2 / ||sum_i g_i||^2`` (Yin et al. 2018), float32.

  Infinite when the microgradients sum to zero.
  """
  positive = sq_norm_of_sum > 0
  ratio = sum_sq_norms / jnp.where(positive, sq_norm_of_sum, 1.0)
  return jnp.where(positive, ratio, jnp.inf).astype(jnp.float32)


def gradient_diversity(gram_matrix: jax.Array, factors=None) -> jax.Array:
  """:func:`diversity` from a sanitized Gram matrix ``[N, N]`` or ``[L, N, N]``.

  A stack of per-leaf matrices is summed first (the whole-pytree value).

  Args:
    gram_matrix: the Gram matrix of ``f_i g_i`` (per leaf: ``f_li g_li``).
    factors: None, or the factors ``f`` (``[N]``, or ``[L, N]`` per leaf) of
      :func:`safe_gram`: every entry is brought back to one common scale,
      ``min f``, before the sum (each leaf's own factor would mix scales).
  """
  if factors is not None:
    used = factors > 0
    common = jnp.min(jnp.where(used, factors, jnp.inf))
    common = jnp.where(jnp.isfinite(common), common, 1.0)
    ratio = jnp.where(used, common / jnp.where(used, factors, 1.0), 0.0)
    gram_matrix = gram_matrix * ratio[..., :, None] * ratio[..., None, :]
  if gram_matrix.ndim == 3:
    gram_matrix = jnp.sum(gram_matrix, axis=0)
  return diversity(jnp.trace(gram_matrix), jnp.sum(gram_matrix))


def max_abs(leaves: Sequence[jax.Array]) -> jax.Array:
  """``[L, n]``: the largest ``|entry|`` of each microgradient, per leaf.

  In :func:`stat_dtype`; NaN where a microgradient holds a NaN; 0 for a
  zero-size leaf, which adds nothing to the Gram matrix.
  """
  dtype = stat_dtype(leaves)

  def one(x):
    flat = x.reshape(x.shape[0], -1)
    if flat.shape[1] == 0:  # jnp.max has no identity for an empty axis
      return jnp.zeros([x.shape[0]], dtype)
    return jnp.max(jnp.abs(flat), axis=1).astype(dtype)

  return jnp.stack([one(x) for x in leaves])


def sum_limit(dtype, n: int) -> float:
  """The largest squared norm whose sums over N = ``n`` cannot overflow.

  A running sum or a Gram sum of N microgradients has a squared norm up to
  ``N^2`` times their largest (``||sum_i g_i|| <= sum_i ||g_i||``).
  """
  return float(jnp.finfo(dtype).max) / (_SUM_HEADROOM * max(n, 1) ** 2)


def safe_window(dtype, n: int) -> tuple[float, float]:
  """The squared norms ``(low, high)`` that are safe for N = ``n``.

  ``high`` is ``max**0.78`` (float32: about 1e30) up to about N = 12,000,
  and :func:`sum_limit` beyond (float32: ``1.7e38 / N^2``).
  """
  info = jnp.finfo(dtype)
  low = float(info.tiny) ** _SAFE_POWERS[0]
  high = float(info.max) ** _SAFE_POWERS[1]
  return low, min(high, sum_limit(dtype, n))


def in_safe_range(sq: jax.Array) -> jax.Array:
  """Whether every squared norm ``sq [..., N]`` (a Gram diagonal) is safe.

  Out of the window of :func:`safe_window` are under- and overflowed
  microgradients, but also zero and non-finite ones: those take the
  rescaled route too, which excludes them.
  """
  low, high = safe_window(sq.dtype, sq.shape[-1])
  return jnp.all((sq >= low) & (sq <= high))


def rescale_factors(scales: jax.Array) -> jax.Array:
  """Per-microgradient factors that bring the Gram matrix into range.

  Args:
    scales: ``[..., N]`` largest ``|entry|`` of each microgradient.

  Returns:
    ``f`` with the shape of ``scales``: ``1 / s_max`` (one common factor,
    which changes no decision), raised to ``SCALE_FLOOR / s_i`` for a
    microgradient below ``SCALE_FLOOR * s_max``, so that it is not lost to
    underflow (its magnitude only weighs the running aggregate, where it is
    below float32 resolution anyway); 0 for zero or non-finite ones.
  """
  ok = jnp.isfinite(scales) & (scales > 0)
  safe = jnp.where(ok, scales, 1.0)
  s_max = jnp.max(jnp.where(ok, scales, 0.0), axis=-1, keepdims=True)
  s_max = jnp.where(s_max > 0, s_max, 1.0)
  # 1/s_max is subnormal above 1/tiny (float32: 8.5e37); XLA flushes those.
  common = jnp.maximum(1.0 / s_max, jnp.finfo(scales.dtype).tiny)
  return jnp.where(ok, jnp.maximum(common, SCALE_FLOOR / safe), 0.0)


def scale_leaves(
  leaves: Sequence[jax.Array], factors: jax.Array
) -> list[jax.Array]:
  """``f_i g_i`` per leaf (``factors`` ``[N]`` or ``[L, N]``), NaN-safe."""
  out = []
  for i, x in enumerate(leaves):
    f = factors if factors.ndim == 1 else factors[i]
    f = f.reshape((-1,) + (1,) * (x.ndim - 1))
    dtype = stat_dtype([x])
    scaled = x.astype(dtype) * f.astype(dtype)
    out.append(jnp.where(f > 0, scaled, jnp.zeros((), dtype)))
  return out


def safe_gram(
  placement: Any, per_leaf: bool = False
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Stage 1 as every aggregator runs it, safe from under- and overflow.

  When a squared norm on the Gram diagonal leaves the safe range (or is zero
  or non-finite), the Gram matrix is taken again of rescaled microgradients
  ``f_i g_i`` (:func:`rescale_factors`): one more pass over them, on that
  rare step only. A common factor changes no rule's weights, which apply to
  the original ``g_i``.

  Args:
    placement: a bound :class:`optax_gaf.placement.Placement`.
    per_leaf: one matrix per leaf, ``[L, N, N]``.

  Returns:
    ``(gram, usable, factors)``: the sanitized Gram matrix of ``f_i g_i``,
    the mask of usable microgradients and ``f`` (ones on the common step),
    shaped like ``usable``.
  """
  gram_matrix = placement.gram(per_leaf)

  def plain(gram_matrix):  # ones_like: varying as the matrix is, per device
    diagonal = jnp.diagonal(gram_matrix, axis1=-2, axis2=-1)
    return gram_matrix, jnp.ones_like(diagonal)

  def rescaled(gram_matrix):
    scales = placement.max_abs()  # [L, N]
    if not per_leaf:
      scales = jnp.max(scales, axis=0)  # NaN and inf propagate
    f = rescale_factors(scales).astype(gram_matrix.dtype)
    return placement.gram(per_leaf, f), f

  safe = in_safe_range(jnp.diagonal(gram_matrix, axis1=-2, axis2=-1))
  gram_matrix, factors = jax.lax.cond(safe, plain, rescaled, gram_matrix)
  gram_matrix, usable = sanitized(gram_matrix)
  return gram_matrix, usable, factors
