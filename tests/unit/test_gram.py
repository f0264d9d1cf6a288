"""Stage 1 on arrays (optax_gaf/_gram.py): the Gram matrix, sanitizing, the
float range and the gradient diversity, against float64 NumPy. Stage 3 (the
weighted sum): tests/unit/test_combine.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

import optax_gaf
from optax_gaf import _gram
from tests import helpers
from tests import oracle
from tests.helpers import SHAPES

_gram_jit = jax.jit(_gram.gram, static_argnames="per_leaf")


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.sampled_from([2, 5]))
def test_gram_matches_float64(seed, n):
  leaves = helpers.make_microgradients(
    np.random.default_rng(seed), n, SHAPES, 0.5
  )
  flat = oracle.flatten(leaves)
  g = _gram_jit(leaves)
  assert g.dtype == jnp.float32 and g.shape == (n, n)
  np.testing.assert_allclose(g, flat @ flat.T, rtol=1e-5, atol=1e-5)
  per_leaf = _gram_jit(leaves, per_leaf=True)
  assert per_leaf.shape == (len(SHAPES), n, n)
  for i, x in enumerate(leaves):
    f = oracle.flatten([x])
    np.testing.assert_allclose(per_leaf[i], f @ f.T, rtol=1e-5, atol=1e-5)


def test_cross_gram_is_float32_at_full_precision_for_bf16():
  x = jnp.asarray([[1.0, 2.0, 3.0], [0.5, -1.0, 0.25]], jnp.bfloat16)
  y = jnp.asarray([[3.0, 1.0, -2.0]], jnp.bfloat16)
  c = _gram.cross_gram(x, y)
  assert c.dtype == jnp.float32 and c.shape == (2, 1)
  # bf16 x bf16 products are exact in float32.
  np.testing.assert_array_equal(c, [[-1.0], [0.0]])
  assert _gram.PRECISION == jax.lax.Precision.HIGHEST


def test_sanitized_zeroes_unusable_rows_and_columns():
  x = np.array(
    [[1.0, 2.0], [0.0, 0.0], [np.nan, 1.0], [np.inf, 0.0], [3.0, -1.0]],
    np.float32,
  )
  g, usable = _gram.sanitized(_gram.gram([jnp.asarray(x)]))
  np.testing.assert_array_equal(usable, [True, False, False, False, True])
  assert np.all(np.isfinite(g))
  flat = np.where(usable[:, None], x.astype(np.float64), 0.0)
  np.testing.assert_allclose(g, flat @ flat.T, rtol=1e-6)
  # Per leaf: one mask per leaf.
  stacked = _gram.gram([jnp.asarray(x), jnp.ones((5, 2))], per_leaf=True)
  _, usable = _gram.sanitized(stacked)
  assert usable.shape == (2, 5) and bool(usable[1].all())


@pytest.mark.parametrize("n", [3, 6])
def test_gradient_diversity_matches_oracle(n):
  leaves = helpers.make_microgradients(np.random.default_rng(n), n, SHAPES, 0.5)
  leaves[0][1] = np.nan  # excluded, as in the oracle
  g, _ = _gram.sanitized(_gram.gram(leaves))
  want = oracle.gradient_diversity(oracle.flatten(leaves))
  assert float(_gram.gradient_diversity(g)) == pytest.approx(want, rel=1e-5)
  # A stack of per-leaf matrices is summed first: the whole-pytree value.
  clean = [np.nan_to_num(x) for x in leaves]
  clean[0][1] = 0.0
  stacked = _gram.gram(clean, per_leaf=True)
  assert float(_gram.gradient_diversity(stacked)) == pytest.approx(
    oracle.gradient_diversity(oracle.flatten(clean)), rel=1e-5
  )


def test_diversity_is_infinite_when_the_microgradients_cancel():
  assert float(_gram.diversity(jnp.float32(2.0), jnp.float32(0.0))) == np.inf
  assert float(_gram.diversity(jnp.float32(2.0), jnp.float32(4.0))) == 0.5
  x = jnp.array([[1.0, 2.0], [-1.0, -2.0]])
  assert float(_gram.gradient_diversity(_gram.gram([x]))) == np.inf


# --- issue 19: zero-size leaves and the N-dependent window


def test_max_abs_of_a_zero_size_leaf_is_zero():
  x = jnp.asarray([[1.0, -3.0], [0.5, 0.25], [np.nan, 0.0]], jnp.float32)
  got = _gram.max_abs([jnp.zeros((3, 0)), x, jnp.zeros((3, 0, 2))])
  np.testing.assert_array_equal(got[0], 0.0)
  np.testing.assert_array_equal(got[2], 0.0)
  np.testing.assert_array_equal(got[1], [3.0, 0.5, np.nan])


def test_safe_window_leaves_room_for_sums_of_n_squared():
  """N = 20,000 microgradients of squared norm 1e30 sum to 4e38 > max."""
  for dtype in (jnp.float32, jnp.float64):
    for n in (2, 100, 10**4, 2 * 10**4, 10**6):
      low, high = _gram.safe_window(dtype, n)
      assert 0 < low < high
      assert n**2 * high <= float(jnp.finfo(dtype).max) / 2 * (1 + 1e-6)
  assert bool(_gram.in_safe_range(jnp.full([100], 1e30, jnp.float32)))
  assert not bool(_gram.in_safe_range(jnp.full([20000], 1e30, jnp.float32)))


SIZE_CASES = {
  # name: (aggregator factory, float64 oracle on the flattened leaves)
  "gaf_gram": (
    lambda n: optax_gaf.gaf(0.5, num_microbatches=n),
    lambda leaves: oracle.sequential(oracle.flatten(leaves), 0.5)[0],
  ),
  "gaf_per_leaf": (
    lambda n: optax_gaf.gaf(2.0, num_microbatches=n, granularity="per_leaf"),
    None,  # tau=2: the mean in the non-empty leaves
  ),
  "adacons": (
    lambda n: optax_gaf.adacons(num_microbatches=n),
    lambda leaves: oracle.adacons(oracle.flatten(leaves))[0],
  ),
  "and_mask": (
    lambda n: optax_gaf.and_mask(0.5),
    lambda leaves: np.concatenate(
      [np.ravel(y) for y in oracle.and_mask(leaves, 0.5)]
    ),
  ),
}
_SIZE_UPDATES = {}


def _size_update(case, n, shapes):
  key = (case, n, shapes)
  if key not in _SIZE_UPDATES:
    tx = SIZE_CASES[case][0](n)
    _SIZE_UPDATES[key] = (tx, jax.jit(tx.update))
  return _SIZE_UPDATES[key]


@settings(max_examples=helpers.examples(8, 3), deadline=None)
@given(
  case=st.sampled_from(sorted(SIZE_CASES)),
  n=st.sampled_from([4, 20]),
  empty=st.sampled_from([(0,), (3, 0), (0, 2)]),
  position=st.integers(0, 2),
  log_scale=st.sampled_from([0.0, 20.0, -20.0]),
  seed=st.integers(0, 2**31 - 1),
)
def test_property_zero_size_leaves_change_nothing(
  case, n, empty, position, log_scale, seed
):
  """A zero-size leaf anywhere in the tree, on the common and the rescaled
  route (norms 1e20 or 1e-20) and the block route (N=20): the float64
  oracle's update for the other leaves, an empty one for it. Would have found
  the crash in max_abs (issue 19, item 5)."""
  leaves = helpers.make_microgradients(
    np.random.default_rng(seed), n, [(3,), (2, 2)], 0.8, flip_prob=0.1
  )
  leaves = [x * np.float32(10.0**log_scale) for x in leaves]
  with_empty = list(leaves)
  with_empty.insert(position, np.zeros((n, *empty), np.float32))
  names = [f"x{i}" for i in range(3)]
  grads = {k: jnp.asarray(x) for k, x in zip(names, with_empty)}
  params = helpers.params_like(grads)
  shapes = tuple(x.shape for x in with_empty)
  tx, update = _size_update(case, n, (position, shapes))
  updates, _ = update(grads, tx.init(params), params)
  assert updates[names[position]].shape == empty
  kept = [k for i, k in enumerate(names) if i != position]
  got = np.concatenate([np.ravel(np.asarray(updates[k])) for k in kept])
  oracle_fn = SIZE_CASES[case][1]
  if oracle_fn is None:
    want = oracle.flatten(leaves).mean(axis=0)
  else:
    want = oracle_fn(leaves)
  if want is None:  # no agreement (a flipped anchor)
    np.testing.assert_array_equal(got, 0.0)
  else:
    scale = np.max(np.abs(want))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * scale)
