"""optax_gaf.adacons: consensus weights from the Gram matrix, with momentum."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

import optax_gaf
from tests import helpers
from tests import oracle

SHAPES = [(3, 4), (5,)]


@pytest.mark.parametrize("n", [2, 3, 7])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("rescale", [True, False])
def test_matches_float64_oracle_over_steps(n, momentum, rescale):
  tx = optax_gaf.adacons(momentum, num_microbatches=n, rescale=rescale)
  params = {"a": jnp.zeros(SHAPES[0]), "b": jnp.zeros(SHAPES[1])}
  state = tx.init(params)
  update = jax.jit(tx.update)
  rng = np.random.default_rng(helpers.seed_of(n, momentum, rescale))
  m = None
  for _ in range(3):
    leaves = helpers.make_microgradients(rng, n, SHAPES, 0.6, flip_prob=0.2)
    want, alpha, m = oracle.adacons(
      oracle.flatten(leaves), m if momentum else None, momentum, rescale
    )
    updates, state = update(dict(zip("ab", leaves)), state, params)
    assert bool(state.ready) == (want is not None)
    got = np.concatenate([np.ravel(updates["a"]), np.ravel(updates["b"])])
    if want is None:
      np.testing.assert_array_equal(got, 0.0)
      continue
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(state.coefficients, alpha, rtol=2e-5, atol=1e-7)
    np.testing.assert_allclose(state.sorted_momentum, m, rtol=2e-5, atol=1e-6)


@settings(max_examples=20, deadline=None)
@given(
  n=st.sampled_from([2, 5]),
  seed=st.integers(0, 2**31 - 1),
  log_scale=st.floats(-3, 3),
)
def test_identical_microgradients_give_that_microgradient(n, seed, log_scale):
  g = np.random.default_rng(seed).normal(size=9) * 10.0**log_scale
  grads = jnp.asarray(np.tile(g, (n, 1)), jnp.float32)
  tx, update = _adacons_with_momentum(n)
  state = tx.init(jnp.zeros(9))
  for _ in range(2):  # also after a momentum step
    updates, state = update(grads, state)
    np.testing.assert_allclose(updates, g, rtol=1e-5)
    np.testing.assert_allclose(
      state.coefficients, np.full(n, 1.0 / n), rtol=1e-5
    )


_COMPILED = {}


def _adacons_with_momentum(n):
  # One compiled update per N, reused across hypothesis examples.
  if n not in _COMPILED:
    tx = optax_gaf.adacons(0.5, num_microbatches=n)
    _COMPILED[n] = (tx, jax.jit(tx.update))
  return _COMPILED[n]


def test_coefficients_follow_the_rank_not_the_authors_reindexing():
  # Three distinct projections in a 3-cycle order: m[argsort(a)] (the sample
  # code) would swap them; the rank mapping gives a / sum(a) back.
  x = jnp.array([[3.0, 0.3], [1.0, 0.0], [2.0, -0.2]])
  tx = optax_gaf.adacons(num_microbatches=3)
  _, state = tx.update(x, tx.init(jnp.zeros(2)))
  flat = np.asarray(x, np.float64)
  total = flat.sum(0)
  a = flat @ total / np.linalg.norm(flat, axis=1)
  np.testing.assert_allclose(state.coefficients, a / a.sum(), rtol=1e-6)


def test_unusable_are_excluded_and_no_consensus_is_skipped():
  x = jnp.array([[1.0, 0.0], [jnp.inf, 1.0], [1.0, 0.2]])
  tx = optax_gaf.adacons(num_microbatches=3)
  updates, state = tx.update(x, tx.init(jnp.zeros(2)))
  want, alpha, _ = oracle.adacons(np.asarray(x, np.float64))
  np.testing.assert_allclose(updates, want, rtol=1e-6)
  assert float(state.coefficients[1]) == 0.0
  opposed = jnp.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 0.0]])
  updates, state = tx.update(opposed, state)
  assert not bool(state.ready) and int(state.skipped_steps) == 1
  np.testing.assert_array_equal(updates, [0.0, 0.0])
  s = optax_gaf.stats(optax.chain(tx, optax.sgd(1.0)).init(jnp.zeros(2)))
  assert set(s) >= {"coefficients", "gradient_diversity", "skip_rate"}


def test_without_num_microbatches_state_is_n_independent():
  tx = optax_gaf.adacons()
  state = tx.init(jnp.zeros(2))
  assert state.coefficients is None and state.sorted_momentum is None
  update = jax.jit(tx.update)
  for n in (2, 4):
    updates, new = update(jnp.ones((n, 2)), state)
    np.testing.assert_allclose(updates, [1.0, 1.0], rtol=1e-6)
    assert new.coefficients is None and bool(new.ready)


@pytest.mark.parametrize(
  "kwargs, match",
  [
    (dict(momentum=0.9), "num_microbatches"),
    (dict(momentum=1.0, num_microbatches=2), "momentum"),
    (dict(momentum=-0.1, num_microbatches=2), "momentum"),
    (dict(num_microbatches=0), "num_microbatches"),
    (dict(num_microbatches=1), "num_microbatches must be >= 2"),
  ],
)
def test_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    optax_gaf.adacons(**kwargs)


def test_num_microbatches_mismatch():
  tx = optax_gaf.adacons(num_microbatches=3)
  with pytest.raises(ValueError, match="got 2 microgradients"):
    tx.update(jnp.ones((2, 2)), tx.init(jnp.zeros(2)))


# --- issue 19: the rescaled route applies its factors once


def _adacons_oracle_update(x):
  want, _, _ = oracle.adacons(np.asarray(x, np.float64))
  return want


@pytest.mark.parametrize(
  "x",
  [
    [[3.0, 4.0], [3.0, 4.0], [0.0, 0.0]],  # a zero row
    [[3e-13, 4e-13], [3e-13, 4e-13], [3e-13, 4.1e-13]],  # norms below 1e-12
    [[3e16, 4e16], [3e16, 4e16], [3e16, 4.1e16]],  # norms above 1e15
    [[3.0, 4.0], [3.0, 4.0], [np.nan, 1.0]],  # a NaN row
  ],
  ids=["zero_row", "1e-13", "1e16", "nan_row"],
)
def test_rescaled_step_has_the_mean_length(x):
  """The regression: every such step came out scaled by 1 / max |entry|."""
  x = jnp.asarray(x, jnp.float32)
  want = _adacons_oracle_update(x)
  tx = optax_gaf.adacons(num_microbatches=3)
  updates, _ = jax.jit(tx.update)(x, tx.init(jnp.zeros(2)))
  np.testing.assert_allclose(updates, want, rtol=1e-5)


@pytest.mark.parametrize("scale", [1.0, 1e-14, 1e17])
def test_rescaled_step_in_shard_map_equals_oracle(scale):
  rng = np.random.default_rng(helpers.seed_of("adacons_shard_map", scale))
  x = rng.normal(size=(helpers.D, 5)) + 2.0
  x[3] = 0.0  # unusable: the rescaled route
  x = jnp.asarray(x * scale, jnp.float32)
  agg = optax_gaf.adacons(num_microbatches=helpers.D, axis_name="data")
  update = helpers.shard_map_update(agg)
  updates, _ = update(helpers.shard(x), agg.init(jnp.zeros(5)))
  want = _adacons_oracle_update(x)
  np.testing.assert_allclose(updates, want, rtol=1e-5, atol=1e-6 * scale)


_RESCALED = {}


def _adacons_update(n, rescale):
  if (n, rescale) not in _RESCALED:
    tx = optax_gaf.adacons(num_microbatches=n, rescale=rescale)
    _RESCALED[n, rescale] = (tx, jax.jit(tx.update))
  return _RESCALED[n, rescale]


@settings(max_examples=30, deadline=None)
@given(
  n=st.sampled_from([3, 6]),
  seed=st.integers(0, 2**31 - 1),
  log_scale=st.floats(-17, 17),
  log_outlier=st.floats(-8, 8),
  bad=st.sampled_from(["none", "zero", "nan", "inf"]),
  rescale=st.booleans(),
)
def test_property_any_scale_and_unusable_rows_match_oracle(
  n, seed, log_scale, log_outlier, bad, rescale
):
  """Any common scale (both sides of the window), one microgradient further
  off, and an unusable one: the float64 oracle's update. Would have found the
  double-applied rescale factor (issue 19, item 1)."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, 7)) + 1.5  # mostly agreeing: coefficients > 0
  x[1] *= 10.0**log_outlier
  if bad != "none":
    x[n - 1] = {"zero": 0.0, "nan": np.nan, "inf": np.inf}[bad]
  x *= 10.0**log_scale
  x = x.astype(np.float32)
  flat = np.asarray(x, np.float64)
  want, alpha, _ = oracle.adacons(flat, rescale=rescale)
  tx, update = _adacons_update(n, rescale)
  updates, state = update(jnp.asarray(x), tx.init(jnp.zeros(7)))
  assert bool(state.ready) == (want is not None)
  if want is None:
    np.testing.assert_array_equal(updates, 0.0)
  else:
    scale = np.max(np.abs(want))
    np.testing.assert_allclose(updates, want, rtol=1e-4, atol=1e-5 * scale)
    np.testing.assert_allclose(state.coefficients, alpha, rtol=1e-4, atol=1e-6)


# --- issue 19: momentum under inject_hyperparams


def test_inject_hyperparams_traces_momentum_under_jit():
  rng = np.random.default_rng(helpers.seed_of("adacons_inject"))
  steps = [jnp.asarray(rng.normal(size=(3, 4)) + 1.0, jnp.float32)]
  steps.append(jnp.asarray(rng.normal(size=(3, 4)) + 1.0, jnp.float32))
  injected = optax.inject_hyperparams(
    optax_gaf.adacons, static_args=("num_microbatches",)
  )(momentum=0.5, num_microbatches=3)
  plain = optax_gaf.adacons(0.5, num_microbatches=3)
  s_inj, s_plain = injected.init(jnp.zeros(4)), plain.init(jnp.zeros(4))
  for g in steps:
    u_inj, s_inj = jax.jit(injected.update)(g, s_inj)
    u_plain, s_plain = plain.update(g, s_plain)
    np.testing.assert_allclose(u_inj, u_plain, rtol=1e-6)
  s_inj.hyperparams["momentum"] = jnp.asarray(0.0)
  u_inj, _ = jax.jit(injected.update)(steps[0], s_inj)
  u_plain, _ = optax_gaf.adacons(num_microbatches=3).update(
    steps[0], optax_gaf.adacons(num_microbatches=3).init(jnp.zeros(4))
  )
  np.testing.assert_allclose(u_inj, u_plain, rtol=1e-6)


def test_traced_momentum_without_num_microbatches_says_what_to_do():
  tx = optax.inject_hyperparams(optax_gaf.adacons)(momentum=0.0)
  state = tx.init(jnp.zeros(2))
  with pytest.raises(ValueError, match="static_args=\\('num_microbatches',\\)"):
    jax.jit(tx.update)(jnp.ones((2, 2)), state)
