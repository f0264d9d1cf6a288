"""Rules beyond the paper: medoid, soft, per_leaf granularity, adaptive tau."""

import functools

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
from optax_gaf import _rules
from tests import oracle

SHAPES = [(3, 4), (5,), (2, 2, 2)]


def _tree(leaves):
  return {"w": leaves[0], "b": leaves[1], "k": leaves[2]}


def _flat_updates(updates):
  return np.concatenate([np.ravel(updates[k]) for k in ("w", "b", "k")])


@functools.partial(
  jax.jit, static_argnames=("rule", "n", "granularity", "temperature")
)
def _run(grads, tau, rule, n, granularity="global", temperature=None):
  tx = optax_gaf.gaf(
    tau,
    rule=rule,
    num_microbatches=n,
    granularity=granularity,
    temperature=temperature,
  )
  params = jax.tree.map(lambda x: x[0], grads)
  return tx.update(grads, tx.init(params))


def _draw(n, tau, agreement, seed, shapes=SHAPES):
  """Microgradients whose pairwise distances are all clear of tau."""
  rng = np.random.default_rng(seed)
  for _ in range(50):
    leaves = oracle.make_microgradients(rng, n, shapes, agreement)
    if not oracle.is_ambiguous(
      oracle.pairwise_distances(oracle.flatten(leaves)), tau
    ):
      return leaves
  pytest.skip("no unambiguous draw")


@pytest.mark.parametrize("n", [2, 7])
@pytest.mark.parametrize("tau", [0.3, 0.9, 1.2])
@pytest.mark.parametrize("agreement", [0.3, 0.8])
def test_medoid_matches_float64_oracle(n, tau, agreement):
  leaves = _draw(
    n, tau, agreement, seed=oracle.seed_of("medoid", n, tau, agreement)
  )
  expected, accepted, dist = oracle.medoid(oracle.flatten(leaves), tau)
  updates, state = _run(_tree(leaves), tau, "medoid", n)
  np.testing.assert_array_equal(state.accepted, accepted)
  np.testing.assert_allclose(state.cosine_distance, dist, atol=2e-5)
  assert bool(state.ready) == (expected is not None)
  if expected is None:
    expected = np.zeros(sum(np.prod(s) for s in SHAPES))
  np.testing.assert_allclose(
    _flat_updates(updates), expected, rtol=2e-5, atol=2e-6
  )


@pytest.mark.parametrize("n", [7])
@pytest.mark.parametrize("tau", [0.5, 1.0])
@pytest.mark.parametrize("temperature", [0.02, 0.3, 3.0])
def test_soft_matches_float64_oracle(n, tau, temperature):
  leaves = _draw(n, tau, 0.5, seed=oracle.seed_of("soft", n, tau, temperature))
  expected, accepted, dist, _ = oracle.soft(
    oracle.flatten(leaves), tau, temperature
  )
  updates, state = _run(_tree(leaves), tau, "soft", n, temperature=temperature)
  np.testing.assert_array_equal(state.accepted, accepted)
  np.testing.assert_allclose(state.cosine_distance, dist, atol=2e-5)
  assert bool(state.ready) == (expected is not None)
  if expected is not None:
    np.testing.assert_allclose(
      _flat_updates(updates), expected, rtol=1e-4, atol=1e-5
    )


_medoid = jax.jit(_rules.medoid)
_soft = jax.jit(_rules.soft)


def _gram_inputs(flat):
  gram = jnp.asarray(flat @ flat.T, jnp.float32)
  return gram, jnp.ones(flat.shape[0], bool)


@settings(max_examples=30, deadline=None)
@given(
  n=st.sampled_from([4, 7]),
  seed=st.integers(0, 2**31 - 1),
  tau=st.sampled_from([0.4, 0.8, 1.0, 1.2]),
)
def test_medoid_is_permutation_invariant(n, seed, tau):
  rng = np.random.default_rng(seed)
  flat = oracle.flatten(oracle.make_microgradients(rng, n, [(6,)], 0.5))
  dist = oracle.pairwise_distances(flat)
  assume(not oracle.is_ambiguous(dist, tau))
  counts = (dist <= tau).sum(axis=1) - 1
  perm = rng.permutation(n)
  out = _medoid(*_gram_inputs(flat), tau)
  out_p = _medoid(*_gram_inputs(flat[perm]), tau)
  assert bool(out.ready) == bool(out_p.ready) == bool(counts.max() > 0)
  if (counts == counts.max()).sum() == 1:
    np.testing.assert_array_equal(
      np.asarray(out.accepted)[perm], out_p.accepted
    )
    np.testing.assert_allclose(
      np.asarray(out.weights)[perm], out_p.weights, rtol=1e-6
    )
  else:
    # Tied anchors: either order picks one with the most neighbours, so the
    # number taken is the same even where the members differ.
    assert int(out.accepted.sum()) == int(out_p.accepted.sum())


@settings(max_examples=25, deadline=None)
@given(
  n=st.sampled_from([2, 6]),
  seed=st.integers(0, 2**31 - 1),
  tau=st.sampled_from([0.3, 0.9, 1.1]),
)
def test_soft_temperature_limits(n, seed, tau):
  rng = np.random.default_rng(seed)
  flat = oracle.flatten(oracle.make_microgradients(rng, n, [(7,)], 0.5))
  assume(not oracle.is_ambiguous(oracle.pairwise_distances(flat), tau, 1e-3))
  gram, ok = _gram_inputs(flat)
  hard = _medoid(gram, ok, tau)
  cold = _soft(gram, ok, tau, temperature=1e-6)
  np.testing.assert_array_equal(cold.accepted, hard.accepted)
  assert bool(cold.ready) == bool(hard.ready)
  np.testing.assert_allclose(cold.weights, hard.weights, atol=1e-6)
  hot = _soft(gram, ok, tau, temperature=1e7)
  assert bool(hot.ready)
  np.testing.assert_allclose(hot.weights, np.full(n, 1.0 / n), rtol=1e-5)


@pytest.mark.parametrize("rule", ["sequential", "pairwise", "medoid", "soft"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_per_leaf_with_one_leaf_equals_global(rule, seed):
  rng = np.random.default_rng(seed)
  (x,) = oracle.make_microgradients(rng, 6, [(4, 5)], 0.5)
  (u_g, s_g), (u_l, s_l) = [
    _run(x, 0.9, rule, 6, granularity=g) for g in ("global", "per_leaf")
  ]
  np.testing.assert_array_equal(u_g, u_l)
  np.testing.assert_array_equal(s_g.accepted, s_l.accepted[0])
  np.testing.assert_array_equal(s_g.cosine_distance, s_l.cosine_distance[0])
  assert bool(s_g.ready) == bool(s_l.ready)
  assert float(s_g.acceptance_rate) == float(s_l.leaf_acceptance_rate[0])


ORACLES = {
  "sequential": oracle.sequential,
  "pairwise": oracle.pairwise,
  "medoid": oracle.medoid,
}


@pytest.mark.parametrize("rule", ["sequential", "pairwise", "medoid"])
def test_per_leaf_matches_oracle_on_every_leaf(rule):
  tau, n = 0.9, 6
  leaves = _draw(n, tau, 0.4, seed=7)
  tree = _tree(leaves)
  names = sorted(tree)  # jax.tree.leaves order, which per_leaf stats follow
  results = [ORACLES[rule](oracle.flatten([tree[k]]), tau) for k in names]
  for x, (_, _, dist) in zip(leaves, results):
    if oracle.is_ambiguous(dist, tau) or oracle.is_ambiguous(
      oracle.pairwise_distances(oracle.flatten([x])), tau
    ):
      pytest.skip("ambiguous leaf")
  updates, state = _run(tree, tau, rule, n, granularity="per_leaf")
  for l, (name, (expected, accepted, dist)) in enumerate(zip(names, results)):
    x = tree[name]
    np.testing.assert_array_equal(state.accepted[l], accepted)
    np.testing.assert_allclose(state.cosine_distance[l], dist, atol=2e-5)
    assert float(state.leaf_acceptance_rate[l]) == pytest.approx(
      accepted.mean()
    )
    want = np.zeros(x[0].size) if expected is None else expected
    np.testing.assert_allclose(
      np.ravel(updates[name]), want, rtol=2e-5, atol=2e-6
    )


def test_per_leaf_no_agreement_only_where_no_leaf_agrees():
  # Leaf "a" agrees, leaf "b" is orthogonal: "b" gets zeros, the step is ready.
  grads = {
    "a": jnp.array([[1.0, 0.0], [1.0, 0.1]]),
    "b": jnp.array([[1.0, 0.0], [0.0, 1.0]]),
  }
  params = {"a": jnp.zeros(2), "b": jnp.zeros(2)}
  tx = optax_gaf.gaf(0.5, granularity="per_leaf", num_microbatches=2)
  updates, state = jax.jit(tx.update)(grads, tx.init(params))
  np.testing.assert_allclose(updates["a"], [1.0, 0.05])
  np.testing.assert_array_equal(updates["b"], [0.0, 0.0])
  assert bool(state.ready)
  np.testing.assert_allclose(state.leaf_acceptance_rate, [1.0, 0.5])
  grads["a"] = grads["b"]
  _, state = jax.jit(tx.update)(grads, tx.init(params))
  assert not bool(state.ready) and int(state.skipped_steps) == 1


@pytest.mark.parametrize("rule", ["sequential", "medoid"])
def test_adaptive_tau_follows_oracle_over_steps(rule):
  cfg = optax_gaf.AdaptiveTau(k=0.5, history=7, min_count=3)
  tau, n = 1.1, 5
  tx = optax_gaf.gaf(tau, rule=rule, num_microbatches=n, adaptive_tau=cfg)
  params = {k: jnp.zeros(s) for k, s in zip("wbk", SHAPES)}
  state = tx.init(params)
  update = jax.jit(tx.update)
  rng = np.random.default_rng(3)
  recorded = []
  for _ in range(5):
    leaves = oracle.make_microgradients(rng, n, SHAPES, 0.6)
    want_tau = oracle.adaptive_tau(
      recorded, tau, cfg.k, cfg.history, cfg.min_count
    )
    _, state = update(dict(zip("wbk", leaves)), state, params)
    assert float(state.tau) == pytest.approx(want_tau, abs=1e-5)
    # Inner products, hence decisions, do not depend on the leaf order.
    _, _, dist = ORACLES[rule](oracle.flatten(leaves), float(state.tau))
    recorded += [d for d in dist if np.isfinite(d) and d != 0]
    hist = np.asarray(state.tau_history)
    got = hist[np.isfinite(hist)]
    np.testing.assert_allclose(got, recorded[-cfg.history :], atol=2e-5)


def test_adaptive_tau_never_exceeds_tau_and_waits_for_min_count():
  hist = jnp.array([jnp.nan, jnp.nan, 0.2, 0.4])
  assert float(_rules.adaptive_threshold(hist, 0.97, 1.0, 2)) == pytest.approx(
    0.3 + 0.1
  )
  assert float(_rules.adaptive_threshold(hist, 0.35, 1.0, 2)) == pytest.approx(
    0.35
  )
  assert float(_rules.adaptive_threshold(hist, 0.97, 1.0, 3)) == pytest.approx(
    0.97
  )


def test_record_distances_keeps_the_last_m_in_order():
  hist = jnp.full([4], jnp.nan)
  hist = _rules.record_distances(hist, jnp.array([0.0, 0.5, jnp.nan, 0.6]))
  np.testing.assert_allclose(hist[2:], [0.5, 0.6])
  assert np.isnan(hist[:2]).all()
  hist = _rules.record_distances(hist, jnp.array([0.7, 0.0, 0.8, 0.9]))
  np.testing.assert_allclose(hist, [0.6, 0.7, 0.8, 0.9])


def test_gradient_diversity_matches_oracle_for_every_rule():
  rng = np.random.default_rng(11)
  leaves = oracle.make_microgradients(rng, 6, SHAPES, 0.5)
  want = oracle.gradient_diversity(oracle.flatten(leaves))
  for rule, granularity in (("medoid", "global"), ("soft", "per_leaf")):
    _, state = _run(_tree(leaves), 0.9, rule, 6, granularity=granularity)
    assert float(state.gradient_diversity) == pytest.approx(want, rel=1e-4)


def test_stats_exposes_new_fields():
  tx = optax.chain(
    optax_gaf.gaf(
      0.9, granularity="per_leaf", adaptive_tau=optax_gaf.AdaptiveTau(history=4)
    ),
    optax.sgd(0.1),
  )
  params = {"a": jnp.zeros(2), "b": jnp.zeros(3)}
  state = tx.init(params)
  s = optax_gaf.stats(state)
  assert s["leaf_acceptance_rate"].shape == (2,)
  assert s["tau_history"].shape == (4,)


@pytest.mark.parametrize(
  "kwargs, error, match",
  [
    (dict(rule="sequential", temperature=0.1), ValueError, "temperature"),
    (dict(rule="soft", temperature=0.0), ValueError, "must be > 0"),
    (dict(rule="soft", temperature=-1.0), ValueError, "must be > 0"),
    (dict(granularity="per_layer"), ValueError, "granularity"),
    (dict(adaptive_tau=(1.0, 10)), TypeError, "AdaptiveTau"),
    (
      dict(adaptive_tau=optax_gaf.AdaptiveTau(history=1)),
      ValueError,
      "history",
    ),
    (
      dict(adaptive_tau=optax_gaf.AdaptiveTau(min_count=1)),
      ValueError,
      "min_count",
    ),
    (
      dict(adaptive_tau=optax_gaf.AdaptiveTau(k=float("nan"))),
      ValueError,
      "finite",
    ),
  ],
)
def test_bad_arguments(kwargs, error, match):
  with pytest.raises(error, match=match):
    optax_gaf.gaf(0.9, **kwargs)
