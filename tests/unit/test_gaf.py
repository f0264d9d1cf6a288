"""optax_gaf.gaf as an aggregator: input handling, its state, composition
with Optax, and its arguments. Per-leaf granularity:
tests/integration/test_per_leaf.py."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from optax.experimental import aggregating

import optax_gaf
from tests import helpers
from tests import oracle
from tests.helpers import SHAPES

# --- inputs


def test_outputs_keep_tree_and_shapes():
  leaves = helpers.clear_draw(
    0, 4, SHAPES, 0.7, helpers.decisions_clear("sequential", 1.0), flip_prob=0
  )
  updates, state = helpers.run_gaf(helpers.tree(leaves), 1.0, "sequential", 4)
  chex.assert_trees_all_equal_shapes_and_dtypes(
    updates, helpers.tree([x[0] for x in leaves])
  )
  assert int(state.num_accepted) > 1


@pytest.mark.parametrize("bad", [np.nan, np.inf, 0.0])
@pytest.mark.parametrize("rule", ["sequential", "pairwise"])
def test_unusable_microgradients_are_as_if_absent(bad, rule):
  leaves = helpers.clear_draw(
    3, 5, SHAPES, 0.7, helpers.decisions_clear(rule, 1.0)
  )
  poisoned = [x.copy() for x in leaves]
  for x in poisoned:
    x[0] = 0.0  # the would-be anchor is zero in every leaf
    x[3] = bad
  kept = [np.delete(x, [0, 3], axis=0) for x in leaves]
  updates, state = helpers.run_gaf(helpers.tree(poisoned), 1.0, rule, 5)
  want_updates, want_state = helpers.run_gaf(helpers.tree(kept), 1.0, rule, 3)
  chex.assert_trees_all_close(updates, want_updates, rtol=1e-6)
  assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))
  np.testing.assert_array_equal(
    np.delete(np.asarray(state.accepted), [0, 3]), want_state.accepted
  )
  assert not state.accepted[0] and not state.accepted[3]
  assert np.isnan(np.asarray(state.cosine_distance)[[0, 3]]).all()


def test_fewer_than_two_usable_is_a_no_agreement_step():
  grads = jnp.array([[1.0, 2.0], [0.0, 0.0], [jnp.nan, 1.0]])
  updates, state = helpers.run_gaf(grads, 2.0, "sequential", 3)
  np.testing.assert_array_equal(updates, [0.0, 0.0])
  assert not bool(state.ready)
  np.testing.assert_array_equal(state.accepted, [True, False, False])


def test_bf16_in_bf16_out_with_float32_decisions():
  def is_clear(leaves):
    bf16 = [
      np.asarray(jnp.asarray(x, jnp.bfloat16), np.float32) for x in leaves
    ]
    return helpers.decisions_clear("sequential", 1.0)(bf16)

  leaves = helpers.clear_draw(5, 6, SHAPES, 0.7, is_clear)
  bf16 = [jnp.asarray(x, jnp.bfloat16) for x in leaves]
  # Decide on the bf16-rounded values, in float64.
  want, want_accepted, _ = oracle.sequential(oracle.flatten(bf16), 1.0)
  updates, state = helpers.run_gaf(helpers.tree(bf16), 1.0, "sequential", 6)
  assert all(u.dtype == jnp.bfloat16 for u in jax.tree.leaves(updates))
  np.testing.assert_array_equal(state.accepted, want_accepted)
  np.testing.assert_allclose(
    helpers.flat_update(updates), want, rtol=1e-2, atol=1e-2
  )


def test_fewer_than_two_microgradients():
  tx = optax_gaf.gaf(0.9)
  with pytest.raises(ValueError, match="at least 2 microgradients"):
    tx.update(jnp.ones((1, 3)), tx.init(None))
  with pytest.raises(ValueError, match="num_microbatches must be >= 2"):
    optax_gaf.gaf(0.9, num_microbatches=1)


def test_num_microbatches_mismatch():
  tx = optax_gaf.gaf(0.9, num_microbatches=4)
  with pytest.raises(ValueError, match="num_microbatches=4.*got 3"):
    tx.update(jnp.ones((3, 2)), tx.init(None))


# --- state


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
  assert state.accepted is None and state.cosine_distance is None
  update = jax.jit(tx.update)
  for n in (2, 5):
    _, new = update(jnp.ones((n, 3)), state)
    chex.assert_trees_all_equal_shapes_and_dtypes(state, new)
    assert float(new.acceptance_rate) == 1.0 and int(new.num_accepted) == n


def test_gradient_diversity_matches_oracle_for_every_rule():
  leaves = helpers.make_microgradients(
    np.random.default_rng(11), 6, SHAPES, 0.5
  )
  want = oracle.gradient_diversity(oracle.flatten(leaves))
  for rule, granularity in (
    ("sequential", "global"),
    ("medoid", "global"),
    ("soft", "per_leaf"),
  ):
    _, state = helpers.run_gaf(
      helpers.tree(leaves), 0.9, rule, 6, granularity=granularity
    )
    assert float(state.gradient_diversity) == pytest.approx(want, rel=1e-4)


# --- composition with Optax


def _quadratic_problem(n=4, seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(n, 8, 3)), jnp.float32)
  y = jnp.asarray(rng.normal(size=(n, 8)), jnp.float32)
  params = {"w": jnp.zeros(3), "b": jnp.zeros(())}

  def loss(p, xb, yb):
    return jnp.mean((xb @ p["w"] + p["b"] - yb) ** 2)

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
  update = jax.jit(tx.update)
  mean = jax.tree.map(lambda g: g.mean(0), grads)
  for _ in range(3):
    updates, state = update(grads, state, params)
    ref_updates, ref_state = inner.update(mean, ref_state, params)
    chex.assert_trees_all_close(updates, ref_updates, rtol=1e-5, atol=1e-7)


def test_process_skips_inner_optimizer_on_no_agreement_step():
  params, grads = _quadratic_problem()
  tx = aggregating.process(
    optax.identity(), optax_gaf.gaf(0.5), optax.adamw(1e-2)
  )
  update = jax.jit(tx.update)
  state = tx.init(params)
  agreeing = jax.tree.map(lambda g: jnp.stack([g[0]] * 4), grads)
  updates, state = update(agreeing, state, params)
  assert bool(optax_gaf.stats(state)["ready"])
  adam_before = state[2]
  assert int(adam_before[0].count) == 1
  conflicting = jax.tree.map(
    lambda g: jnp.stack([g[0], -g[0], -g[0], -g[0]]), grads
  )
  updates, state = update(conflicting, state, params)
  assert not bool(optax_gaf.stats(state)["ready"])
  chex.assert_trees_all_equal(state[2], adam_before)
  chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, params))
  # Whereas a chain feeds zeros to adamw: its count and moments move.
  chained = optax.chain(optax_gaf.gaf(0.5), optax.adamw(1e-2))
  cstate = chained.init(params)
  _, cstate2 = chained.update(conflicting, cstate, params)
  assert int(cstate2[1][0].count) == int(cstate[1][0].count) + 1


def test_value_reaches_reduce_on_plateau_through_chain_and_process():
  """``update(..., value=loss)``: gaf passes extra args on, so a plateau
  scheduler later in the chain sees the loss."""
  params, grads = _quadratic_problem()
  plateau = optax.contrib.reduce_on_plateau(patience=1, factor=0.5)
  for tx in (
    optax.chain(optax_gaf.gaf(2.0), optax.sgd(0.1), plateau),
    aggregating.process(
      # optax.identity() takes no extra args; wrapped, it ignores them.
      optax.with_extra_args_support(optax.identity()),
      optax_gaf.gaf(2.0),
      optax.chain(optax.sgd(0.1), plateau),
    ),
  ):
    state = tx.init(params)
    update = jax.jit(tx.update)
    scales = []
    for loss in (1.0, 2.0, 2.0, 2.0):  # no improvement after the first
      updates, state = update(grads, state, params, value=jnp.float32(loss))
      scales.append(float(optax.tree.get(state, "scale")))
    assert scales[0] == 1.0 and scales[-1] < 1.0, scales
    lr = 0.1 * scales[-1]
    mean = jax.tree.map(lambda g, lr=lr: -lr * g.mean(0), grads)
    chex.assert_trees_all_close(updates, mean, rtol=1e-5, atol=1e-7)


# --- arguments


@pytest.mark.parametrize(
  "kwargs, match",
  [
    (dict(rule="sequential", temperature=0.1), "temperature"),
    (dict(rule="soft", temperature=0.0), "must be > 0"),
    (dict(rule="soft", temperature=-1.0), "must be > 0"),
    (dict(granularity="per_layer"), "granularity"),
  ],
)
def test_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    optax_gaf.gaf(0.9, **kwargs)
