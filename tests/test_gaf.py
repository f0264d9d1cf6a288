"""Core tests of optax_gaf.gaf: oracle parity, properties, composition, errors."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from optax.experimental import aggregating

import optax_gaf
from tests import oracle

ORACLES = {"sequential": oracle.sequential, "pairwise": oracle.pairwise}
SHAPES = [(3, 4), (5,), (2, 2, 2)]


def _tree(leaves):
  return {"w": leaves[0], "b": leaves[1], "k": leaves[2]}


def _leaves(tree):
  return [tree["w"], tree["b"], tree["k"]]


def _unambiguous(rule, n, tau, agreement, seed):
  """Draws microgradients whose oracle decisions are clear of tau."""
  rng = np.random.default_rng(seed)
  for _ in range(50):
    leaves = oracle.make_microgradients(rng, n, SHAPES, agreement)
    expected = ORACLES[rule](oracle.flatten(leaves), tau)
    if not oracle.is_ambiguous(expected[2], tau):
      return leaves, expected
  pytest.skip("no unambiguous draw")


@functools.partial(jax.jit, static_argnames=("rule", "n"))
def _run(grads, tau, rule, n):
  tx = optax_gaf.gaf(tau, rule=rule, num_microbatches=n)
  return tx.update(grads, tx.init(None))


@pytest.mark.parametrize("rule", ["sequential", "pairwise"])
@pytest.mark.parametrize("n", [2, 3, 5, 8, 16])
@pytest.mark.parametrize("tau", [0.2, 0.9, 1.0, 1.3])
@pytest.mark.parametrize("agreement", [0.3, 0.7, 0.95])
def test_matches_float64_oracle(rule, n, tau, agreement):
  seed = hash((rule, n, tau, agreement)) % 2**32
  leaves, (expected, accepted, dist) = _unambiguous(
    rule, n, tau, agreement, seed
  )
  updates, state = _run(_tree(leaves), tau, rule, n)

  np.testing.assert_array_equal(state.accepted, accepted)
  np.testing.assert_allclose(state.cosine_distance, dist, atol=2e-5)
  assert bool(state.ready) == (expected is not None)
  assert int(state.num_accepted) == accepted.sum()
  got = np.concatenate([np.ravel(x) for x in _leaves(updates)])
  want = np.zeros_like(got) if expected is None else expected
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)


def test_outputs_keep_tree_and_shapes():
  leaves, _ = _unambiguous("sequential", 4, 1.0, 0.7, 0)
  updates, _ = _run(_tree(leaves), 1.0, "sequential", 4)
  chex.assert_trees_all_equal_shapes_and_dtypes(
    updates, jax.tree.map(lambda x: x[0], _tree(leaves))
  )


@settings(max_examples=25, deadline=None)
@given(
  n=st.integers(2, 9),
  seed=st.integers(0, 2**31),
  rule=st.sampled_from(["sequential", "pairwise"]),
)
def test_tau_two_accepts_everything(n, seed, rule):
  leaves = oracle.make_microgradients(
    np.random.default_rng(seed), n, SHAPES, 0.2, flip_prob=0.5
  )
  updates, state = _run(_tree(leaves), 2.0, rule, n)
  assert bool(state.ready) and bool(jnp.all(state.accepted))
  if rule == "sequential":  # tau=2 is the plain mean
    chex.assert_trees_all_close(
      updates,
      jax.tree.map(lambda x: x.mean(0), _tree(leaves)),
      rtol=1e-5,
      atol=1e-6,
    )


@settings(max_examples=25, deadline=None)
@given(
  n=st.integers(2, 9),
  seed=st.integers(0, 2**31),
  tau=st.floats(0.05, 1.95),
  rule=st.sampled_from(["sequential", "pairwise"]),
  common=st.floats(-3, 3),
  log_scales=st.lists(st.floats(-3, 3), min_size=9, max_size=9),
)
def test_positive_scaling_keeps_decisions(
  n, seed, tau, rule, common, log_scales
):
  """Cosine distance ignores scale, so decisions do too.

  A common factor on all microgradients changes nothing but the output's
  scale. A single microgradient's scale changes nothing when it does not
  enter a later comparison: the last one, or any rejected one (an accepted
  one's magnitude weights the running mean that later ones are compared to).
  """
  leaves = oracle.make_microgradients(
    np.random.default_rng(seed), n, SHAPES, 0.6
  )
  _, accepted, dist = ORACLES[rule](oracle.flatten(leaves), tau)
  if oracle.is_ambiguous(dist, tau, 1e-3):
    return
  own = 10.0 ** np.asarray(log_scales[:n], np.float32)
  own = np.where(~accepted | (np.arange(n) == n - 1), own, 1.0)
  scales = (10.0 ** np.float32(common)) * own
  scaled = [x * scales.reshape((n,) + (1,) * (x.ndim - 1)) for x in leaves]
  _, s1 = _run(_tree(leaves), tau, rule, n)
  _, s2 = _run(_tree(scaled), tau, rule, n)
  np.testing.assert_array_equal(s1.accepted, accepted)
  np.testing.assert_array_equal(s2.accepted, accepted)
  assert bool(s1.ready) == bool(s2.ready)


@settings(max_examples=25, deadline=None)
@given(
  n=st.integers(2, 12),
  seed=st.integers(0, 2**31),
  tau=st.floats(1e-3, 2.0),
  rule=st.sampled_from(["sequential", "pairwise"]),
)
def test_identical_microgradients_all_accepted(n, seed, tau, rule):
  g = [
    np.random.default_rng(seed).normal(size=s).astype(np.float32)
    for s in SHAPES
  ]
  leaves = [np.broadcast_to(x, (n,) + x.shape) for x in g]
  updates, state = _run(_tree(leaves), tau, rule, n)
  assert bool(state.ready) and int(state.num_accepted) == n
  chex.assert_trees_all_close(updates, _tree(g), rtol=1e-5)


def test_no_agreement_step_returns_zeros_and_marks_only_the_anchor():
  grads = jnp.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]])
  for rule in ("sequential", "pairwise"):
    updates, state = _run(grads, 0.5, rule, 3)
    np.testing.assert_array_equal(updates, [0.0, 0.0])
    assert not bool(state.ready)
    np.testing.assert_array_equal(state.accepted, [True, False, False])
    assert int(state.num_accepted) == 1 and int(state.skipped_steps) == 1


@pytest.mark.parametrize("bad", [np.nan, np.inf, 0.0])
@pytest.mark.parametrize("rule", ["sequential", "pairwise"])
def test_unusable_microgradients_are_as_if_absent(bad, rule):
  leaves, _ = _unambiguous(rule, 5, 1.0, 0.7, 3)
  poisoned = [x.copy() for x in leaves]
  for x in poisoned:
    x[0] = 0.0  # the would-be anchor is zero in every leaf
    x[3] = bad
  kept = [np.delete(x, [0, 3], axis=0) for x in leaves]
  updates, state = _run(_tree(poisoned), 1.0, rule, 5)
  want_updates, want_state = _run(_tree(kept), 1.0, rule, 3)
  chex.assert_trees_all_close(updates, want_updates, rtol=1e-6)
  assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))
  np.testing.assert_array_equal(
    np.delete(np.asarray(state.accepted), [0, 3]), want_state.accepted
  )
  assert not state.accepted[0] and not state.accepted[3]
  assert np.isnan(state.cosine_distance[0]) and np.isnan(
    state.cosine_distance[3]
  )


def test_fewer_than_two_usable_is_a_no_agreement_step():
  grads = jnp.array([[1.0, 2.0], [0.0, 0.0], [jnp.nan, 1.0]])
  updates, state = _run(grads, 2.0, "sequential", 3)
  np.testing.assert_array_equal(updates, [0.0, 0.0])
  assert not bool(state.ready)
  np.testing.assert_array_equal(state.accepted, [True, False, False])


def test_bf16_in_bf16_out_with_float32_decisions():
  leaves, (expected, accepted, _) = _unambiguous("sequential", 6, 1.0, 0.7, 5)
  bf16 = [jnp.asarray(x, jnp.bfloat16) for x in leaves]
  # Decide on the bf16-rounded values, in float64.
  want, want_accepted, dist = oracle.sequential(oracle.flatten(bf16), 1.0)
  assert not oracle.is_ambiguous(dist, 1.0)
  updates, state = _run(_tree(bf16), 1.0, "sequential", 6)
  assert all(u.dtype == jnp.bfloat16 for u in jax.tree.leaves(updates))
  np.testing.assert_array_equal(state.accepted, want_accepted)
  got = np.concatenate(
    [np.ravel(np.asarray(x, np.float32)) for x in _leaves(updates)]
  )
  np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-2)


def test_state_shapes_fixed_and_scan_friendly():
  params = {"w": jnp.zeros((3,)), "b": jnp.zeros(())}
  tx = optax.chain(optax_gaf.gaf(0.9, num_microbatches=4), optax.adamw(1e-2))
  state0 = tx.init(params)
  rng = np.random.default_rng(0)
  gs = {
    "w": jnp.asarray(rng.normal(size=(5, 4, 3)), jnp.float32),
    "b": jnp.asarray(rng.normal(size=(5, 4)), jnp.float32),
  }

  def step(carry, g):
    p, s = carry
    u, s = tx.update(g, s, p)
    return (optax.apply_updates(p, u), s), None

  (_, state), _ = jax.lax.scan(step, (params, state0), gs)
  chex.assert_trees_all_equal_shapes_and_dtypes(state0, state)
  assert int(optax_gaf.stats(state)["count"]) == 5


def test_without_num_microbatches_state_is_n_independent():
  tx = optax_gaf.gaf(2.0)
  state = tx.init(None)
  for n in (2, 5):
    _, new = jax.jit(tx.update)(jnp.ones((n, 3)), state)
    chex.assert_trees_all_equal_shapes_and_dtypes(state, new)
    assert float(new.acceptance_rate) == 1.0


def _quadratic_problem(n=4, seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(n, 8, 3)), jnp.float32)
  y = jnp.asarray(rng.normal(size=(n, 8)), jnp.float32)
  params = {"w": jnp.zeros(3), "b": jnp.zeros(())}
  loss = lambda p, xb, yb: jnp.mean((xb @ p["w"] + p["b"] - yb) ** 2)
  grads = jax.vmap(jax.grad(loss), in_axes=(None, 0, 0))(params, x, y)
  return params, grads


@pytest.mark.parametrize(
  "inner",
  [optax.sgd(0.1, momentum=0.9), optax.adamw(1e-2)],
  ids=["sgd_m", "adamw"],
)
def test_chain_equals_inner_optimizer_on_the_filtered_gradient(inner):
  params, grads = _quadratic_problem()
  tx = optax.chain(optax_gaf.gaf(2.0), inner)
  state = tx.init(params)
  ref_state = inner.init(params)
  for _ in range(3):
    updates, state = jax.jit(tx.update)(grads, state, params)
    mean = jax.tree.map(lambda g: g.mean(0), grads)
    ref_updates, ref_state = inner.update(mean, ref_state, params)
    chex.assert_trees_all_close(updates, ref_updates, rtol=1e-5, atol=1e-7)


def test_inject_hyperparams_and_schedule():
  params, grads = _quadratic_problem()
  tx = optax.chain(
    optax.inject_hyperparams(optax_gaf.gaf)(tau=0.0), optax.sgd(1.0)
  )
  state = tx.init(params)
  _, state = jax.jit(tx.update)(grads, state, params)
  assert not bool(optax_gaf.stats(state)["ready"])
  state[0].hyperparams["tau"] = jnp.asarray(2.0)
  updates, state = jax.jit(tx.update)(grads, state, params)
  assert bool(optax_gaf.stats(state)["ready"])
  chex.assert_trees_all_close(
    updates, jax.tree.map(lambda g: -g.mean(0), grads), rtol=1e-5
  )

  # A schedule: tau=0 at step 0 (nothing agrees), 2 afterwards.
  tx = optax_gaf.gaf(lambda count: jnp.where(count < 1, 0.0, 2.0))
  state = tx.init(params)
  _, state = tx.update(grads, state)
  assert not bool(state.ready) and float(state.tau) == 0.0
  _, state = tx.update(grads, state)
  assert bool(state.ready) and float(state.tau) == 2.0


def test_process_skips_inner_optimizer_on_no_agreement_step():
  params, grads = _quadratic_problem()
  tx = aggregating.process(
    optax.identity(), optax_gaf.gaf(0.5), optax.adamw(1e-2)
  )
  state = tx.init(params)
  agreeing = jax.tree.map(lambda g: jnp.stack([g[0]] * 4), grads)
  updates, state = jax.jit(tx.update)(agreeing, state, params)
  assert bool(optax_gaf.stats(state)["ready"])
  adam_before = state[2]
  assert int(adam_before[0].count) == 1
  conflicting = jax.tree.map(
    lambda g: jnp.stack([g[0], -g[0], -g[0], -g[0]]), grads
  )
  updates, state = jax.jit(tx.update)(conflicting, state, params)
  assert not bool(optax_gaf.stats(state)["ready"])
  chex.assert_trees_all_equal(state[2], adam_before)
  chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, params))
  # Whereas a chain feeds zeros to adamw: its count and moments move.
  chained = optax.chain(optax_gaf.gaf(0.5), optax.adamw(1e-2))
  cstate = chained.init(params)
  _, cstate2 = chained.update(conflicting, cstate, params)
  assert int(cstate2[1][0].count) == int(cstate[1][0].count) + 1


def test_stats_reads_through_any_nesting():
  params, grads = _quadratic_problem()
  for tx in (
    optax.chain(optax_gaf.gaf(1.5, num_microbatches=4), optax.sgd(0.1)),
    aggregating.process(
      optax.identity(), optax_gaf.gaf(1.5, num_microbatches=4), optax.sgd(0.1)
    ),
  ):
    state = tx.init(params)
    _, state = tx.update(grads, state, params)
    s = optax_gaf.stats(state)
    assert s["accepted"].shape == (4,)
    np.testing.assert_array_equal(
      optax.tree.get(state, "accepted"), s["accepted"]
    )
    assert float(s["acceptance_rate"]) == pytest.approx(
      int(s["num_accepted"]) / 4
    )
  with pytest.raises(ValueError, match="no GAFState"):
    optax_gaf.stats(optax.sgd(0.1).init(params))


@pytest.mark.parametrize("tau", [-0.1, 2.5, float("nan")])
def test_tau_out_of_range(tau):
  with pytest.raises(ValueError, match="tau"):
    optax_gaf.gaf(tau)


def test_schedule_out_of_range():
  with pytest.raises(ValueError, match="tau"):
    optax_gaf.gaf(lambda count: 3.0)


def test_unknown_rule():
  with pytest.raises(ValueError, match="Unknown GAF rule 'median'"):
    optax_gaf.gaf(0.9, rule="median")


def test_leading_axes_differ():
  tx = optax_gaf.gaf(0.9)
  with pytest.raises(ValueError, match="leading microbatch axis"):
    tx.update({"a": jnp.ones((3, 2)), "b": jnp.ones((4,))}, tx.init(None))


def test_fewer_than_two_microgradients():
  tx = optax_gaf.gaf(0.9)
  with pytest.raises(ValueError, match="at least 2 microgradients"):
    tx.update(jnp.ones((1, 3)), tx.init(None))
  with pytest.raises(ValueError, match="num_microbatches >= 2"):
    optax_gaf.gaf(0.9, num_microbatches=1)


def test_scalar_leaf_is_rejected():
  tx = optax_gaf.gaf(0.9)
  with pytest.raises(ValueError, match="leading microbatch axis"):
    tx.update({"a": jnp.ones(())}, tx.init(None))


def test_trailing_shapes_must_match_params():
  params = {"w": jnp.zeros((3, 2))}
  tx = optax_gaf.gaf(0.9)
  with pytest.raises(ValueError, match=r"\['w'\].*\(3, 2\)"):
    tx.update({"w": jnp.ones((4, 2, 3))}, tx.init(params), params)
  with pytest.raises(ValueError, match="tree structures"):
    tx.update({"v": jnp.ones((4, 3, 2))}, tx.init(params), params)
  with pytest.raises(ValueError, match="trailing shape"):
    # An averaged gradient passed by mistake.
    tx.update({"w": jnp.ones((3, 2))}, tx.init(params), params)


def test_num_microbatches_mismatch():
  tx = optax_gaf.gaf(0.9, num_microbatches=4)
  with pytest.raises(ValueError, match="num_microbatches=4.*got 3"):
    tx.update(jnp.ones((3, 2)), tx.init(None))


def test_num_microbatches_must_be_static_under_inject_hyperparams():
  tx = optax.inject_hyperparams(optax_gaf.gaf)(tau=0.9, num_microbatches=4)
  state = tx.init(jnp.zeros(2))
  with pytest.raises(TypeError, match="static_args"):
    jax.jit(tx.update)(jnp.ones((4, 2)), state)
  tx = optax.inject_hyperparams(
    optax_gaf.gaf, static_args=("num_microbatches",)
  )(tau=0.9, num_microbatches=4)
  state = tx.init(jnp.zeros(2))
  _, state = jax.jit(tx.update)(jnp.ones((4, 2)), state)
  assert optax_gaf.stats(state)["accepted"].shape == (4,)
