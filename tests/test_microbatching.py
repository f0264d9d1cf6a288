"""Tests of optax_gaf.microbatch_grads and split_microbatches."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_gaf


def _loss(params, batch):
  pred = batch["x"] @ params["w"] + params["b"]
  return jnp.mean((pred - batch["y"]) ** 2)


def _problem(b=12, d=3, seed=0):
  rng = np.random.default_rng(seed)
  batch = {
    "x": jnp.asarray(rng.normal(size=(b, d)), jnp.float32),
    "y": jnp.asarray(rng.normal(size=(b,)), jnp.float32),
  }
  params = {
    "w": jnp.asarray(rng.normal(size=(d,)), jnp.float32),
    "b": jnp.zeros(()),
  }
  return params, batch


@pytest.mark.parametrize("n", [1, 2, 3, 4, 6, 12])
def test_matches_a_loop_over_microbatches(n):
  params, batch = _problem()
  losses, grads = jax.jit(optax_gaf.microbatch_grads(_loss, n))(params, batch)
  size = 12 // n
  for i in range(n):
    micro = jax.tree.map(lambda x: x[i * size : (i + 1) * size], batch)
    want_loss, want_grads = jax.value_and_grad(_loss)(params, micro)
    np.testing.assert_allclose(losses[i], want_loss, rtol=1e-5)
    chex.assert_trees_all_close(
      jax.tree.map(lambda g: g[i], grads), want_grads, rtol=1e-5
    )
  # The mean of equal-size microbatch gradients is the full-batch gradient.
  chex.assert_trees_all_close(
    jax.tree.map(lambda g: g.mean(0), grads),
    jax.grad(_loss)(params, batch),
    rtol=1e-5,
    atol=1e-6,
  )


def test_has_aux_and_extra_args():
  params, batch = _problem()

  def loss(p, b, scale):
    value = scale * _loss(p, b)
    return value, {"twice": 2 * value}

  (losses, aux), grads = optax_gaf.microbatch_grads(loss, 4, has_aux=True)(
    params, batch, 3.0
  )
  assert losses.shape == (4,) and grads["w"].shape == (4, 3)
  np.testing.assert_allclose(aux["twice"], 2 * losses, rtol=1e-6)


def test_feeds_gaf():
  params, batch = _problem()
  _, grads = optax_gaf.microbatch_grads(_loss, 4)(params, batch)
  tx = optax_gaf.gaf(2.0)
  updates, _ = tx.update(grads, tx.init(params), params)
  chex.assert_trees_all_close(
    updates, jax.grad(_loss)(params, batch), rtol=1e-5, atol=1e-6
  )


def test_uneven_batch():
  params, batch = _problem(b=10)
  with pytest.raises(ValueError, match="batch of 10 does not split evenly"):
    optax_gaf.microbatch_grads(_loss, 4)(params, batch)


def test_batch_leaves_disagree():
  params, batch = _problem()
  batch["y"] = batch["y"][:8]
  with pytest.raises(ValueError, match="disagree on the batch size"):
    optax_gaf.microbatch_grads(_loss, 4)(params, batch)


@pytest.mark.parametrize("n", [0, -2, 2.5])
def test_bad_num_microbatches(n):
  with pytest.raises(ValueError, match="positive int"):
    optax_gaf.split_microbatches(jnp.ones((4, 2)), n)
