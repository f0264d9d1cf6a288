"""``optax_gaf._ghost.numerics``: the ghost Gram matrix in float range and
precision (per-microbatch power-of-two scaling, the cancellation bound,
centring and exact rows) against float64."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from optax_gaf._ghost import numerics


def microgradients(x, d):
  """float64 ``g_n = sum_h x_nh^T d_nh``, flattened ``[N, Hb K J]``."""
  x, d = np.asarray(x, np.float64), np.asarray(d, np.float64)
  g = np.einsum("nhsk,nhsj->nhkj", x, d)
  return g.reshape(g.shape[0], -1)


def cosine_error(gram, want):
  s = np.sqrt(np.diagonal(want))
  return np.max(np.abs(np.asarray(gram, np.float64) - want) / s / s[:, None])


def test_scaled_is_exact_per_microbatch():
  x = (
    jnp.stack(
      [jnp.full((3,), 3e30), jnp.full((3,), 5e-30), jnp.zeros(3), jnp.ones(3)]
    )
    .at[3, 0]
    .set(jnp.nan)
  )
  y, e = numerics.scaled(x, jnp.float32)
  np.testing.assert_array_equal(e[2:], [0, 0])  # zero and NaN: left alone
  top = np.max(np.abs(np.asarray(y[:2])), axis=1)
  assert np.all((top >= 0.5) & (top < 1))
  back = np.asarray(y, np.float64) * 2.0 ** np.asarray(e, np.float64)[:, None]
  np.testing.assert_array_equal(back[:3], np.asarray(x[:3], np.float64))


def test_finish_zeroes_left_out_rows_even_if_nan():
  gram = jnp.array([[1.0, jnp.nan], [jnp.nan, jnp.nan]])
  out = numerics.finish(gram, jnp.array([1, 0]), jnp.array([0.5, 0.0]))
  np.testing.assert_array_equal(out, [[1.0, 0.0], [0.0, 0.0]])


@pytest.mark.parametrize("hb", [1, 2])
def test_microbatches_scaled_far_apart(hb):
  """float32 captures 1e30 and 1e-30 apart: the float64 Gram matrix."""
  keys = jax.random.split(jax.random.key(0), 2)
  x = jax.random.normal(keys[0], (4, hb, 5, 3))
  d = jax.random.normal(keys[1], (4, hb, 5, 2))
  scale = jnp.array([1e30, 1e-30, 1.0, 1e15]).reshape(4, 1, 1, 1)
  x, d = x * scale, d / scale
  gram = numerics.matmul_gram(x, d, jnp.float32)
  flat = microgradients(x, d)
  assert cosine_error(gram, flat @ flat.T) < 1e-6


def test_cancelling_tokens_are_flagged_and_get_exact_rows():
  """Microbatch 1's tokens come in pairs with opposite output gradients
  (up to 1e-4): the plain ghost sum would lose its squared norm."""
  keys = jax.random.split(jax.random.key(1), 3)
  x = 100 + jax.random.normal(keys[0], (3, 1, 8, 4))
  d = jax.random.normal(keys[1], (3, 1, 8, 6))
  half = d[1, :, :4]
  d = d.at[1, :, 4:].set(-half + 1e-4 * jax.random.normal(keys[2], half.shape))
  x = x.at[1, :, 4:].set(x[1, :, :4])
  flat = microgradients(x, d)
  want = flat @ flat.T
  xs, _ = numerics.scaled(x, jnp.float32)
  ds, _ = numerics.scaled(d, jnp.float32)
  plain, b = numerics._token_gram(xs, ds, jnp.float32)
  np.testing.assert_array_equal(
    numerics.flagged(plain, b), [False, True, False]
  )
  stacked = np.einsum(  # float32 microgradients, as the stacked route
    "nhsk,nhsj->nkj", np.asarray(x), np.asarray(d)
  ).reshape(3, -1)
  stacked_error = cosine_error(stacked @ stacked.T, want)
  assert cosine_error(numerics.matmul_gram(x, d, jnp.float32), want) < max(
    10 * stacked_error, 1e-6
  )


def test_bfloat16_captures_stay_bfloat16_with_float32_sums():
  """Scaling keeps bfloat16 (float32's exponent range): its products are
  exact in the float32 matmul, as before the scaling."""
  keys = jax.random.split(jax.random.key(2), 2)
  x = jax.random.normal(keys[0], (4, 1, 6, 5), jnp.bfloat16) * 1e20
  d = jax.random.normal(keys[1], (4, 1, 6, 3), jnp.bfloat16) * 1e-20
  assert numerics.scaled(x, jnp.float32)[0].dtype == jnp.bfloat16
  gram = numerics.matmul_gram(x, d, jnp.float32)
  assert gram.dtype == jnp.float32
  flat = microgradients(x, d)
  assert cosine_error(gram, flat @ flat.T) < 1e-6


def residual_case(hb, scales, seed=0):
  """float32 captures per microbatch ``scales`` apart and a residual."""
  keys = jax.random.split(jax.random.key(seed), 3)
  n = len(scales)
  x = jax.random.normal(keys[0], (n, hb, 5, 3))
  d = jax.random.normal(keys[1], (n, hb, 5, 2))
  r = jax.random.normal(keys[2], (hb, 3, 2))
  x = x * jnp.asarray(scales, jnp.float32).reshape(n, 1, 1, 1)
  return x, d, r


@pytest.mark.parametrize("hb", [1, 2])
@pytest.mark.parametrize(
  "scales, r_scale",
  [
    ([1.0, 2.0, 0.5, 1.0], 1.0),
    ([1e20, 1e-20, 1.0, 1e5], 1e3),
    ([1.0] * 4, 1e30),
  ],
)
def test_residual_gram_against_float64(hb, scales, r_scale):
  """The Gram matrix of ``f_n (a_n + r)``, with captures and residual of
  any float32 scales and ``safe_gram``-like factors ``f_n = 1 / max|g_n|``
  (the plain Gram matrix would overflow), is the float64 oracle's."""
  x, d, r = residual_case(hb, scales)
  r = r * r_scale
  flat = microgradients(x, d) + np.asarray(r, np.float64).reshape(1, -1)
  f = 1 / np.max(np.abs(flat), axis=1)
  gram = numerics.matmul_gram(x, d, jnp.float32, jnp.asarray(f, jnp.float32), r)
  flat = flat * f[:, None]
  assert cosine_error(gram, flat @ flat.T) < 1e-5


def test_residual_that_cancels_a_microgradient_gets_an_exact_row():
  """``r = -a_0 (1 - 1e-4)``: ``g_0`` is 1e-4 of its parts, which the sum
  ``|a|^2 + 2<a, r> + |r|^2`` loses in float32; the flagged row is formed
  exactly."""
  x, d, _ = residual_case(1, [1.0] * 4, seed=3)
  a0 = np.einsum("sk,sj->kj", np.asarray(x[0, 0]), np.asarray(d[0, 0]))
  r = jnp.asarray(-a0 * (1 - 1e-4), jnp.float32)[None]
  gram = numerics.matmul_gram(x, d, jnp.float32, residual=r)
  flat = microgradients(x, d) + np.asarray(r, np.float64).reshape(1, -1)
  want = flat @ flat.T
  np.testing.assert_allclose(gram[0, 0], want[0, 0], rtol=1e-3)
  assert cosine_error(gram, want) < 1e-3


def test_residual_with_factors_matches_scaled_oracle():
  x, d, r = residual_case(2, [1.0, 3.0, 1.0, 0.25])
  f = jnp.array([0.5, 0.0, 2.0, 1.0])
  gram = numerics.matmul_gram(x, d, jnp.float32, factors=f, residual=r)
  flat = microgradients(x, d) + np.asarray(r, np.float64).reshape(1, -1)
  flat = flat * np.asarray(f, np.float64)[:, None]
  want = flat @ flat.T
  np.testing.assert_array_equal(np.asarray(gram)[1], 0.0)
  keep = [0, 2, 3]
  err = cosine_error(
    np.asarray(gram)[np.ix_(keep, keep)], want[np.ix_(keep, keep)]
  )
  assert err < 1e-5
