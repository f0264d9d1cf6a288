"""The threshold tau: range checks at every entry point, schedules,
inject_hyperparams, AdaptiveTau, AutoTau and WarmupAutoTau."""

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


def _oracle_run(cfg, want_tau, rule, granularity, steps, n, seed):
  """A chance-statistics policy through jitted gaf steps, with the float64
  oracle alongside.

  ``want_tau(step, stats)`` is the oracle's threshold from its own
  statistics. Yields ``(state, leaves, updates, want_taus)`` per step,
  ``want_taus`` one threshold per leaf (per leaf) or one.
  """
  tx = optax_gaf.gaf(
    cfg, rule=rule, num_microbatches=n, granularity=granularity
  )
  params = {k: jnp.zeros(s) for k, s in zip("wbk", SHAPES)}
  state = tx.init(params)
  update = jax.jit(tx.update)
  rng = np.random.default_rng(seed)
  groups = len(SHAPES) if granularity == "per_leaf" else 1
  stats = [(0.0, 0.0, 0.0)] * groups
  for step in range(steps):
    want = [want_tau(step, s) for s in stats]
    grads = dict(zip("wbk", helpers.make_microgradients(rng, n, SHAPES, 0.4)))
    leaves = jax.tree.leaves(grads)
    updates, state = update(grads, state, params)
    yield state, leaves, updates, want
    parts = [leaves] if groups == 1 else [[x] for x in leaves]
    for g, part in enumerate(parts):
      dist = helpers.ORACLES[rule](oracle.flatten(part), want[g])[2]
      assert not oracle.is_ambiguous(dist, want[g])
      stats[g] = oracle.record_chance(stats[g], dist, cfg.decay)
    np.testing.assert_allclose(
      np.asarray(state.chance_stats).reshape(groups, 3), stats, rtol=1e-5
    )


def _auto_run(rule, granularity, steps=6, n=6, seed=0):
  """AutoTau through :func:`_oracle_run`; yields ``(state, leaves, want)``."""
  cfg = optax_gaf.AutoTau(z=1.5, decay=0.8, min_count=3, floor=0.2)

  def want_tau(step, s):
    del step
    return oracle.auto_tau(s, cfg.z, cfg.min_count, cfg.warmup_tau, cfg.floor)

  run = _oracle_run(cfg, want_tau, rule, granularity, steps, n, seed)
  for state, leaves, _, want in run:
    yield state, leaves, want


def _warmup_run(cfg, rule="sequential", granularity="global", steps=7, n=5):
  """WarmupAutoTau through :func:`_oracle_run`: averaging (tau 2), then the
  oracle's AutoTau threshold."""

  def want_tau(step, s):
    if step < cfg.warmup_steps:
      return 2.0
    return oracle.auto_tau(s, cfg.z, cfg.min_count, 2.0, cfg.floor)

  return _oracle_run(cfg, want_tau, rule, granularity, steps, n, 4)


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


# --- WarmupAutoTau


@pytest.mark.parametrize("rule", ["sequential", "pairwise", "medoid"])
def test_warmup_auto_tau_averages_then_follows_oracle(rule):
  cfg = optax_gaf.WarmupAutoTau(
    warmup_steps=3, z=1.5, decay=0.8, min_count=3, floor=0.2
  )
  taus = []
  for state, leaves, updates, want in _warmup_run(cfg, rule):
    assert float(state.tau) == pytest.approx(want[0], abs=1e-5)
    flat = oracle.flatten(leaves)
    dist = helpers.ORACLES[rule](flat, want[0])[2]
    np.testing.assert_allclose(state.cosine_distance, dist, atol=2e-5)
    taus.append(want[0])
    if want[0] == 2.0:  # the warm-up: every one is taken
      assert bool(state.ready) and bool(np.all(state.accepted))
    if want[0] == 2.0 and rule != "pairwise":  # pairwise: its running average
      got = oracle.flatten([x[None] for x in jax.tree.leaves(updates)])[0]
      np.testing.assert_allclose(got, flat.mean(0), rtol=1e-5, atol=1e-6)
  assert taus[:3] == [2.0] * 3 and max(taus[3:]) < 1.0  # then it filters


def test_warmup_auto_tau_per_leaf_keeps_one_threshold_per_leaf():
  cfg = optax_gaf.WarmupAutoTau(warmup_steps=2, z=1.5, decay=0.8, min_count=3)
  spread = []
  for state, leaves, _, want in _warmup_run(cfg, granularity="per_leaf"):
    assert state.chance_stats.shape == (len(SHAPES), 3)
    assert float(state.tau) == pytest.approx(np.mean(want), abs=1e-5)
    for leaf, tau, got in zip(leaves, want, state.accepted):
      accepted = oracle.sequential(oracle.flatten([leaf]), tau)[1]
      np.testing.assert_array_equal(got, accepted)
    spread.append(np.ptp(want))
  assert spread[0] == 0.0 and max(spread) > 0.01


def test_warmup_auto_tau_waits_for_min_count_after_the_warm_up():
  """Too few negative similarities by the end of the warm-up: it averages
  on until there are min_count of them."""
  tx = optax_gaf.gaf(
    optax_gaf.WarmupAutoTau(warmup_steps=1, min_count=2), num_microbatches=2
  )
  state = tx.init(jnp.zeros(2))
  agree = jnp.array([[1.0, 0.0], [1.0, 0.1]])
  conflict = jnp.array([[1.0, 0.0], [-0.2, 1.0]])  # similarity -0.196
  taus = []
  for grads in (conflict, agree, conflict, conflict):
    _, state = tx.update(grads, state)
    taus.append(round(float(state.tau), 3))
  assert taus == [2.0, 2.0, 2.0, 0.608]  # 2 negatives seen after step 3


@settings(max_examples=helpers.examples(10, 4), deadline=None)
@given(
  seed=st.integers(0, 2**16),
  warmup=st.integers(0, 3),
  n=st.integers(2, 5),
  z=st.floats(0.5, 3.0),
)
def test_warmup_auto_tau_is_averaging_then_autotau(seed, warmup, n, z):
  """Property: during the warm-up the update is the plain mean (gaf(2.0)),
  and every threshold is AutoTau's from the statistics gathered so far,
  the warm-up's included; with no warm-up it is AutoTau(warmup_tau=2)."""
  cfg = optax_gaf.WarmupAutoTau(warmup_steps=warmup, z=z, min_count=1)
  auto = optax_gaf.AutoTau(z=z, min_count=1, warmup_tau=2.0)
  txs = [optax_gaf.gaf(t, num_microbatches=n) for t in (cfg, auto, 2.0)]
  params = jnp.zeros(6)
  states = [tx.init(params) for tx in txs]
  rng = np.random.default_rng(seed)
  for step in range(warmup + 3):
    grads = jnp.asarray(rng.normal(size=(n, 6)) + 0.3, jnp.float32)
    stats = states[0].chance_stats
    out = [tx.update(grads, s) for tx, s in zip(txs, states)]
    states = [s for _, s in out]
    (u_warm, s_warm), (u_auto, s_auto), (u_mean, _) = out
    if step < warmup:
      np.testing.assert_allclose(u_warm, u_mean, rtol=1e-6, atol=1e-7)
      assert float(s_warm.tau) == 2.0
    else:
      want = _threshold.auto_threshold(stats, cfg.auto, jnp.float32)
      np.testing.assert_array_equal(s_warm.tau, want)
    if warmup == 0:
      np.testing.assert_array_equal(u_warm, u_auto)
      np.testing.assert_array_equal(s_warm.chance_stats, s_auto.chance_stats)


def test_warmup_auto_tau_state_keeps_its_shapes_and_checkpoints(tmp_path):
  tx = optax_gaf.gaf(optax_gaf.WarmupAutoTau(), num_microbatches=4)
  params = jnp.zeros(3)
  state = tx.init(params)
  assert state.tau_history is None and state.chance_stats.shape == (3,)
  assert float(state.tau) == 2.0
  new = jax.eval_shape(tx.update, jnp.ones((4, 3)), state, params)[1]
  shapes = lambda s: jax.tree.map(lambda x: (x.shape, x.dtype), s)
  assert shapes(new) == shapes(state)
  assert all(x.size for x in jax.tree.leaves(state))  # no zero-size arrays
  # A NumPy round trip of the leaves (what a checkpointer stores) resumes it.
  _, state = tx.update(jnp.ones((4, 3)), state)
  np.savez(tmp_path / "s.npz", *jax.tree.leaves(state))
  with np.load(tmp_path / "s.npz") as f:
    loaded = [f[f"arr_{i}"] for i in range(len(f.files))]
  restored = jax.tree.unflatten(jax.tree.structure(state), loaded)
  grads = jnp.asarray(np.random.default_rng(0).normal(size=(4, 3)), "float32")
  want, got = tx.update(grads, state), tx.update(grads, restored)
  helpers.assert_close(got, want)


def test_warmup_auto_tau_is_identical_on_every_device():
  n = 2 * helpers.D
  cfg = optax_gaf.WarmupAutoTau(warmup_steps=1, min_count=2)
  single = optax_gaf.gaf(cfg, num_microbatches=n)
  multi = optax_gaf.gaf(cfg, num_microbatches=n, axis_name="data")
  update = helpers.shard_map_update(multi, per_device=True)
  params = {"w": jnp.zeros(helpers.MESH_SHAPES[0])}
  params["b"] = jnp.zeros(helpers.MESH_SHAPES[1])
  s_single, s_multi = single.init(params), multi.init(params)
  rng = np.random.default_rng(11)
  taus = []
  for _ in range(3):
    leaves = helpers.make_microgradients(rng, n, helpers.MESH_SHAPES, 0.5)
    grads = helpers.tree(leaves, helpers.MESH_NAMES)
    want = jax.jit(single.update)(grads, s_single)
    got = update(helpers.shard(grads), s_multi)
    helpers.assert_same_on_every_device(got)
    got = helpers.first_device(got)
    helpers.assert_close(got, want)
    (_, s_single), (_, s_multi) = want, got
    taus.append(float(s_single.tau))
  assert taus[0] == 2.0 and taus[-1] < 2.0


@pytest.mark.parametrize(
  "cfg, error, match",
  [
    (optax_gaf.WarmupAutoTau(warmup_steps=-1), ValueError, "warmup_steps"),
    (optax_gaf.WarmupAutoTau(warmup_steps=10.0), TypeError, "warmup_steps"),
    (optax_gaf.WarmupAutoTau(warmup_steps=True), TypeError, "warmup_steps"),
    (optax_gaf.WarmupAutoTau(z=0.0), ValueError, r"WarmupAutoTau\.z"),
    (optax_gaf.WarmupAutoTau(decay=1.0), ValueError, "WarmupAutoTau.decay"),
    (optax_gaf.WarmupAutoTau(min_count=0), ValueError, "min_count"),
    (optax_gaf.WarmupAutoTau(floor=2.5), ValueError, "WarmupAutoTau.floor"),
  ],
)
def test_bad_warmup_auto_tau(cfg, error, match):
  with pytest.raises(error, match=match):
    optax_gaf.gaf(cfg)


def test_warmup_auto_tau_refused_where_no_state_keeps_it():
  cfg = optax_gaf.WarmupAutoTau()
  with pytest.raises(ValueError, match="drop adaptive_tau"):
    optax_gaf.gaf(cfg, adaptive_tau=optax_gaf.AdaptiveTau())
  with pytest.raises(TypeError, match="cap must be"):
    optax_gaf.gaf(optax_gaf.AdaptiveTau(cap=cfg))
  for make in (_streaming, _accumulator):
    with pytest.raises(TypeError, match="WarmupAutoTau needs"):
      make(cfg)


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
