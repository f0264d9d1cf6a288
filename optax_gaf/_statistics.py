"""Stages 1 and 3 on one device: agreement statistics and the weighted sum.

Every microgradient is a pytree whose leaves carry a leading axis of size N.
Stage 1 reduces them to the N x N Gram matrix of inner products; stage 3 takes
the rule's weights back to a single update. Nothing here knows about rules.
"""

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

# Inner products are accumulated in float32 at full precision, whatever the
# gradient dtype: bf16 x bf16 products are exact in float32, and TPU default
# precision would otherwise round the Gram matrix to bf16 passes.
_PRECISION = jax.lax.Precision.HIGHEST


def leaf_gram(x: jax.Array) -> jax.Array:
  """Returns the ``[n, n]`` float32 Gram matrix of one leaf ``x [n, ...]``."""
  flat = x.reshape(x.shape[0], -1)
  return jnp.einsum(
    "ip,jp->ij",
    flat,
    flat,
    precision=_PRECISION,
    preferred_element_type=jnp.float32,
  )


def leaf_cross_gram(x: jax.Array, y: jax.Array) -> jax.Array:
  """Returns ``<x_i, y_j>`` as a ``[n, m]`` float32 matrix."""
  return jnp.einsum(
    "ip,jp->ij",
    x.reshape(x.shape[0], -1),
    y.reshape(y.shape[0], -1),
    precision=_PRECISION,
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
  grams = [leaf_gram(x) for x in leaves]
  if per_leaf:
    return jnp.stack(grams)
  return sum(grams[1:], grams[0])


def usable_from_gram(gram_matrix: jax.Array) -> jax.Array:
  """Marks microgradients that are finite and nonzero, from the diagonal.

  ``||g_i||^2`` is non-finite exactly when ``g_i`` holds a NaN or an inf (or
  overflows float32 when squared), and zero exactly when ``g_i`` is zero.
  """
  sq_norms = jnp.diagonal(gram_matrix, axis1=-2, axis2=-1)
  return jnp.isfinite(sq_norms) & (sq_norms > 0)


def sanitize_gram(gram_matrix: jax.Array, usable: jax.Array) -> jax.Array:
  """Zeroes rows and columns of unusable microgradients (NaN-safe)."""
  both = usable[..., :, None] & usable[..., None, :]
  return jnp.where(both, gram_matrix, 0.0)


def sanitized(gram_matrix: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Returns ``(gram with unusable rows and columns zeroed, usable mask)``."""
  usable = usable_from_gram(gram_matrix)
  return sanitize_gram(gram_matrix, usable), usable


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
  for l, x in enumerate(leaves):
    w = weights if weights.ndim == 1 else weights[l]
    ok = usable if usable.ndim == 1 else usable[l]
    out.append(_leaf_weighted_sum(x, w, ok))
  return out


def _leaf_weighted_sum(x, w, ok):
  return masked_tensordot(w, x, ok).astype(x.dtype)


def masked_tensordot(w: jax.Array, x: jax.Array, ok: jax.Array) -> jax.Array:
  """``w @ x`` over the microbatch axis in float32, zeroing unusable ``x_i``.

  Args:
    w: ``[N]`` weights, or ``[R, N]`` for R weighted sums at once.
    x: ``[N, ...]`` microgradients of one leaf.
    ok: ``[N]`` bool, the usable ones.
  """

  def dense(x):
    return jnp.tensordot(
      w, x, axes=1, precision=_PRECISION, preferred_element_type=jnp.float32
    )

  def masked(x):
    mask = ok.reshape((-1,) + (1,) * (x.ndim - 1))
    return dense(jnp.where(mask, x, jnp.zeros((), x.dtype)))

  # 0 * nan is nan, so mask; the masked path costs one more pass over x, so
  # take it only on the rare step that needs it.
  return jax.lax.cond(jnp.all(ok), dense, masked, x)


class LocalPlacement(NamedTuple):
  """All N microgradients live on this device (stages 1 and 3 are local)."""

  def num_microgradients(self, n_local: int) -> int:
    return n_local

  def gram(self, leaves, per_leaf=False):
    return gram(leaves, per_leaf)

  def combine(self, leaves, weights, usable):
    return weighted_sum(leaves, weights, usable)


def gradient_diversity(gram_matrix: jax.Array) -> jax.Array:
  """``sum_i ||g_i||^2 / ||sum_i g_i||^2`` (Yin et al. 2018) from the Gram.

  A stack ``[L, N, N]`` of per-leaf matrices is summed first (the whole-pytree
  value). Infinite when the microgradients sum to zero.
  """
  if gram_matrix.ndim == 3:
    gram_matrix = jnp.sum(gram_matrix, axis=0)
  total = jnp.sum(gram_matrix)
  return jnp.where(
    total > 0,
    jnp.trace(gram_matrix) / jnp.where(total > 0, total, 1.0),
    jnp.inf,
  ).astype(jnp.float32)
