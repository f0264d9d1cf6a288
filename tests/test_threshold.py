"""The threshold tau: range checks at every entry point, schedules,
inject_hyperparams and AdaptiveTau."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_gaf
from optax_gaf import _threshold
from tests import helpers
from tests import oracle
from tests.helpers import SHAPES

BAD_TAUS = [-0.1, -1.0, 2.5, 5.0, float("nan")]


def _streaming(tau):
  return optax_gaf.streaming_grads(lambda w, b: jnp.sum(w * b), 2, tau)


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
  tx = optax_gaf.gaf(tau, rule=rule, num_microbatches=n, adaptive_tau=cfg)
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
  with pytest.raises(error, match=match):
    optax_gaf.gaf(0.9, adaptive_tau=adaptive_tau)
