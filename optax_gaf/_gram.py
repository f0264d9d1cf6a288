"""Stages 1 and 3 on arrays: the Gram matrix, sanitizing and the weighted sum.

Every microgradient is a pytree whose leaves carry a leading axis of size N.
Stage 1 reduces them to the ``N x N`` Gram matrix of inner products; stage 3
takes a rule's weights back to one update. Nothing here knows about rules or
devices: the placements in ``_placement.py`` call these functions on whatever
part of the microgradients a device holds.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp

# Inner products are accumulated in float32 at full precision, whatever the
# gradient dtype: bf16 x bf16 products are exact in float32, and TPU default
# precision would otherwise round the Gram matrix to bf16 passes.
PRECISION = jax.lax.Precision.HIGHEST


def cross_gram(x: jax.Array, y: jax.Array) -> jax.Array:
  """Returns ``<x_i, y_j>`` as an ``[n, m]`` float32 matrix.

  Args:
    x: ``[n, ...]``.
    y: ``[m, ...]`` with the same trailing size as ``x``.
  """
  return jnp.einsum(
    "ip,jp->ij",
    x.reshape(x.shape[0], -1),
    y.reshape(y.shape[0], -1),
    precision=PRECISION,
    preferred_element_type=jnp.float32,
  )


def gram(leaves: Sequence[jax.Array], per_leaf: bool = False) -> jax.Array:
  """Gram matrix of the microgradients, without concatenating the leaves.

  Args:
    leaves: arrays ``[N, ...]``, one per parameter tensor.
    per_leaf: if True, return one matrix per leaf, stacked ``[L, N, N]``.

  Returns:
    ``[N, N]`` float32 (the whole-pytree inner products), or ``[L, N, N]``.
  """
  grams = [cross_gram(x, x) for x in leaves]
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


def masked_tensordot(w: jax.Array, x: jax.Array, ok: jax.Array) -> jax.Array:
  """``w @ x`` over the microbatch axis in float32, zeroing unusable ``x_i``.

  Args:
    w: ``[N]`` weights, or ``[R, N]`` for R weighted sums at once.
    x: ``[N, ...]`` microgradients of one leaf.
    ok: ``[N]`` bool, the usable ones.
  """

  def dense(x):
    return jnp.tensordot(
      w, x, axes=1, precision=PRECISION, preferred_element_type=jnp.float32
    )

  def masked(x):
    mask = ok.reshape((-1,) + (1,) * (x.ndim - 1))
    return dense(jnp.where(mask, x, jnp.zeros((), x.dtype)))

  # 0 * nan is nan, so mask; the masked path costs one more pass over x, so
  # take it only on the rare step that needs it.
  return jax.lax.cond(jnp.all(ok), dense, masked, x)


def weighted_sum(
  leaves: Sequence[jax.Array], weights: jax.Array, usable: jax.Array
) -> list[jax.Array]:
  """Returns ``sum_i w_i g_i`` per leaf, in each leaf's dtype.

  Args:
    leaves: arrays ``[N, ...]``.
    weights: ``[N]`` (one weight per microgradient) or ``[L, N]`` (per leaf).
    usable: ``[N]`` or ``[L, N]`` bool; unusable microgradients are zeroed
      before the sum, since ``0 * nan`` would still poison it.
  """
  weights = jnp.asarray(weights, jnp.float32)
  out = []
  for i, x in enumerate(leaves):
    w = weights if weights.ndim == 1 else weights[i]
    ok = usable if usable.ndim == 1 else usable[i]
    out.append(masked_tensordot(w, x, ok).astype(x.dtype))
  return out


def diversity(sum_sq_norms: jax.Array, sq_norm_of_sum: jax.Array) -> jax.Array:
  """``sum_i ||g_i||^2 / ||sum_i g_i||^2`` (Yin et al. 2018), float32.

  Infinite when the microgradients sum to zero.
  """
  positive = sq_norm_of_sum > 0
  ratio = sum_sq_norms / jnp.where(positive, sq_norm_of_sum, 1.0)
  return jnp.where(positive, ratio, jnp.inf).astype(jnp.float32)


def gradient_diversity(gram_matrix: jax.Array) -> jax.Array:
  """:func:`diversity` from a sanitized Gram matrix ``[N, N]`` or ``[L, N, N]``.

  A stack of per-leaf matrices is summed first (the whole-pytree value).
  """
  if gram_matrix.ndim == 3:
    gram_matrix = jnp.sum(gram_matrix, axis=0)
  return diversity(jnp.trace(gram_matrix), jnp.sum(gram_matrix))
