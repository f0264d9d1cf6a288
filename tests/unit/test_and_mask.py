"""optax_gaf.and_mask: the authors' and_mask_utils.py semantics."""

import functools

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
from tests import helpers
from tests import oracle
from tests.helpers import SHAPES


@functools.partial(jax.jit, static_argnames=("scale",))
def _run(grads, threshold, scale=False):
  tx = optax_gaf.and_mask(threshold, scale_grad_inverse_sparsity=scale)
  params = jax.tree.map(lambda x: x[0], grads)
  return tx.update(grads, tx.init(params), params)


@pytest.mark.parametrize("n", [2, 5, 8])
@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.6, 1.0])
@pytest.mark.parametrize("scale", [False, True])
def test_matches_float64_oracle(n, threshold, scale):
  rng = np.random.default_rng(helpers.seed_of(n, threshold, scale))
  leaves = helpers.make_microgradients(rng, n, SHAPES, 0.5)
  grads = dict(zip("abc", leaves))
  updates, state = _run(grads, threshold, scale)
  want = oracle.and_mask(leaves, threshold, scale)
  for name, w in zip("abc", want):
    np.testing.assert_allclose(updates[name], w, rtol=2e-5, atol=1e-6)
  kept = [np.abs(np.mean(np.sign(x), 0)) >= threshold for x in leaves]
  # leaf_mask_fraction follows jax.tree.leaves order (a, b, c here).
  np.testing.assert_allclose(
    state.leaf_mask_fraction, [k.mean() for k in kept], rtol=1e-6
  )
  kept_fraction = sum(k.sum() for k in kept) / sum(k.size for k in kept)
  np.testing.assert_allclose(state.mask_fraction, kept_fraction, rtol=1e-6)
  assert float(state.gradient_diversity) == pytest.approx(
    oracle.gradient_diversity(oracle.flatten(leaves)), rel=1e-4
  )


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.sampled_from([2, 3, 6]))
def test_threshold_zero_is_the_mean_and_one_needs_full_agreement(seed, n):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, 40)).astype(np.float32)
  x[:, :5] = np.abs(x[:, :5])  # some coordinates agree for sure
  mean, _ = _run(x, 0.0)
  np.testing.assert_allclose(mean, x.mean(0), rtol=1e-5, atol=1e-6)
  full, _ = _run(x, 1.0)
  agree = np.all(x > 0, 0) | np.all(x < 0, 0)
  np.testing.assert_array_equal(np.asarray(full) != 0, agree)
  np.testing.assert_allclose(
    np.asarray(full)[agree], x.mean(0)[agree], rtol=1e-5
  )


def test_zero_sign_counts_against_full_agreement():
  x = jnp.array([[1.0, 2.0], [0.0, 3.0]])
  updates, _ = _run(x, 1.0)
  np.testing.assert_array_equal(updates, [0.0, 2.5])


def test_unusable_microgradients_are_as_if_absent():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(4, 10)).astype(np.float32)
  bad = x.copy()
  bad[1, 3] = np.nan
  clean = np.delete(x, 1, axis=0)
  for threshold in (0.0, 0.6):
    got, _ = _run(jnp.asarray(bad), threshold)
    want, _ = _run(jnp.asarray(clean), threshold)
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_nothing_kept_is_a_skipped_step():
  x = jnp.array([[1.0, -1.0], [-1.0, 1.0]])
  tx = aggregating.process(
    optax.identity(), optax_gaf.and_mask(1.0), optax.sgd(1.0, momentum=0.9)
  )
  params = jnp.zeros(2)
  state = tx.init(params)
  updates, state = tx.update(x, state, params)
  np.testing.assert_array_equal(updates, [0.0, 0.0])
  s = optax_gaf.stats(state)
  assert not bool(s["ready"]) and int(s["skipped_steps"]) == 1
  assert float(s["mask_fraction"]) == 0.0


def test_threshold_schedule_and_inject_hyperparams():
  x = jnp.array([[1.0, 1.0, 1.0], [1.0, -1.0, 1.0], [1.0, 1.0, -1.0]])
  tx = optax_gaf.and_mask(optax.linear_schedule(0.0, 1.0, 1))
  state = tx.init(jnp.zeros(3))
  u0, state = tx.update(x, state)
  u1, state = tx.update(x, state)
  np.testing.assert_allclose(u0, x.mean(0))
  np.testing.assert_allclose(u1, [1.0, 0.0, 0.0])
  assert float(state.agreement_threshold) == 1.0
  tx = optax.inject_hyperparams(optax_gaf.and_mask)(agreement_threshold=1.0)
  u, _ = jax.jit(tx.update)(x, tx.init(jnp.zeros(3)))
  np.testing.assert_allclose(u, [1.0, 0.0, 0.0])


def test_bf16_in_bf16_out():
  x = jnp.array([[1.0, 2.0], [3.0, -2.0]], jnp.bfloat16)
  updates, _ = _run(x, 1.0)
  assert updates.dtype == jnp.bfloat16
  np.testing.assert_array_equal(updates.astype(np.float32), [2.0, 0.0])


@pytest.mark.parametrize("threshold", [-0.1, 1.5])
def test_threshold_out_of_range(threshold):
  with pytest.raises(ValueError, match="agreement_threshold"):
    optax_gaf.and_mask(threshold)
  with pytest.raises(ValueError, match="agreement_threshold"):
    optax_gaf.and_mask(lambda count: threshold)


def test_threshold_that_is_no_number():
  with pytest.raises(TypeError, match="agreement_threshold must be a number"):
    optax_gaf.and_mask("high")


# --- issue 19


@pytest.mark.parametrize("scale", [False, True])
def test_zero_size_leaf_keeps_the_fractions_finite(scale):
  x = np.array([[1.0, 2.0, -1.0], [3.0, -2.0, -3.0]], np.float32)
  grads = {"a": jnp.asarray(x), "e": jnp.zeros((2, 0))}
  updates, state = _run(grads, 1.0, scale)
  want = oracle.and_mask([x], 1.0, scale)[0]
  np.testing.assert_allclose(updates["a"], want, rtol=1e-6)
  assert updates["e"].shape == (0,)
  np.testing.assert_allclose(state.leaf_mask_fraction, [2 / 3, 0.0], rtol=1e-6)
  np.testing.assert_allclose(state.mask_fraction, 2 / 3, rtol=1e-6)
  # Only zero-size leaves: nothing kept, nothing to divide by.
  updates, state = _run({"e": jnp.zeros((2, 0))}, 1.0, scale)
  assert updates["e"].shape == (0,) and not bool(state.ready)
  assert float(state.mask_fraction) == 0.0


def test_another_tree_than_init_is_refused():
  """leaf_mask_fraction is shaped by init's params: a tree with more leaves
  would silently change its shape (issue 19, item 10)."""
  tx = optax_gaf.and_mask(0.5)
  state = tx.init({"a": jnp.zeros(2)})
  grads = {"a": jnp.ones((3, 2)), "b": jnp.ones((3, 4))}
  with pytest.raises(ValueError, match="initialised with params of 1 leaves"):
    tx.update(grads, state)
  # init without params records no per-leaf fractions: any tree goes.
  _, state = tx.update(grads, tx.init(None))
  assert state.leaf_mask_fraction is None
