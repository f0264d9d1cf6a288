"""The threshold tau: range checks at every entry point, schedules,
inject_hyperparams, AdaptiveTau and AutoTau."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import assume
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

import optax_gaf
from optax_gaf import _threshold
from tests import helpers
from tests import oracle
from tests.helpers import SHAPES

BAD_TAUS = [-0.1, -1.0, 2.5, 5.0, float("nan")]


def _streaming(tau):
  return optax_gaf.streaming_filtered_grads(lambda w, b: jnp.sum(w * b), 2, tau)


def _accumulator(tau):
  return optax_gaf.gaf_accumulator(tau, num_microbatches=2)


@pytest.mark.parametrize("tau", BAD_TAUS)
@pytest.mark.parametrize(
  "make",
  [optax_gaf.gaf, _streaming, _accumulator],
  ids=["gaf", "streaming_grads", "gaf_accumulator"],
)
def test_tau_out_of_range(make, tau):
  with pytest.raises(ValueError, match=r"tau.*\[0, 2\]"):
    make(tau)


def test_schedule_out_of_range():
  with pytest.raises(ValueError, match="tau"):
    optax_gaf.gaf(lambda count: 3.0)


@pytest.mark.parametrize(
  "make", [_streaming, _accumulator], ids=["streaming_grads", "gaf_accumulator"]
)
def test_streaming_refuses_a_schedule(make):
  with pytest.raises(TypeError, match="scalar here"):
    make(optax.constant_schedule(0.5))


@pytest.mark.parametrize("tau", ["half", [0.5, 0.6], "0.5", True, False])
def test_tau_that_is_no_scalar_number(tau):
  with pytest.raises((TypeError, ValueError), match="tau must be"):
    optax_gaf.gaf(tau)


@pytest.mark.parametrize(
  "make",
  [optax_gaf.gaf, _streaming, _accumulator],
  ids=["gaf", "streaming_grads", "gaf_accumulator"],
)
def test_tau_none_needs_a_number(make):
  """It said tau "must lie in [0, 2]" (issue 19, item 10)."""
  with pytest.raises(TypeError, match="tau must be a number; got None"):
    make(None)


def test_traced_tau_is_checked_later():
  """Under jit tau is a tracer: the factory cannot check it, and must not."""

  @jax.jit
  def step(tau):
    tx = optax_gaf.gaf(tau)
    _, state = tx.update(jnp.eye(2), tx.init(None))
    return state.tau

  assert float(step(jnp.float32(1.5))) == 1.5


def test_inject_hyperparams_and_schedule():
  grads = {"w": jnp.array([[1.0, 0.0], [1.0, 0.5], [0.5, 1.0]])}
  params = {"w": jnp.zeros(2)}
  tx = optax.chain(
    optax.inject_hyperparams(optax_gaf.gaf)(tau=0.0), optax.sgd(1.0)
  )
  update = jax.jit(tx.update)
  state = tx.init(params)
  _, state = update(grads, state, params)
  assert not bool(optax_gaf.stats(state)["ready"])
  state[0].hyperparams["tau"] = jnp.asarray(2.0)
  updates, state = update(grads, state, params)
  assert bool(optax_gaf.stats(state)["ready"])
  np.testing.assert_allclose(updates["w"], -grads["w"].mean(0), rtol=1e-6)

  # A schedule: tau=0 at step 0 (nothing agrees), 2 afterwards.
  tx = optax_gaf.gaf(lambda count: jnp.where(count < 1, 0.0, 2.0))
  state = tx.init(params)
  _, state = tx.update(grads, state)
  assert not bool(state.ready) and float(state.tau) == 0.0
  _, state = tx.update(grads, state)
  assert bool(state.ready) and float(state.tau) == 2.0


# --- AdaptiveTau


@pytest.mark.parametrize("rule", ["sequential", "medoid"])
def test_adaptive_tau_follows_oracle_over_steps(rule):
  cfg = optax_gaf.AdaptiveTau(k=0.5, history=7, min_count=3)
  tau, n = 1.1, 5
  tx = optax_gaf.gaf(cfg._replace(cap=tau), rule=rule, num_microbatches=n)
  params = {k: jnp.zeros(s) for k, s in zip("wbk", SHAPES)}
  state = tx.init(params)
  update = jax.jit(tx.update)
  rng = np.random.default_rng(3)
  recorded, taus = [], []
  for _ in range(5):
    leaves = helpers.make_microgradients(rng, n, SHAPES, 0.8)
    want_tau = oracle.adaptive_tau(
      recorded, tau, cfg.k, cfg.history, cfg.min_count
    )
    _, state = update(dict(zip("wbk", leaves)), state, params)
    assert float(state.tau) == pytest.approx(want_tau, abs=1e-5)
    taus.append(float(state.tau))
    # Inner products, hence decisions, do not depend on the leaf order.
    dist = helpers.ORACLES[rule](oracle.flatten(leaves), float(state.tau))[2]
    assert not oracle.is_ambiguous(dist, float(state.tau))
    recorded += [d for d in dist if np.isfinite(d) and d != 0]
    hist = np.asarray(state.tau_history)
    got = hist[np.isfinite(hist)]
    np.testing.assert_allclose(got, recorded[-cfg.history :], atol=2e-5)
  assert min(taus) < tau - 0.01  # the threshold did adapt


def test_adaptive_tau_never_exceeds_tau_and_waits_for_min_count():
  hist = jnp.array([jnp.nan, jnp.nan, 0.2, 0.4])
  at = _threshold.adaptive_threshold
  assert float(at(hist, 0.97, 1.0, 2)) == pytest.approx(0.3 + 0.1)
  assert float(at(hist, 0.35, 1.0, 2)) == pytest.approx(0.35)
  assert float(at(hist, 0.97, 1.0, 3)) == pytest.approx(0.97)


def test_record_distances_keeps_the_last_m_in_order():
  hist = jnp.full([4], jnp.nan)
  hist = _threshold.record_distances(hist, jnp.array([0.0, 0.5, jnp.nan, 0.6]))
  np.testing.assert_allclose(hist[2:], [0.5, 0.6])
  assert np.isnan(hist[:2]).all()
  hist = _threshold.record_distances(hist, jnp.array([0.7, 0.0, 0.8, 0.9]))
  np.testing.assert_allclose(hist, [0.6, 0.7, 0.8, 0.9])


@pytest.mark.parametrize(
  "adaptive_tau, error, match",
  [
    ((1.0, 10), TypeError, "AdaptiveTau"),
    (optax_gaf.AdaptiveTau(history=1), ValueError, "history"),
    (optax_gaf.AdaptiveTau(min_count=1), ValueError, "min_count"),
    (optax_gaf.AdaptiveTau(history=8.0), ValueError, "history"),
    (optax_gaf.AdaptiveTau(k=float("nan")), ValueError, "finite"),
  ],
)
def test_bad_adaptive_tau(adaptive_tau, error, match):
  """Refused as tau= and as the deprecated adaptive_tau=, before any warning."""
  if isinstance(adaptive_tau, optax_gaf.AdaptiveTau):
    with pytest.raises(error, match=match):
      optax_gaf.gaf(adaptive_tau)
  with pytest.raises(error, match=match):
    optax_gaf.gaf(0.9, adaptive_tau=adaptive_tau)


# --- AutoTau


def _auto_run(rule, granularity, steps=6, n=6, seed=0):
  """AutoTau through jitted gaf steps, and the float64 oracle alongside.

  Yields ``(state, leaves, want_taus)``: ``want_taus`` has one threshold per
  leaf (per leaf) or one (global), from the oracle's own statistics.
  """
  cfg = optax_gaf.AutoTau(z=1.5, decay=0.8, min_count=3, floor=0.2)
  tx = optax_gaf.gaf(
    cfg, rule=rule, num_microbatches=n, granularity=granularity
  )
  params = {k: jnp.zeros(s) for k, s in zip("wbk", SHAPES)}
  state = tx.init(params)
  update = jax.jit(tx.update)
  rng = np.random.default_rng(seed)
  groups = len(SHAPES) if granularity == "per_leaf" else 1
  stats = [(0.0, 0.0, 0.0)] * groups
  for _ in range(steps):
    want = [
      oracle.auto_tau(s, cfg.z, cfg.min_count, cfg.warmup_tau, cfg.floor)
      for s in stats
    ]
    grads = dict(zip("wbk", helpers.make_microgradients(rng, n, SHAPES, 0.4)))
    leaves = jax.tree.leaves(grads)  # per leaf: in the state's order
    _, state = update(grads, state, params)
    yield state, leaves, want
    parts = [leaves] if groups == 1 else [[x] for x in leaves]
    for g, part in enumerate(parts):
      dist = helpers.ORACLES[rule](oracle.flatten(part), want[g])[2]
      assert not oracle.is_ambiguous(dist, want[g])
      stats[g] = oracle.record_chance(stats[g], dist, cfg.decay)
    np.testing.assert_allclose(
      np.asarray(state.chance_stats).reshape(groups, 3), stats, rtol=1e-5
    )


@pytest.mark.parametrize("rule", ["sequential", "pairwise", "medoid"])
def test_auto_tau_follows_oracle_over_steps(rule):
  taus = []
  for state, leaves, want in _auto_run(rule, "global"):
    assert float(state.tau) == pytest.approx(want[0], abs=1e-5)
    dist = helpers.ORACLES[rule](oracle.flatten(leaves), want[0])[2]
    np.testing.assert_allclose(state.cosine_distance, dist, atol=2e-5)
    taus.append(want[0])
  assert taus[0] == 1.0 and min(taus) < 0.99  # warm-up, then adapted


def test_auto_tau_per_leaf_keeps_one_threshold_per_leaf():
  spread = []
  for state, leaves, want in _auto_run("sequential", "per_leaf"):
    assert state.chance_stats.shape == (len(SHAPES), 3)
    assert float(state.tau) == pytest.approx(np.mean(want), abs=1e-5)
    for leaf, tau, got in zip(leaves, want, state.accepted):
      accepted = oracle.sequential(oracle.flatten([leaf]), tau)[1]
      np.testing.assert_array_equal(got, accepted)
    spread.append(np.ptp(want))
  assert max(spread) > 0.01  # the leaves did get different thresholds


def test_auto_tau_state_keeps_its_shapes():
  tx = optax_gaf.gaf(optax_gaf.AutoTau(), num_microbatches=4)
  params = jnp.zeros(3)
  state = tx.init(params)
  new = jax.eval_shape(tx.update, jnp.ones((4, 3)), state, params)[1]
  shapes = lambda s: jax.tree.map(lambda x: (x.shape, x.dtype), s)
  assert shapes(new) == shapes(state)
  assert all(x.size for x in jax.tree.leaves(state))  # no zero-size arrays
  assert optax_gaf.gaf().init(params).chance_stats is None  # default: off


def test_auto_tau_under_inject_hyperparams_and_process():
  inner = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1)
  tx = optax_gaf.process(
    optax.identity(), optax_gaf.gaf(optax_gaf.AutoTau(min_count=1)), inner
  )
  params = jnp.zeros(2)
  state = tx.init(params)
  grads = jnp.array([[1.0, 0.0], [-1.0, 0.1]])  # similarity about -0.99
  _, state = jax.jit(tx.update)(grads, state, params)
  _, state = jax.jit(tx.update)(grads, state, params)
  assert float(optax_gaf.stats(state)["tau"]) == 0.0  # 1 - 1.5 * 0.99 < 0
  assert int(optax_gaf.stats(state)["skipped_steps"]) == 2


@pytest.mark.parametrize(
  "auto, error, match",
  [
    (optax_gaf.AutoTau(z=0.0), ValueError, "z"),
    (optax_gaf.AutoTau(z=float("inf")), ValueError, "z"),
    (optax_gaf.AutoTau(decay=1.0), ValueError, "decay"),
    (optax_gaf.AutoTau(min_count=2.0), TypeError, "min_count"),
    (optax_gaf.AutoTau(min_count=0), ValueError, "min_count"),
    (optax_gaf.AutoTau(warmup_tau=3.0), ValueError, "warmup_tau"),
    (optax_gaf.AutoTau(floor=-0.5), ValueError, "floor"),
  ],
)
def test_bad_auto_tau(auto, error, match):
  with pytest.raises(error, match=match):
    optax_gaf.gaf(auto)


def test_auto_tau_refused_with_adaptive_tau_and_in_streaming():
  with pytest.raises(ValueError, match="drop adaptive_tau"):
    optax_gaf.gaf(optax_gaf.AutoTau(), adaptive_tau=optax_gaf.AdaptiveTau())
  for make in (_streaming, _accumulator):
    with pytest.raises(TypeError, match="AutoTau needs"):
      make(optax_gaf.AutoTau())


DISTANCES = st.lists(
  st.floats(0.0, 2.0, width=32) | st.just(float("nan")), min_size=1, max_size=8
)


@settings(max_examples=30, deadline=None)
@given(
  steps=st.lists(DISTANCES, min_size=1, max_size=4),
  decay=st.floats(0.0, 0.999),
  z=st.floats(0.1, 4.0),
  min_count=st.integers(1, 6),
)
def test_chance_statistics_and_threshold_match_oracle(
  steps, decay, z, min_count
):
  assume(any(d > 1.0 for dist in steps for d in dist))  # some negative one
  decay = float(np.float32(decay))  # the EMAs run in float32 (1e-188 is 0)
  auto = optax_gaf.AutoTau(z=z, decay=decay, min_count=min_count)
  stats, want = _threshold.init_chance_stats(), (0.0, 0.0, 0.0)
  for dist in steps:
    stats = _threshold.record_chance(stats, jnp.asarray(dist), decay)
    want = oracle.record_chance(want, dist, decay)
  np.testing.assert_allclose(stats, want, rtol=1e-5, atol=1e-7)
  got = float(_threshold.auto_threshold(stats, auto, jnp.float32))
  assert got == pytest.approx(
    oracle.auto_tau(want, z, min_count, auto.warmup_tau, auto.floor),
    abs=1e-5,
  )


def test_adaptive_tau_as_tau_equals_the_deprecated_argument():
  """tau=AdaptiveTau(cap=...) is the one policy; adaptive_tau= still works,
  warns, and gives the same thresholds and updates over steps."""
  cfg = optax_gaf.AdaptiveTau(k=0.5, history=7, min_count=3)
  new = optax_gaf.gaf(cfg._replace(cap=0.9), num_microbatches=4)
  with pytest.warns(DeprecationWarning, match="cap=tau"):
    old = optax_gaf.gaf(0.9, num_microbatches=4, adaptive_tau=cfg)
  rng = np.random.default_rng(3)
  params = jnp.zeros(5)
  s_new, s_old = new.init(params), old.init(params)
  for _ in range(4):
    g = jnp.asarray(rng.normal(size=(4, 5)) + 0.5, jnp.float32)
    u_new, s_new = new.update(g, s_new)
    u_old, s_old = old.update(g, s_old)
    np.testing.assert_array_equal(u_new, u_old)
    np.testing.assert_array_equal(s_new.tau, s_old.tau)
  with pytest.raises(ValueError, match="already adapts"):
    optax_gaf.gaf(cfg, adaptive_tau=cfg)
  with pytest.raises(ValueError, match=r"\[0, 2\]"):
    optax_gaf.gaf(cfg._replace(cap=3.0))


@pytest.mark.parametrize(
  "old, new",
  [
    ("streamed", "record_filtered"),
    ("streaming_grads", "streaming_filtered_grads"),
    ("ghost_grads", "ghost_filtered_grads"),
  ],
)
def test_renamed_functions_keep_a_deprecated_alias(old, new):
  with pytest.warns(DeprecationWarning, match=f"optax_gaf.{new}"):
    fn = getattr(optax_gaf, old)
  assert fn is getattr(optax_gaf, new)
  assert old not in optax_gaf.__all__
