"""_state: GAFState and how a step's decisions are recorded."""

import jax
import jax.numpy as jnp
import numpy as np

from optax_gaf import _state
from optax_gaf import _threshold
from optax_gaf import rules


def _out(n=3):
  return rules.RuleOutput(
    weights=jnp.full([n], 1.0 / n),
    ready=jnp.asarray(True),
    accepted=jnp.asarray([True, True, False][:n]),
    cosine_distance=jnp.asarray([0.0, 0.2, 1.5][:n]),
  )


def test_fields_of_features_that_are_off_are_none():
  state = _state.init_state(0.9, None)
  assert state.accepted is None and state.cosine_distance is None
  assert state.leaf_acceptance_rate is None and state.tau_history is None
  assert state.chance_stats is None
  assert all(x.size for x in jax.tree.leaves(state))


def test_record_keeps_shapes_and_counts():
  policy = _threshold.threshold_policy(_threshold.AdaptiveTau(history=4))
  state = _state.init_state(0.97, 3, 0, policy.init(0))
  new = _state.record(state, _out(), jnp.float32(0.5), jnp.float32(1.0), policy)
  assert jax.tree.map(jnp.shape, new) == jax.tree.map(jnp.shape, state)
  assert int(new.count) == 1 and bool(new.ready)
  assert int(new.num_accepted) == 2
  np.testing.assert_allclose(new.acceptance_rate, 2 / 3)
  np.testing.assert_array_equal(new.accepted, [True, True, False])
  # The policy recorded the nonzero finite distances, newest last.
  np.testing.assert_allclose(new.tau_history[-2:], [0.2, 1.5])
  assert np.isnan(new.tau_history[:2]).all()


def test_record_without_a_policy_keeps_its_state():
  auto = _threshold.threshold_policy(_threshold.AutoTau())
  state = _state.init_state(1.0, None, 0, auto.init(0))
  new = _state.record(state, _out(), jnp.float32(1.0), jnp.float32(1.0))
  np.testing.assert_array_equal(new.chance_stats, state.chance_stats)
  updated = _state.record(state, _out(), jnp.float32(1.0), 1.0, auto)
  assert float(updated.chance_stats[2]) == 1  # one negative similarity
