"""The shared counters, the states' unused fields, and optax_gaf.stats."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from optax.experimental import aggregating

import optax_gaf
from optax_gaf import _stats

INT32_MAX = np.iinfo(np.int32).max
N = 3
GRADS = {"a": jnp.array([[1.0, 0.0], [1.0, 0.1], [-1.0, 0.5]])}
PARAMS = {"a": jnp.zeros(2)}


def _filtered():
  grad_fn = optax_gaf.streaming_filtered_grads(
    lambda w, b: jnp.sum(w["a"] * b), N, 0.5
  )
  return grad_fn(PARAMS, GRADS["a"])[1]


# name -> (aggregator, its input, the fields that are None by default)
DEFAULTS = {
  "gaf": (
    lambda: optax_gaf.gaf(0.5),
    lambda: GRADS,
    (
      "accepted",
      "cosine_distance",
      "leaf_acceptance_rate",
      "tau_history",
      "chance_stats",
    ),
  ),
  "and_mask": (
    lambda: optax_gaf.and_mask(0.5),
    lambda: GRADS,
    (),  # leaf_mask_fraction is set: init got params
  ),
  "adacons": (
    lambda: optax_gaf.adacons(),
    lambda: GRADS,
    ("coefficients", "sorted_momentum"),
  ),
  "streamed": (
    lambda: optax_gaf.record_filtered(),
    _filtered,
    (
      "accepted",
      "cosine_distance",
      "leaf_acceptance_rate",
      "tau_history",
      "chance_stats",
    ),
  ),
}


@pytest.mark.parametrize("name", sorted(DEFAULTS))
def test_default_state_has_no_zero_size_arrays_and_keeps_shapes(name):
  make, grads, none_fields = DEFAULTS[name]
  tx = make()
  state = tx.init(PARAMS)
  assert all(x.size > 0 for x in jax.tree.leaves(state))
  for field in none_fields:
    assert getattr(state, field) is None, field
  for field, value in state._asdict().items():
    if field not in none_fields:
      assert value is not None, field
  g = grads()
  new_shape = jax.eval_shape(tx.update, g, state, PARAMS)[1]
  assert jax.tree.structure(new_shape) == jax.tree.structure(state)
  assert jax.tree.map(lambda x: (x.shape, x.dtype), new_shape) == (
    jax.tree.map(lambda x: (x.shape, x.dtype), state)
  )
  _, new = tx.update(g, state, PARAMS)
  assert int(new.count) == 1
  s = optax_gaf.stats(new)
  assert not set(none_fields) & set(s)  # unused fields are left out


def test_and_mask_without_params_has_no_leaf_fractions():
  tx = optax_gaf.and_mask(0.5)
  state = tx.init(None)
  assert state.leaf_mask_fraction is None
  assert all(x.size > 0 for x in jax.tree.leaves(state))
  _, new = tx.update(GRADS, state)
  assert new.leaf_mask_fraction is None
  assert float(new.mask_fraction) == 0.5


@pytest.mark.parametrize(
  "make, fields",
  [
    (
      lambda: optax_gaf.gaf(0.5, num_microbatches=N),
      {"accepted": (N,), "cosine_distance": (N,)},
    ),
    (
      lambda: optax_gaf.gaf(0.5, granularity="per_leaf", num_microbatches=N),
      {"accepted": (1, N), "leaf_acceptance_rate": (1,)},
    ),
    (
      lambda: optax_gaf.gaf(optax_gaf.AdaptiveTau(cap=0.5)),
      {"tau_history": (256,)},
    ),
    (
      lambda: optax_gaf.gaf(optax_gaf.AutoTau(), granularity="per_leaf"),
      {"chance_stats": (1, 3), "leaf_acceptance_rate": (1,)},
    ),
    (
      lambda: optax_gaf.adacons(0.5, num_microbatches=N),
      {"coefficients": (N,), "sorted_momentum": (N,)},
    ),
  ],
  ids=["gaf_n", "gaf_per_leaf", "gaf_adaptive", "gaf_auto", "adacons_n"],
)
def test_fields_in_use_have_their_shapes(make, fields):
  tx = make()
  state = tx.init(PARAMS)
  for field, shape in fields.items():
    assert getattr(state, field).shape == shape, field
  new = jax.eval_shape(tx.update, GRADS, state, PARAMS)[1]
  assert jax.tree.map(lambda x: (x.shape, x.dtype), new) == (
    jax.tree.map(lambda x: (x.shape, x.dtype), state)
  )


# --- counters


def test_counters_start_at_zero_and_ready():
  c = _stats.init_counters()
  assert int(c["count"]) == 0 and int(c["skipped_steps"]) == 0
  assert bool(c["ready"]) and c["count"].dtype == jnp.int32


@pytest.mark.parametrize(
  "make",
  [
    lambda: optax_gaf.gaf(0.5),
    lambda: optax_gaf.and_mask(1.0),
    lambda: optax_gaf.adacons(),
  ],
  ids=["gaf", "and_mask", "adacons"],
)
def test_count_and_skipped_steps_saturate_at_int32_max(make):
  tx = make()
  near = jnp.asarray(INT32_MAX - 1, jnp.int32)
  state = tx.init(PARAMS)._replace(count=near, skipped_steps=near)
  # Opposed microgradients: a skipped step for every aggregator.
  opposed = {"a": jnp.array([[1.0, -1.0], [-1.0, 1.0]])}
  update = jax.jit(tx.update)
  for want in (INT32_MAX, INT32_MAX):
    _, state = update(opposed, state)
    assert not bool(state.ready)
    assert int(state.count) == want and int(state.skipped_steps) == want
    assert state.count.dtype == jnp.int32
  assert float(optax_gaf.stats(state)["skip_rate"]) == 1.0


def test_skipped_steps_do_not_move_on_ready_steps():
  state = optax_gaf.gaf(0.5).init(None)
  c = _stats.advance_counters(state, jnp.array(True), jnp.float32(2.0))
  assert int(c["count"]) == 1 and int(c["skipped_steps"]) == 0
  c = _stats.advance_counters(state, jnp.array(False), jnp.float32(2.0))
  assert int(c["count"]) == 1 and int(c["skipped_steps"]) == 1
  assert float(c["gradient_diversity"]) == 2.0


# --- stats()


def test_stats_reads_through_any_nesting():
  grads = {"a": jnp.array([[1.0, 0.0], [1.0, 0.1], [-1.0, 0.5], [1.0, 0.2]])}
  for tx in (
    optax.chain(optax_gaf.gaf(1.5, num_microbatches=4), optax.sgd(0.1)),
    aggregating.process(
      optax.identity(), optax_gaf.gaf(1.5, num_microbatches=4), optax.sgd(0.1)
    ),
    optax.inject_hyperparams(optax_gaf.gaf, static_args="num_microbatches")(
      tau=1.5, num_microbatches=4
    ),
  ):
    state = tx.init(PARAMS)
    _, state = tx.update(grads, state, PARAMS)
    s = optax_gaf.stats(state)
    assert s["accepted"].shape == (4,)
    np.testing.assert_array_equal(
      optax.tree.get(state, "accepted"), s["accepted"]
    )
    assert 0 < int(s["num_accepted"]) < 4
    assert float(s["acceptance_rate"]) == pytest.approx(
      int(s["num_accepted"]) / 4
    )
    assert float(s["skip_rate"]) == 0.0


def test_stats_exposes_per_leaf_and_adaptive_fields():
  tx = optax.chain(
    optax_gaf.gaf(
      optax_gaf.AdaptiveTau(history=4, cap=0.9), granularity="per_leaf"
    ),
    optax.sgd(0.1),
  )
  params = {"a": jnp.zeros(2), "b": jnp.zeros(3)}
  s = optax_gaf.stats(tx.init(params))
  assert s["leaf_acceptance_rate"].shape == (2,)
  assert s["tau_history"].shape == (4,)
  assert "accepted" not in s  # no num_microbatches


def test_stats_needs_exactly_one_aggregator_state():
  with pytest.raises(ValueError, match="no GAFState"):
    optax_gaf.stats(optax.sgd(0.1).init(PARAMS))
  two = optax.chain(optax_gaf.gaf(0.5), optax_gaf.and_mask(0.5))
  with pytest.raises(ValueError, match="more than one"):
    optax_gaf.stats(two.init(PARAMS))


@pytest.mark.parametrize("granularity", ["global", "per_leaf"])
def test_acceptance_rate_is_num_accepted_over_the_marks(granularity):
  """Per leaf, num_accepted counts marks over L x N (issue 19, item 10)."""
  grads = {
    "a": jnp.array([[1.0, 0.0], [1.0, 0.1], [-1.0, 0.0]]),
    "b": jnp.array([[1.0], [1.0], [1.0]]),
  }
  tx = optax_gaf.gaf(0.5, num_microbatches=3, granularity=granularity)
  params = jax.tree.map(lambda x: x[0], grads)
  _, state = tx.update(grads, tx.init(params), params)
  s = optax_gaf.stats(state)
  accepted = np.asarray(s["accepted"])
  assert int(s["num_accepted"]) == accepted.sum()
  rate = int(s["num_accepted"]) / accepted.size
  assert float(s["acceptance_rate"]) == pytest.approx(rate)
  if granularity == "per_leaf":
    assert accepted.shape == (2, 3) and int(s["num_accepted"]) == 5
    np.testing.assert_allclose(s["leaf_acceptance_rate"], [2 / 3, 1.0])
    assert float(s["acceptance_rate"]) == pytest.approx(5 / 6)
