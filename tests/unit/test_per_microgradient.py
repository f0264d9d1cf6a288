"""per_microgradient: a stateless transformation of each microgradient."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import assume
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import optax_gaf

PARAMS = {"w": jnp.zeros((2, 3)), "b": jnp.zeros(3)}


def _clipped_mean_oracle(grads, max_norm):
  """float64: clip each microgradient's global norm, then average."""
  w = np.asarray(grads["w"], np.float64)
  b = np.asarray(grads["b"], np.float64)
  norms = np.sqrt((w**2).sum((1, 2)) + (b**2).sum(1))
  scale = np.minimum(1.0, max_norm / norms)
  return {
    "w": (w * scale[:, None, None]).mean(0),
    "b": (b * scale[:, None]).mean(0),
  }


def _tx(pre):
  # tau=2 accepts every usable microgradient: gaf is then the plain mean.
  return optax_gaf.process(pre, optax_gaf.gaf(2.0), optax.sgd(-1.0))


@jax.jit
def _clipped_update(grads, max_norm):
  tx = _tx(optax_gaf.per_microgradient(optax.clip_by_global_norm(max_norm)))
  return tx.update(grads, tx.init(PARAMS), PARAMS)[0]


@settings(max_examples=25, deadline=None)
@given(
  n=st.integers(2, 4),
  max_norm=st.floats(0.1, 10.0),
  data=st.data(),
)
def test_per_microgradient_clipping_gives_the_clipped_mean(n, max_norm, data):
  floats = st.floats(-100, 100, width=32)
  grads = {
    "w": data.draw(hnp.arrays(np.float32, (n, 2, 3), elements=floats)),
    "b": data.draw(hnp.arrays(np.float32, (n, 3), elements=floats)),
  }
  norms = np.sqrt(
    (grads["w"].astype(np.float64) ** 2).sum((1, 2))
    + (grads["b"].astype(np.float64) ** 2).sum(1)
  )
  assume(np.all(norms > 1e-3))  # gaf leaves zero microgradients out
  updates = _clipped_update(grads, jnp.float32(max_norm))
  want = _clipped_mean_oracle(grads, max_norm)
  for k in ("w", "b"):
    np.testing.assert_allclose(updates[k], want[k], rtol=2e-5, atol=1e-6)


def test_plain_clip_before_gaf_clips_the_stack_the_wrapper_each_one():
  """The docstring's example: 4 identical microgradients of norm 1."""
  g = np.zeros((4, 3), np.float32)
  g[:, 0] = 1.0
  params = jnp.zeros(3)
  for pre, norm in [
    (optax.clip_by_global_norm(1.0), 0.5),
    (optax_gaf.per_microgradient(optax.clip_by_global_norm(1.0)), 1.0),
  ]:
    tx = _tx(pre)
    updates, _ = jax.jit(tx.update)(jnp.asarray(g), tx.init(params), params)
    np.testing.assert_allclose(np.linalg.norm(updates), norm, rtol=1e-6)


def test_stateful_transformations_are_refused_at_init():
  tx = optax_gaf.per_microgradient(optax.add_noise(0.1, 0.55, 0))
  with pytest.raises(ValueError, match="keeps state"):
    tx.init(PARAMS)
  with pytest.raises(ValueError, match="keeps state"):
    _tx(optax_gaf.per_microgradient(optax.scale_by_adam())).init(PARAMS)


def test_after_gaf_is_refused():
  tx = optax.chain(
    optax_gaf.gaf(0.9),
    optax_gaf.per_microgradient(optax.clip_by_global_norm(1.0)),
  )
  grads = {"w": jnp.ones((2, 2, 3)), "b": jnp.ones((2, 3))}
  with pytest.raises(ValueError, match="before gaf"):
    tx.update(grads, tx.init(PARAMS), PARAMS)


def test_leaves_disagreeing_on_n_are_refused():
  tx = optax_gaf.per_microgradient(optax.clip_by_global_norm(1.0))
  grads = {"w": jnp.ones((2, 2, 3)), "b": jnp.ones((3, 3))}
  with pytest.raises(ValueError, match="disagree on N"):
    tx.update(grads, tx.init(PARAMS), PARAMS)


def test_extra_args_reach_the_chain():
  tx = optax_gaf.process(
    optax_gaf.per_microgradient(optax.clip_by_global_norm(1.0)),
    optax_gaf.gaf(2.0),
    optax.chain(optax.sgd(1.0), optax.contrib.reduce_on_plateau()),
  )
  grads = {"w": jnp.ones((2, 2, 3)), "b": jnp.ones((2, 3))}
  updates, _ = tx.update(grads, tx.init(PARAMS), PARAMS, value=jnp.float32(1))
  np.testing.assert_allclose(
    updates["b"], -np.full(3, 1 / 3), rtol=1e-6
  )  # each [1]*9 clipped to norm 1: entries 1/3
