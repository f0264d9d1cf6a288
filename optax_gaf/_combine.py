"""Stage 3: the rule's weights back to one update, ``sum_i w_i g_i``.

The placements call these on whatever part of the microgradients a device
holds. Unusable microgradients (NaN, inf) are zeroed before the sum, since
``0 * nan`` would still poison it; that costs one more pass over them, so it
is taken only on the rare step that needs it.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from optax_gaf import _gram


def weighted_rows(w: jax.Array, x: jax.Array) -> jax.Array:
  """``w @ x`` over the microbatch axis, in ``w``'s dtype, full precision."""
  return jnp.tensordot(
    w, x, axes=1, precision=_gram.PRECISION, preferred_element_type=w.dtype
  )


def zero_unusable(x: jax.Array, ok: jax.Array) -> jax.Array:
  """``x [N, ...]`` with the rows of unusable microgradients zeroed."""
  mask = ok.reshape((-1,) + (1,) * (x.ndim - 1))
  return jnp.where(mask, x, jnp.zeros((), x.dtype))


def masked_tensordot(w: jax.Array, x: jax.Array, ok: jax.Array) -> jax.Array:
  """``w @ x`` over the microbatch axis in ``w``'s dtype, zeroing unusable ones.

  Args:
    w: ``[N]`` weights, or ``[R, N]`` for R weighted sums at once.
    x: ``[N, ...]`` microgradients of one leaf.
    ok: ``[N]`` bool, the usable ones.
  """
  # 0 * nan is nan, so mask; the masked path costs one more pass over x, so
  # take it only on the rare step that needs it.
  return jax.lax.cond(
    jnp.all(ok),
    lambda x: weighted_rows(w, x),
    lambda x: weighted_rows(w, zero_unusable(x, ok)),
    x,
  )


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
  weights = jnp.asarray(weights, _gram.stat_dtype(leaves))
  out = []
  for i, x in enumerate(leaves):
    w = weights if weights.ndim == 1 else weights[i]
    ok = usable if usable.ndim == 1 else usable[i]
    out.append(masked_tensordot(w, x, ok).astype(x.dtype))
  return out
