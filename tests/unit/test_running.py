"""The running-aggregate engine: the block route (no Gram matrix of all N)
decides exactly as the Gram route; its kernel folds one at a time as in
blocks; the streaming overflow guard refuses a step it cannot decide."""

import functools

import hypothesis.extra.numpy as hnp
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
from optax_gaf import _combine
from optax_gaf import _gram
from optax_gaf import _running
from optax_gaf import rules
from tests import helpers
from tests import oracle

N = 7
SHRINK = {"sequential": 1.0, "pairwise": 0.5}


@functools.partial(jax.jit, static_argnames="rule")
def gram_route(leaves, tau, rule):
  """The reference: Gram matrix -> rule -> weighted sum (stages 1 to 3)."""
  gram, usable = _gram.sanitized(_gram.gram(leaves))
  out = rules.BY_NAME[rule](gram, usable, tau)
  updates = _combine.weighted_sum(leaves, out.weights, usable)
  return updates, out, _gram.gradient_diversity(gram)


@functools.partial(jax.jit, static_argnums=(2, 3))
def block_route(leaves, tau, shrink, block_size=_running.BLOCK_SIZE):
  carry = _running.filter_blocks(leaves, tau, shrink, block_size)
  return _running.finish(carry, shrink, [x.dtype for x in leaves])


def _two_leaves(flat):
  n = flat.shape[0]
  return [
    jnp.asarray(flat[:, :3], jnp.float32),
    jnp.asarray(flat[:, 3:].reshape(n, 2, 2), jnp.float32),
  ]


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
  return _two_leaves(flat)


def assert_same(got, want, tau):
  updates, out, diversity = got
  ref_updates, ref_out, ref_diversity = want
  dist = np.asarray(ref_out.cosine_distance)
  # Two float32 routes may round a distance differently: no near-ties.
  assume(not np.any(np.abs(dist[np.isfinite(dist)] - tau) < 1e-5))
  np.testing.assert_array_equal(out.accepted, ref_out.accepted)
  assert bool(out.ready) == bool(ref_out.ready)
  np.testing.assert_allclose(out.cosine_distance, dist, atol=2e-6)
  np.testing.assert_allclose(out.weights, ref_out.weights, atol=1e-7)
  for g, w in zip(updates, ref_updates):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
  # The diversity's rounding error grows with it (a near-cancelling sum).
  ref_diversity = float(ref_diversity)
  if np.isfinite(ref_diversity):
    rtol = 1e-4 * max(1.0, ref_diversity)
    np.testing.assert_allclose(diversity, ref_diversity, rtol=rtol)
  else:  # nothing usable, or an exactly cancelling sum
    assert float(diversity) > 1e6


@pytest.mark.parametrize("rule", ["sequential", "pairwise"])
@settings(max_examples=25, deadline=None)
@given(
  leaves=microgradients(),
  tau=st.floats(0.05, 1.5),
  block_size=st.sampled_from([1, 3, N]),
)
def test_block_route_matches_gram_route(rule, leaves, tau, block_size):
  tau = jnp.float32(tau)
  got = block_route(leaves, tau, SHRINK[rule], block_size)
  assert_same(got, gram_route(leaves, tau, rule), float(tau))


@pytest.mark.parametrize("rule", ["sequential", "pairwise"])
def test_gaf_takes_block_route_with_same_state(rule):
  """gaf() on one device, N > BLOCK_SIZE: the block route's result, bitwise,
  and the float64 oracle's decisions, update and statistics."""
  n = 40  # 2 blocks of 16 and a remainder of 8
  assert n > _running.BLOCK_SIZE
  rng = np.random.default_rng(0)
  leaves = _two_leaves(rng.normal(size=(n, 7)) + rng.normal(size=(1, 7)))
  tau = 0.6
  tx = optax_gaf.gaf(tau, rule=rule, num_microbatches=n)
  updates, state = jax.jit(tx.update)(leaves, tx.init(None))
  # Bitwise the block route's result (the Gram route rounds differently).
  block_updates, block_out, _ = block_route(leaves, tau, SHRINK[rule])
  helpers.assert_bitwise_equal(updates, block_updates)
  helpers.assert_bitwise_equal(state.cosine_distance, block_out.cosine_distance)
  flat = oracle.flatten(leaves)
  want, accepted, dist = helpers.ORACLES[rule](flat, tau)
  assert not oracle.is_ambiguous(dist, tau)
  assert 2 < accepted.sum() < n  # the case is not trivial
  np.testing.assert_array_equal(state.accepted, accepted)
  np.testing.assert_allclose(state.cosine_distance, dist, atol=2e-6)
  assert float(state.gradient_diversity) == pytest.approx(
    oracle.gradient_diversity(flat), rel=1e-4
  )
  got = np.concatenate([np.ravel(u) for u in updates])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_block_route_keeps_low_precision_dtype():
  g = jnp.asarray([[1.0, 0.0], [1.0, 0.1], [-1.0, 0.0]], jnp.bfloat16)
  (update,), out, _ = block_route([g], 0.5, 1.0)
  assert update.dtype == jnp.bfloat16
  np.testing.assert_array_equal(out.accepted, [True, True, False])
  np.testing.assert_allclose(update.astype(jnp.float32), [1.0, 0.05], rtol=1e-2)


def test_block_size_must_be_positive():
  with pytest.raises(ValueError, match="block_size must be positive"):
    _running.filter_blocks([jnp.ones((3, 2))], 0.5, 1.0, block_size=0)


def test_absorb_in_blocks_of_one_equals_one_block():
  """The streaming kernel: folding one at a time gives the same carry."""
  absorb = jax.jit(_running.absorb, static_argnums=4)
  rng = np.random.default_rng(1)
  flat = rng.normal(size=(5, 7)) + 0.3
  leaves = _two_leaves(flat)
  shapes = [x.shape[1:] for x in leaves]
  one = absorb(_running.init_carry(shapes, 5), leaves, 0, 0.8, 1.0)
  carry = _running.init_carry(shapes, 5)
  for i in range(5):
    carry = absorb(carry, [x[i : i + 1] for x in leaves], i, 0.8, 1.0)
  np.testing.assert_array_equal(carry.taken, one.taken)
  assert 1 < int(one.taken.sum()) < 5
  np.testing.assert_allclose(carry.weights, one.weights, rtol=1e-6)
  for a, b in zip(carry.aggregate, one.aggregate):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  updates, out, _ = _running.finish(carry, 1.0, [jnp.float32] * 2)
  assert bool(out.ready)
  want = flat[np.asarray(out.accepted)].mean(0)
  got = np.concatenate([np.ravel(u) for u in updates])
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_dot_with_the_aggregate_is_accurate_for_long_vectors():
  """XLA's CPU matrix-vector product was 190 ulps off at 1e6 entries (1,300
  at 4e6): copies of the anchor then disagreed with it at tau=0."""
  rng = np.random.default_rng(helpers.seed_of("long_dot"))
  y = rng.normal(size=2**20).astype(np.float32)
  x = np.stack([y, 2 * y, -y]).astype(np.float32)
  got = np.asarray(_running._dot_with(jnp.asarray(x), jnp.asarray(y)))
  want = x.astype(np.float64) @ y.astype(np.float64)
  ulps = np.abs(got - want) / np.abs(want) / np.finfo(np.float32).eps
  assert np.all(ulps < 8), ulps


def test_block_route_accepts_copies_at_tau_zero():
  """N=20 copies (a block of 16, then 4 against the carried aggregate)."""
  rng = np.random.default_rng(helpers.seed_of("block_copies"))
  g = rng.normal(size=(1, 3000)).astype(np.float32)
  tx = optax_gaf.gaf(0.0, num_microbatches=20)
  updates, state = jax.jit(tx.update)(
    jnp.asarray(np.repeat(g, 20, 0)), tx.init(jnp.zeros(3000))
  )
  assert int(state.num_accepted) == 20
  np.testing.assert_allclose(updates, g[0], rtol=1e-6)


# --- the overflow guard of the running sums (streaming)


def _streamed_fn(n):
  """gaf_accumulator fed one microbatch at a time (no rescaling there)."""
  acc = optax_gaf.gaf_accumulator(0.5, num_microbatches=n)
  return jax.jit(
    optax.microbatching.microbatch(
      jax.grad(lambda w, x: jnp.sum(w * x)),  # gradient: x
      argnums=1,
      microbatch_size=1,
      accumulator=acc,
    )
  )


@pytest.mark.parametrize("norm, ready", [(1e15, True), (1e18, False)])
def test_running_sums_out_of_range_refuse_the_step(norm, ready):
  """40 agreeing microgradients of norm 1e18: their running sum's squared
  norm overflows float32, and later distances read as 1. Nothing rescales
  here, so the step is refused instead (issue 19, item 7)."""
  n = 40
  rng = np.random.default_rng(helpers.seed_of("stream_range", norm))
  x = rng.normal(size=(n, 3)) * 0.1 + 1.0
  x = x / np.linalg.norm(x, axis=1, keepdims=True) * norm
  x = jnp.asarray(x, jnp.float32)
  out = _streamed_fn(n)(jnp.zeros(3), x)
  assert bool(out.ready) == ready
  if ready:
    want, accepted, _ = oracle.sequential(oracle.flatten([x]), 0.5)
    np.testing.assert_array_equal(out.accepted, accepted)
    np.testing.assert_allclose(out.updates, want, rtol=1e-5)
  else:
    np.testing.assert_array_equal(out.updates, 0.0)
