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
    micro = jax.tree.map(lambda x, i=i: x[i * size : (i + 1) * size], batch)
    want_loss, want_grads = jax.value_and_grad(_loss)(params, micro)
    np.testing.assert_allclose(losses[i], want_loss, rtol=1e-5)
    chex.assert_trees_all_close(
      jax.tree.map(lambda g, i=i: g[i], grads), want_grads, rtol=1e-5
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


@pytest.mark.parametrize("n", [0, -2])
def test_num_microbatches_below_one(n):
  with pytest.raises(ValueError, match="num_microbatches must be >= 1"):
    optax_gaf.split_microbatches(jnp.ones((4, 2)), n)


@pytest.mark.parametrize("n", [2.5, 2.0, "2", True])
def test_num_microbatches_that_is_no_int(n):
  with pytest.raises(TypeError, match="num_microbatches must be an int"):
    optax_gaf.split_microbatches(jnp.ones((4, 2)), n)
  with pytest.raises(TypeError, match="num_microbatches must be an int"):
    optax_gaf.microbatch_grads(lambda p, b: jnp.sum(b), n)(
      jnp.zeros(()), jnp.ones((4, 2))
    )


def test_numpy_int_and_scalar_leaf():
  out = optax_gaf.split_microbatches({"x": jnp.ones((4, 2))}, np.int64(2))
  assert out["x"].shape == (2, 2, 2)
  with pytest.raises(ValueError, match=r"\['s'\] is a scalar"):
    optax_gaf.split_microbatches({"x": jnp.ones(4), "s": jnp.ones(())}, 2)
  with pytest.raises(ValueError, match="no leaves"):
    optax_gaf.split_microbatches({}, 2)
