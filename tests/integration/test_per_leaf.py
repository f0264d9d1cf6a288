"""granularity="per_leaf": each parameter tensor filtered on its own.

What per_leaf itself does, with every rule (a custom one too) and against the
float64 oracle leaf by leaf. Where per_leaf is a case of another feature's
test, it stays with that feature (the placements in tests/unit/, AutoTau in
tests/unit/test_threshold.py, stats in tests/unit/test_stats.py, FSDP and
multi_transform in tests/integration/).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_gaf
from tests import helpers
from tests import oracle
from tests.helpers import SHAPES

# --- gaf(granularity='per_leaf')


@pytest.mark.parametrize("rule", ["sequential", "pairwise", "medoid", "soft"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_per_leaf_with_one_leaf_equals_global(rule, seed):
  rng = np.random.default_rng(seed)
  (x,) = helpers.make_microgradients(rng, 6, [(4, 5)], 0.5)
  (u_g, s_g), (u_l, s_l) = [
    helpers.run_gaf(x, 0.9, rule, 6, granularity=g)
    for g in ("global", "per_leaf")
  ]
  np.testing.assert_array_equal(u_g, u_l)
  np.testing.assert_array_equal(s_g.accepted, s_l.accepted[0])
  np.testing.assert_array_equal(s_g.cosine_distance, s_l.cosine_distance[0])
  assert bool(s_g.ready) == bool(s_l.ready)
  assert float(s_g.acceptance_rate) == float(s_l.leaf_acceptance_rate[0])


@pytest.mark.parametrize("rule", ["sequential", "pairwise", "medoid"])
def test_per_leaf_matches_oracle_on_every_leaf(rule):
  tau, n = 0.9, 6

  def is_clear(leaves):
    return all(
      helpers.decisions_clear(rule, tau)([x]) and helpers.pairs_clear(tau)([x])
      for x in leaves
    )

  leaves = helpers.clear_draw(7, n, SHAPES, 0.4, is_clear)
  grads = helpers.tree(leaves)
  updates, state = helpers.run_gaf(grads, tau, rule, n, granularity="per_leaf")
  # Per-leaf statistics follow jax.tree.leaves order (sorted dict keys).
  for i, name in enumerate(sorted(grads)):
    x = grads[name]
    want, accepted, dist = helpers.ORACLES[rule](oracle.flatten([x]), tau)
    np.testing.assert_array_equal(state.accepted[i], accepted)
    np.testing.assert_allclose(state.cosine_distance[i], dist, atol=2e-5)
    assert float(state.leaf_acceptance_rate[i]) == pytest.approx(
      accepted.mean()
    )
    want = np.zeros(x[0].size) if want is None else want
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


def test_per_leaf_update_with_another_tree_than_init_is_refused():
  tx = optax_gaf.gaf(0.5, granularity="per_leaf")
  state = tx.init({"a": jnp.zeros(2), "b": jnp.zeros(2)})
  with pytest.raises(ValueError, match="initialised for 2 leaves.*with 3"):
    tx.update(
      {"a": jnp.ones((3, 2)), "b": jnp.ones((3, 2)), "c": jnp.ones((3, 1))},
      state,
    )
  with pytest.raises(ValueError, match="pass them to init"):
    tx.init(None)


def _micro(signs, params, seed=0):
  """Microgradients ``[len(signs), *shape]``: signed direction + 10% noise
  (as in tests/integration/test_compat.py)."""
  rng = np.random.default_rng(seed)
  s = np.asarray(signs, np.float64)

  def leaf(p):
    d = rng.normal(size=p.shape)
    noise = rng.normal(size=(len(s),) + p.shape)
    x = s.reshape((-1,) + (1,) * p.ndim) * d + 0.1 * noise
    return jnp.asarray(x, jnp.float32)

  return jax.tree.map(leaf, params)


def test_per_leaf_nan_in_one_leaf_drops_it_from_that_leaf_only():
  """With per_leaf, a microgradient with a NaN in one leaf still counts in
  the other leaves (global granularity drops it everywhere)."""
  params = {
    "w": jnp.linspace(-1.0, 1.0, 6).reshape(3, 2),
    "b": jnp.array([0.5, -0.25]),
  }
  grads = _micro((1, 1, 1, 1), params)
  grads["b"] = grads["b"].at[2, 0].set(jnp.nan)
  agg = optax_gaf.gaf(2.0, num_microbatches=4, granularity="per_leaf")
  u, state = jax.jit(agg.update)(grads, agg.init(params), params)
  accepted = dict(zip(("b", "w"), np.asarray(state.accepted)))
  np.testing.assert_array_equal(accepted["b"], [True, True, False, True])
  np.testing.assert_array_equal(accepted["w"], [True, True, True, True])
  b = np.asarray(grads["b"], np.float64)
  np.testing.assert_allclose(u["b"], b[[0, 1, 3]].mean(axis=0), rtol=1e-6)
  w = np.asarray(grads["w"], np.float64)
  np.testing.assert_allclose(u["w"], w.mean(axis=0), rtol=1e-6)
  agg = optax_gaf.gaf(2.0, num_microbatches=4)
  u, state = jax.jit(agg.update)(grads, agg.init(params), params)
  np.testing.assert_array_equal(state.accepted, [True, True, False, True])
  np.testing.assert_allclose(u["w"], w[[0, 1, 3]].mean(axis=0), rtol=1e-6)


# --- custom rules


def _custom_clear(tau):
  def is_clear(leaves):
    dist = oracle.near_mean(oracle.flatten(leaves), tau)[2]
    return not oracle.is_ambiguous(dist, tau)

  return is_clear


def test_custom_rule_per_leaf_matches_oracle_on_every_leaf():
  n, tau = 5, 0.8

  def is_clear(leaves):
    return all(_custom_clear(tau)([x]) for x in leaves)

  leaves = helpers.clear_draw(3, n, SHAPES, 0.5, is_clear)
  grads = helpers.tree(leaves)
  tx = optax_gaf.gaf(
    tau, rule=helpers.near_mean, num_microbatches=n, granularity="per_leaf"
  )
  params = helpers.params_like(grads)
  updates, state = jax.jit(tx.update)(grads, tx.init(params), params)
  for i, name in enumerate(sorted(grads)):  # jax.tree.leaves order
    want, accepted, dist = oracle.near_mean(oracle.flatten([grads[name]]), tau)
    np.testing.assert_array_equal(state.accepted[i], accepted)
    np.testing.assert_allclose(state.cosine_distance[i], dist, atol=2e-5)
    if want is None:
      want = np.zeros(grads[name][0].size)
    np.testing.assert_allclose(
      np.ravel(updates[name]), want, rtol=2e-5, atol=2e-6
    )
