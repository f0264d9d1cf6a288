"""The block fast path (no Gram matrix) decides exactly as the Gram route."""

import functools

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

import optax_gaf
from optax_gaf import _rules
from optax_gaf import _statistics
from optax_gaf import _streaming

N = 7
SHAPES = ((3,), (2, 2))  # two leaves: distances are over the whole pytree


@functools.partial(jax.jit, static_argnames="rule")
def gram_route(leaves, tau, rule):
  """The reference: Gram matrix -> rule -> weighted sum (stages 1 to 3)."""
  gram = _statistics.gram(leaves)
  usable = _statistics.usable_from_gram(gram)
  gram = _statistics.sanitize_gram(gram, usable)
  out = _rules.RULES[rule](gram, usable, tau)
  return (
    out,
    _statistics.weighted_sum(leaves, out.weights, usable),
    jnp.trace(gram),
    jnp.sum(gram),
  )


fast_route = jax.jit(
  _streaming.filter_microgradients, static_argnames=("rule", "block_size")
)


@st.composite
def microgradients(draw):
  """A shared direction plus noise, so some agree and some do not."""
  flat = draw(
    hnp.arrays(np.float64, (N, 7), elements=st.floats(-1, 1, width=32))
  )
  base = draw(hnp.arrays(np.float64, (1, 7), elements=st.floats(-1, 1)))
  flat = base * draw(st.floats(0, 3)) + flat
  for i in draw(st.lists(st.integers(0, N - 1), max_size=2)):
    flat[i] = 0.0  # a zero microgradient is excluded
  for i in draw(st.lists(st.integers(0, N - 1), max_size=2)):
    flat[i, draw(st.integers(0, 6))] = draw(st.sampled_from([np.nan, np.inf]))
  return [
    jnp.asarray(flat[:, :3], jnp.float32),
    jnp.asarray(flat[:, 3:].reshape(N, 2, 2), jnp.float32),
  ]


def assert_same(out, ref, tau):
  ref_out, ref_updates, ref_trace, ref_total = ref
  dist = np.asarray(ref_out.cosine_distance)
  # Two float32 routes may round a distance differently: skip near-ties.
  assume(not np.any(np.abs(dist[np.isfinite(dist)] - tau) < 1e-5))
  np.testing.assert_array_equal(out.accepted, ref_out.accepted)
  assert bool(out.ready) == bool(ref_out.ready)
  np.testing.assert_allclose(out.cosine_distance, dist, atol=2e-6)
  np.testing.assert_allclose(out.weights, ref_out.weights, atol=1e-7)
  for got, want in zip(jax.tree.leaves(out.updates), ref_updates):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out.sum_sq_norms, ref_trace, rtol=1e-5)
  np.testing.assert_allclose(
    out.sq_norm_of_sum, ref_total, rtol=1e-4, atol=1e-5
  )


@pytest.mark.parametrize("rule", ["sequential", "pairwise"])
@settings(max_examples=25, deadline=None)
@given(
  leaves=microgradients(),
  tau=st.floats(0.05, 1.5),
  block_size=st.sampled_from([1, 3, N]),
)
def test_fast_route_matches_gram_route(rule, leaves, tau, block_size):
  out = fast_route(leaves, jnp.float32(tau), rule=rule, block_size=block_size)
  assert_same(out, gram_route(leaves, jnp.float32(tau), rule), tau)


@pytest.mark.parametrize("rule", ["sequential", "pairwise"])
def test_gaf_takes_fast_route_with_same_state(rule):
  """gaf() on one device gives the Gram route's update and statistics."""
  rng = np.random.default_rng(0)
  flat = rng.normal(size=(40, 7)) + rng.normal(size=(1, 7))  # 3 blocks of 16
  leaves = [
    jnp.asarray(flat[:, :3], jnp.float32),
    jnp.asarray(flat[:, 3:].reshape(40, 2, 2), jnp.float32),
  ]
  tau = 0.6
  assert _streaming.takes_fast_path(
    optax_gaf.make_placement(), leaves, rule, per_leaf=False
  )
  tx = optax_gaf.gaf(tau, rule=rule, num_microbatches=40)
  updates, state = jax.jit(tx.update)(leaves, tx.init(None))
  ref_out, ref_updates, ref_trace, ref_total = gram_route(
    leaves, jnp.float32(tau), rule
  )
  dist = np.asarray(ref_out.cosine_distance)
  assert np.min(np.abs(dist - tau)) > 1e-4  # not a near-tie
  assert 2 < int(state.num_accepted) < 40  # the case is not trivial
  np.testing.assert_array_equal(state.accepted, ref_out.accepted)
  np.testing.assert_allclose(state.cosine_distance, dist, atol=2e-6)
  np.testing.assert_allclose(
    state.gradient_diversity, ref_trace / ref_total, rtol=1e-4
  )
  for got, want in zip(updates, ref_updates):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_fast_route_keeps_low_precision_dtype():
  g = jnp.asarray([[1.0, 0.0], [1.0, 0.1], [-1.0, 0.0]], jnp.bfloat16)
  out = _streaming.filter_microgradients(g, 0.5, "sequential")
  assert out.updates.dtype == jnp.bfloat16
  np.testing.assert_array_equal(out.accepted, [True, True, False])
  np.testing.assert_allclose(
    out.updates.astype(jnp.float32), [1.0, 0.05], rtol=1e-2
  )


def test_rules_that_need_the_gram_matrix_are_refused():
  with pytest.raises(ValueError, match="running-aggregate rules"):
    _streaming.filter_microgradients(jnp.ones((3, 2)), 0.5, "medoid")
  with pytest.raises(ValueError, match="block_size must be positive"):
    _streaming.filter_microgradients(jnp.ones((3, 2)), 0.5, block_size=0)
