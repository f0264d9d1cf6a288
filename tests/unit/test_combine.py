"""Stage 3 on arrays: the weighted sum of the microgradients, per leaf and in
their dtypes."""

import jax
import jax.numpy as jnp
import numpy as np

from optax_gaf import _combine

_weighted_sum = jax.jit(_combine.weighted_sum)


def test_weighted_sum_zeroes_unusable_before_the_sum():
  x = np.array([[1.0, 2.0], [np.nan, 1.0], [3.0, -1.0]], np.float32)
  w = jnp.array([0.5, 0.0, 0.25])
  usable = jnp.array([True, False, True])
  (out,) = _weighted_sum([jnp.asarray(x)], w, usable)
  np.testing.assert_allclose(out, [1.25, 0.75], rtol=1e-7)
  # All usable: the dense route.
  (dense,) = _weighted_sum([jnp.asarray(x[[0, 2]])], w[:2], usable[:2])
  np.testing.assert_allclose(dense, [0.5, 1.0], rtol=1e-7)


def test_weighted_sum_per_leaf_weights_and_dtypes():
  a = jnp.asarray([[1.0, 2.0], [3.0, 4.0]], jnp.bfloat16)
  b = jnp.asarray([[1.0], [-1.0]], jnp.float32)
  w = jnp.array([[0.5, 0.5], [1.0, 2.0]])
  usable = jnp.ones((2, 2), bool)
  out_a, out_b = _weighted_sum([a, b], w, usable)
  assert out_a.dtype == jnp.bfloat16 and out_b.dtype == jnp.float32
  np.testing.assert_array_equal(out_a.astype(jnp.float32), [2.0, 3.0])
  np.testing.assert_array_equal(out_b, [-1.0])
