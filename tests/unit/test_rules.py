"""optax_gaf.rules: every rule against its float64 oracle, rule properties, and
the custom-rule API (``gaf(rule=fn)``)."""

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
from optax_gaf import rules
from tests import helpers
from tests import oracle
from tests.helpers import SHAPES

# --- built-in rules through gaf, one device


@pytest.mark.parametrize("rule", ["sequential", "pairwise"])
@pytest.mark.parametrize("n", [2, 3, 5, 8, 16])
@pytest.mark.parametrize("tau", [0.2, 0.9, 1.0, 1.3])
@pytest.mark.parametrize("agreement", [0.3, 0.7, 0.95])
def test_running_rules_match_float64_oracle(rule, n, tau, agreement):
  leaves = helpers.clear_draw(
    helpers.seed_of(rule, n, tau, agreement),
    n,
    SHAPES,
    agreement,
    helpers.decisions_clear(rule, tau),
  )
  updates, state = helpers.run_gaf(helpers.tree(leaves), tau, rule, n)
  helpers.assert_matches_oracle(updates, state, leaves, rule, tau)


@pytest.mark.parametrize("n", [2, 7])
@pytest.mark.parametrize("tau", [0.3, 0.9, 1.2])
@pytest.mark.parametrize("agreement", [0.3, 0.8])
def test_medoid_matches_float64_oracle(n, tau, agreement):
  leaves = helpers.clear_draw(
    helpers.seed_of("medoid", n, tau, agreement),
    n,
    SHAPES,
    agreement,
    helpers.pairs_clear(tau),
  )
  updates, state = helpers.run_gaf(helpers.tree(leaves), tau, "medoid", n)
  helpers.assert_matches_oracle(updates, state, leaves, "medoid", tau)


@pytest.mark.parametrize("tau", [0.5, 1.0])
@pytest.mark.parametrize("temperature", [0.02, 0.3, 3.0])
def test_soft_matches_float64_oracle(tau, temperature):
  n = 7
  leaves = helpers.clear_draw(
    helpers.seed_of("soft", n, tau, temperature),
    n,
    SHAPES,
    0.5,
    helpers.pairs_clear(tau),
  )
  want, accepted, dist, _ = oracle.soft(
    oracle.flatten(leaves), tau, temperature
  )
  updates, state = helpers.run_gaf(
    helpers.tree(leaves), tau, "soft", n, temperature=temperature
  )
  np.testing.assert_array_equal(state.accepted, accepted)
  np.testing.assert_allclose(state.cosine_distance, dist, atol=2e-5)
  assert bool(state.ready) == (want is not None)
  got = helpers.flat_update(updates)
  if want is None:
    np.testing.assert_array_equal(got, 0.0)
  else:
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


# --- properties of the running rules


# The sizes of test_running_rules_match_float64_oracle: run_gaf is compiled
# for them already, so the property tests below cost no compilation.
SIZES = st.sampled_from([2, 3, 5, 8, 16])


@settings(max_examples=25, deadline=None)
@given(
  n=SIZES,
  seed=st.integers(0, 2**31),
  rule=st.sampled_from(["sequential", "pairwise"]),
)
def test_tau_two_accepts_everything(n, seed, rule):
  leaves = helpers.make_microgradients(
    np.random.default_rng(seed), n, SHAPES, 0.2, flip_prob=0.5
  )
  updates, state = helpers.run_gaf(helpers.tree(leaves), 2.0, rule, n)
  assert bool(state.ready) and bool(jnp.all(state.accepted))
  if rule == "sequential":  # tau=2 is the plain mean
    helpers.assert_close(
      updates,
      helpers.tree([x.mean(0) for x in leaves]),
      rtol=1e-5,
      atol=1e-6,
    )


@settings(max_examples=25, deadline=None)
@given(
  n=SIZES,
  seed=st.integers(0, 2**31),
  tau=st.floats(0.05, 1.95),
  rule=st.sampled_from(["sequential", "pairwise"]),
  common=st.floats(-3, 3),
  log_scales=st.lists(st.floats(-3, 3), min_size=16, max_size=16),
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
  leaves = helpers.make_microgradients(
    np.random.default_rng(seed), n, SHAPES, 0.6
  )
  _, accepted, dist = helpers.ORACLES[rule](oracle.flatten(leaves), tau)
  assume(not oracle.is_ambiguous(dist, tau, 1e-3))
  own = 10.0 ** np.asarray(log_scales[:n], np.float32)
  own = np.where(~accepted | (np.arange(n) == n - 1), own, 1.0)
  scales = (10.0 ** np.float32(common)) * own
  scaled = [x * scales.reshape((n,) + (1,) * (x.ndim - 1)) for x in leaves]
  _, s1 = helpers.run_gaf(helpers.tree(leaves), tau, rule, n)
  _, s2 = helpers.run_gaf(helpers.tree(scaled), tau, rule, n)
  np.testing.assert_array_equal(s1.accepted, accepted)
  np.testing.assert_array_equal(s2.accepted, accepted)
  assert bool(s1.ready) == bool(s2.ready)


@settings(max_examples=25, deadline=None)
@given(
  n=SIZES,
  seed=st.integers(0, 2**31),
  tau=st.floats(1e-3, 2.0),
  rule=st.sampled_from(["sequential", "pairwise"]),
)
def test_identical_microgradients_all_accepted(n, seed, tau, rule):
  rng = np.random.default_rng(seed)
  g = [rng.normal(size=s).astype(np.float32) for s in SHAPES]
  leaves = [np.broadcast_to(x, (n,) + x.shape) for x in g]
  updates, state = helpers.run_gaf(helpers.tree(leaves), tau, rule, n)
  assert bool(state.ready) and int(state.num_accepted) == n
  helpers.assert_close(updates, helpers.tree(g), rtol=1e-5, atol=0)


@pytest.mark.parametrize("rule", ["sequential", "pairwise"])
def test_no_agreement_step_returns_zeros_and_marks_only_the_anchor(rule):
  grads = jnp.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]])
  updates, state = helpers.run_gaf(grads, 0.5, rule, 3)
  np.testing.assert_array_equal(updates, [0.0, 0.0])
  assert not bool(state.ready)
  np.testing.assert_array_equal(state.accepted, [True, False, False])
  assert int(state.num_accepted) == 1 and int(state.skipped_steps) == 1


# --- medoid and soft on the Gram matrix

_medoid = jax.jit(rules.medoid)
_soft = jax.jit(rules.soft, static_argnames="temperature")


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
  flat = oracle.flatten(helpers.make_microgradients(rng, n, [(6,)], 0.5))
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
  flat = oracle.flatten(helpers.make_microgradients(rng, n, [(7,)], 0.5))
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


def test_cosine_distance_of_a_zero_norm_is_one_and_clipped_to_0_2():
  d = rules.cosine_distance(
    jnp.array([0.0, 2.0, -2.0, 1.0 + 1e-7]),
    jnp.array([0.0, 1.0, 1.0, 1.0]),
    jnp.array([1.0, 4.0, 4.0, 1.0]),
  )
  np.testing.assert_allclose(d, [1.0, 0.0, 2.0, 0.0], atol=1e-7)
  assert float(d[3]) == 0.0  # a rounding cosine above 1 is clipped


def test_running_rules_on_the_gram_matrix_match_oracle():
  """rules.sequential / rules.pairwise called directly, as a custom caller
  would."""
  flat = np.array(
    [[1.0, 0.0, 0.0], [1.0, 0.3, 0.0], [-1.0, 0.0, 0.0], [1.0, -0.2, 0.1]]
  )
  gram, ok = _gram_inputs(flat)
  for name, fn in (
    ("sequential", rules.sequential),
    ("pairwise", rules.pairwise),
  ):
    _, accepted, dist = helpers.ORACLES[name](flat, 0.5)
    out = jax.jit(fn)(gram, ok, 0.5)
    np.testing.assert_array_equal(out.accepted, accepted)
    np.testing.assert_allclose(out.cosine_distance, dist, atol=1e-6)
    assert bool(out.ready)
  assert set(rules.__all__) >= {"sequential", "pairwise", "medoid", "soft"}


# --- custom rules: gaf(rule=fn)


def _custom_clear(tau):
  def is_clear(leaves):
    dist = oracle.near_mean(oracle.flatten(leaves), tau)[2]
    return not oracle.is_ambiguous(dist, tau)

  return is_clear


def _poisoned(leaves):
  """An unusable one: excluded before the rule sees it."""
  leaves = [x.copy() for x in leaves]
  leaves[0][2] = np.nan
  return leaves


@pytest.mark.parametrize("tau", [0.3, 0.8])
def test_custom_rule_matches_float64_oracle(tau):
  n = 6

  def is_clear(leaves):
    leaves = _poisoned(leaves)
    accepted = oracle.near_mean(oracle.flatten(leaves), tau)[1]
    # Some accepted, some rejected.
    return _custom_clear(tau)(leaves) and 2 <= accepted.sum() < n - 1

  leaves = _poisoned(
    helpers.clear_draw(helpers.seed_of("near_mean", tau), n, SHAPES, 0.8,
                       is_clear)
  )  # fmt: skip
  want, accepted, dist = oracle.near_mean(oracle.flatten(leaves), tau)
  tx = optax_gaf.gaf(tau, rule=helpers.near_mean, num_microbatches=n)
  updates, state = jax.jit(tx.update)(helpers.tree(leaves), tx.init(None))
  np.testing.assert_array_equal(state.accepted, accepted)
  np.testing.assert_allclose(state.cosine_distance, dist, atol=2e-5)
  assert bool(state.ready)
  np.testing.assert_allclose(
    helpers.flat_update(updates), want, rtol=2e-5, atol=2e-6
  )


def test_custom_rule_across_devices_equals_one_device():
  n, tau = 2 * helpers.D, 0.8
  names = helpers.MESH_NAMES
  leaves = helpers.clear_draw(
    7, n, helpers.MESH_SHAPES, 0.6, _custom_clear(tau)
  )
  grads = helpers.tree(leaves, names)
  one = optax_gaf.gaf(tau, rule=helpers.near_mean, num_microbatches=n)
  on_one = jax.jit(one.update)(grads, one.init(None))
  multi = optax_gaf.gaf(
    tau, rule=helpers.near_mean, num_microbatches=n, axis_name="data"
  )
  got = helpers.shard_map_update(multi, per_device=True)(
    helpers.shard(grads), multi.init(None)
  )
  helpers.assert_same_on_every_device(got)
  first = helpers.first_device(got)
  helpers.assert_close(first, on_one)
  want, accepted, dist = oracle.near_mean(oracle.flatten(leaves), tau)
  np.testing.assert_array_equal(first[1].accepted, accepted)
  np.testing.assert_allclose(first[1].cosine_distance, dist, atol=2e-5)
  np.testing.assert_allclose(
    helpers.flat_update(first[0], names), want, rtol=2e-5, atol=2e-6
  )
  assert 2 <= accepted.sum() < n  # some accepted, some rejected


def test_unhashable_callable_rule_works():
  class Rule:
    __hash__ = None  # e.g. a dataclass with eq=True

    def __call__(self, gram, usable, tau):
      return helpers.near_mean(gram, usable, tau)

  grads = jnp.array([[1.0, 0.0], [1.0, 0.1], [-1.0, 0.5]])
  tx = optax_gaf.gaf(0.5, rule=Rule(), num_microbatches=3)
  updates, state = tx.update(grads, tx.init(None))
  np.testing.assert_allclose(updates, [1.0, 0.05])
  np.testing.assert_array_equal(state.accepted, [True, True, False])


def _bad_shapes(gram, usable, tau):
  out = helpers.near_mean(gram, usable, tau)
  return out._replace(weights=jnp.zeros(usable.shape[-1] + 1))


def _bad_ready(gram, usable, tau):
  out = helpers.near_mean(gram, usable, tau)
  return out._replace(ready=usable)


@pytest.mark.parametrize("granularity", ["global", "per_leaf"])
@pytest.mark.parametrize("rule", [_bad_shapes, _bad_ready])
def test_custom_rule_with_wrong_shapes_is_refused(rule, granularity):
  tx = optax_gaf.gaf(0.5, rule=rule, granularity=granularity)
  params = jnp.zeros(2)
  with pytest.raises(ValueError, match=r"returned shapes.*expected"):
    tx.update(jnp.ones((3, 2)), tx.init(params), params)


@pytest.mark.parametrize(
  "returns",
  [
    lambda out: None,
    lambda out: tuple(out)[:3],
    lambda out: out.weights,  # a bare weights vector
    lambda out: out._asdict(),  # four keys: unpacks like four fields
  ],
  ids=["none", "three_fields", "weights_only", "dict"],
)
@pytest.mark.parametrize("n", [3, 4])
def test_custom_rule_not_returning_a_rule_output_is_refused(returns, n):
  def rule(gram, usable, tau):
    return returns(helpers.near_mean(gram, usable, tau))

  tx = optax_gaf.gaf(0.5, rule=rule)
  with pytest.raises(TypeError, match="must return a RuleOutput"):
    tx.update(jnp.ones((n, 2)), tx.init(None))


@pytest.mark.parametrize("rule", [3, None, ["sequential"]])
def test_rule_that_is_neither_a_name_nor_callable_is_a_type_error(rule):
  with pytest.raises(TypeError, match="rule must be a rule's name"):
    optax_gaf.gaf(0.9, rule=rule)


def test_unknown_rule_name_lists_the_choices():
  with pytest.raises(ValueError, match="Unknown GAF rule 'median'") as e:
    optax_gaf.gaf(0.9, rule="median")
  for name in ("medoid", "pairwise", "sequential", "soft"):
    assert repr(name) in str(e.value)


# --- issue 19: tau=0 accepts exact alignment up to rounding


@pytest.mark.parametrize("rule", ["sequential", "pairwise", "medoid", "soft"])
def test_tau_zero_accepts_bitwise_identical_microgradients(rule):
  """[1, 1/7] twice: the rounded distance was 1.19e-7 and the step skipped."""
  g = jnp.asarray([[1.0, 1 / 7], [1.0, 1 / 7]], jnp.float32)
  tx = optax_gaf.gaf(0.0, rule=rule, num_microbatches=2)
  updates, state = tx.update(g, tx.init(jnp.zeros(2)))
  assert bool(state.ready) and int(state.num_accepted) == 2
  np.testing.assert_allclose(updates, g[0], rtol=1e-6)


@settings(max_examples=12, deadline=None)
@given(
  n=st.sampled_from([2, 5, 20]),
  seed=st.integers(0, 2**31 - 1),
  log_scale=st.floats(-10, 10),
  spread=st.sampled_from([0.0, 3.0]),
  rule=st.sampled_from(["sequential", "pairwise", "medoid"]),
)
def test_property_tau_zero_accepts_copies_and_positive_multiples(
  n, seed, log_scale, spread, rule
):
  """Copies (spread 0) or positive multiples up to 1e3 apart, on the Gram
  route (N <= 16) and the block route (N > 16): all accepted at tau=0, with
  the float64 oracle's update (issue 19, item 4)."""
  rng = np.random.default_rng(seed)
  g = [rng.normal(size=s) * 10.0**log_scale for s in SHAPES]
  c = 10.0 ** rng.uniform(-spread / 2, spread / 2, size=n)
  leaves = [(c.reshape((n,) + (1,) * x.ndim) * x).astype(np.float32) for x in g]
  updates, state = helpers.run_gaf(helpers.tree(leaves), 0.0, rule, n)
  assert bool(state.ready) and int(state.num_accepted) == n
  # The oracle at a threshold far below any meaningful distance, far above
  # float64 rounding.
  want = helpers.ORACLES[rule](oracle.flatten(leaves), 1e-9)[0]
  got = helpers.flat_update(updates)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=0)


def test_tau_zero_still_rejects_what_is_not_aligned():
  """The slack is rounding, not tolerance: a distance of 1e-5 is rejected."""
  angle = np.arccos(1 - 1e-5)
  g = jnp.asarray([[1.0, 0.0], [np.cos(angle), np.sin(angle)]], jnp.float32)
  for rule in ("sequential", "medoid"):
    _, state = helpers.run_gaf(g, 0.0, rule, 2)
    assert not bool(state.ready), rule
    assert float(state.cosine_distance[1]) == pytest.approx(1e-5, rel=0.05)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_within_tau_has_a_few_ulps_of_slack(dtype):
  with jax.enable_x64(dtype == jnp.float64):
    slack = rules.TAU_SLACK_ULPS * float(jnp.finfo(dtype).eps)
    d = jnp.asarray([0.0, slack, 2 * slack, np.nan, 0.5], dtype)
    got = rules.within_tau(d, jnp.asarray(0.0, dtype))
  np.testing.assert_array_equal(got, [True, True, False, False, False])
  assert slack < 1e-5


def test_soft_temperature_under_inject_hyperparams_and_jit():
  """float(temperature) crashed on the traced value (issue 19, item 6)."""
  g = jnp.asarray([[1.0, 0.0], [1.0, 0.3], [-1.0, 0.2]], jnp.float32)
  injected = optax.inject_hyperparams(optax_gaf.gaf)(
    0.5, rule="soft", temperature=0.1
  )
  got, state = jax.jit(injected.update)(g, injected.init(jnp.zeros(2)))
  plain = optax_gaf.gaf(0.5, rule="soft", temperature=0.1)
  want, _ = plain.update(g, plain.init(jnp.zeros(2)))
  np.testing.assert_allclose(got, want, rtol=1e-6)
  state.hyperparams["temperature"] = jnp.asarray(100.0)
  got, _ = jax.jit(injected.update)(g, state)
  hot = optax_gaf.gaf(0.5, rule="soft", temperature=100.0)
  want, _ = hot.update(g, hot.init(jnp.zeros(2)))
  np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.mark.parametrize("temperature", ["hot", None])
def test_soft_temperature_that_is_no_number(temperature):
  if temperature is None:
    optax_gaf.gaf(rule="soft", temperature=None)  # the default
  else:
    with pytest.raises(TypeError, match="temperature must be a number"):
      optax_gaf.gaf(rule="soft", temperature=temperature)
