"""_stages: the three stages wired for a bound placement."""

import jax.numpy as jnp
import numpy as np
import pytest

from optax_gaf import _running
from optax_gaf import _stages
from optax_gaf import placement
from optax_gaf import rules
from tests import helpers
from tests import oracle

TAU = 0.9


def _leaves(n, seed=0):
  rng = np.random.default_rng(seed)
  return [
    jnp.asarray(x)
    for x in helpers.make_microgradients(rng, n, [(3,), (2, 2)], 0.8)
  ]


@pytest.mark.parametrize("n", [4, 20])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_aggregate_matches_the_float64_oracle(n, seed):
  leaves = _leaves(n, seed)
  place = placement.LocalPlacement(leaves)
  updates, out, _ = _stages.aggregate(place, rules.sequential, TAU)
  flat = oracle.flatten([np.asarray(x, np.float64) for x in leaves])
  want, want_accepted, _ = oracle.sequential(flat, TAU)
  assert bool(out.ready) == (want is not None)
  want = np.zeros(flat.shape[1]) if want is None else want
  np.testing.assert_array_equal(out.accepted, want_accepted)
  got = np.concatenate([np.ravel(u) for u in updates])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_aggregate_takes_the_block_route_only_where_allowed(monkeypatch):
  """Running rule, one device, N above a block: blocks; otherwise Gram."""
  calls = []
  real = _running.by_blocks

  def spy(*args):
    calls.append(True)
    return real(*args)

  monkeypatch.setattr(_running, "by_blocks", spy)
  leaves = _leaves(_running.BLOCK_SIZE + 4)
  place = placement.LocalPlacement(leaves)
  by_blocks = _stages.aggregate(place, rules.sequential, TAU)
  assert calls == [True]
  by_gram = _stages.aggregate(place, rules.sequential, TAU, blocks=False)
  _stages.aggregate(place, rules.medoid, TAU)
  _stages.aggregate(place, rules.sequential, TAU, per_leaf=True)
  assert calls == [True]
  np.testing.assert_array_equal(by_blocks[1].accepted, by_gram[1].accepted)
  for a, b in zip(by_blocks[0], by_gram[0]):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_aggregate_needs_two_microgradients():
  place = placement.LocalPlacement([jnp.ones((1, 3))])
  with pytest.raises(ValueError, match="at least 2"):
    _stages.aggregate(place, rules.sequential, TAU)


def test_resolve_rule():
  assert _stages.resolve_rule("medoid") is rules.medoid
  assert _stages.resolve_rule(rules.pairwise) is rules.pairwise
  soft = _stages.resolve_rule("soft", 0.1)
  assert soft.keywords == {"temperature": 0.1}
  with pytest.raises(ValueError, match="Unknown GAF rule"):
    _stages.resolve_rule("median")
  with pytest.raises(TypeError, match="name or a function"):
    _stages.resolve_rule(3)
  with pytest.raises(ValueError, match="temperature is a parameter"):
    _stages.resolve_rule("medoid", 0.1)
  with pytest.raises(ValueError, match="> 0"):
    _stages.resolve_rule("soft", 0.0)


def test_apply_rule_checks_what_a_rule_returns():
  gram = jnp.eye(3)
  usable = jnp.ones(3, bool)
  with pytest.raises(TypeError, match="must return a RuleOutput"):
    _stages.apply_rule(lambda g, u, t: g, gram, usable, TAU)

  def short(g, u, t):
    return rules.RuleOutput(jnp.ones(2), True, u, jnp.zeros(3))

  with pytest.raises(ValueError, match="expected"):
    _stages.apply_rule(short, gram, usable, TAU)
  out = _stages.apply_rule(rules.sequential, gram, usable, TAU)
  assert out.weights.dtype == gram.dtype and out.ready.dtype == bool
