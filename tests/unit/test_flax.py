"""optax_gaf.flax: microgradients of NNX modules and Linen models with state."""

import importlib
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import optax_gaf
import optax_gaf.flax as gaf_flax

N = 4


class Net(nnx.Module):
  """Linear -> BatchNorm -> Dropout, the layers the tutorial CNN has."""

  def __init__(self, rate, rngs):
    self.linear = nnx.Linear(3, 2, rngs=rngs)
    self.bn = nnx.BatchNorm(2, momentum=0.9, rngs=rngs)
    self.dropout = nnx.Dropout(rate, rngs=rngs)

  def __call__(self, x):
    return self.dropout(self.bn(self.linear(x)))


def _mse(model, batch):
  return jnp.mean((model(batch["x"]) - batch["y"]) ** 2)


def _batch(seed=0, size=8):
  rng = np.random.default_rng(seed)
  return {
    "x": jnp.asarray(rng.normal(size=(size, 3)), jnp.float32),
    "y": jnp.asarray(rng.normal(size=(size, 2)), jnp.float32),
  }


def _bn_oracle(model, batch):
  """float64 per-microbatch BatchNorm running stats after one update."""
  w = np.asarray(model.linear.kernel[...], np.float64)
  b = np.asarray(model.linear.bias[...], np.float64)
  h = (np.asarray(batch["x"], np.float64) @ w + b).reshape(N, -1, 2)
  mean0 = np.asarray(model.bn.mean[...], np.float64)
  var0 = np.asarray(model.bn.var[...], np.float64)
  means = 0.9 * mean0 + 0.1 * h.mean(1)
  vars_ = 0.9 * var0 + 0.1 * h.var(1)
  return means, vars_


_value_and_grad = nnx.jit(nnx.value_and_grad(_mse))


def test_nnx_grads_match_each_microbatch_alone():
  model = Net(0.0, nnx.Rngs(0))
  batch = _batch()
  losses, grads = nnx.jit(gaf_flax.nnx_microgradients(_mse, N))(model, batch)
  assert losses.shape == (N,)
  for i in range(N):
    alone = Net(0.0, nnx.Rngs(0))  # same init, untouched stats
    micro = jax.tree.map(
      lambda x, i=i: x.reshape(N, -1, *x.shape[1:])[i], batch
    )
    loss_i, grads_i = _value_and_grad(alone, micro)
    np.testing.assert_allclose(losses[i], loss_i, rtol=1e-5)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_i)):
      np.testing.assert_allclose(got[i], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch_stats", ["mean", 2, -1])
def test_nnx_batch_stats_against_oracle(batch_stats):
  model = Net(0.0, nnx.Rngs(1))
  batch = _batch(1)
  means, vars_ = _bn_oracle(model, batch)
  gaf_flax.nnx_microgradients(_mse, N, batch_stats=batch_stats)(model, batch)
  if batch_stats == "mean":
    want_mean, want_var = means.mean(0), vars_.mean(0)
  else:
    want_mean, want_var = means[batch_stats], vars_[batch_stats]
  np.testing.assert_allclose(model.bn.mean[...], want_mean, rtol=1e-5)
  np.testing.assert_allclose(model.bn.var[...], want_var, rtol=1e-5)


def test_nnx_each_microbatch_draws_its_own_dropout_mask():
  model = Net(0.5, nnx.Rngs(2))
  one = _batch(2, size=2)
  same = jax.tree.map(lambda x: jnp.concatenate([x] * N), one)  # N copies
  fn = gaf_flax.nnx_microgradients(_mse, N)
  losses, _ = fn(model, same)
  assert len(np.unique(np.asarray(losses))) == N  # one shared key: all equal
  again, _ = fn(model, same)  # the model's stream advanced
  assert not np.allclose(losses, again)
  model.eval()  # no dropout: identical microbatches, identical losses
  losses, _ = fn(model, same)
  np.testing.assert_allclose(losses, losses[0])


def test_nnx_aux_has_a_leading_n_axis_and_trains_with_gaf():
  model = Net(0.1, nnx.Rngs(3))
  tx = optax_gaf.process(
    optax.identity(), optax_gaf.gaf(2.0, num_microbatches=N), optax.sgd(0.1)
  )
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  def loss_aux(m, b):
    out = m(b["x"])
    return jnp.mean((out - b["y"]) ** 2), out

  fn = gaf_flax.nnx_microgradients(loss_aux, N, has_aux=True)

  @nnx.jit
  def step(model, optimizer, batch):
    (losses, out), grads = fn(model, batch)
    optimizer.update(model, grads)
    return losses, out

  kernel = np.asarray(model.linear.kernel[...])
  losses, out = step(model, optimizer, _batch(3))
  assert out.shape == (N, 2, 2)
  assert not np.allclose(model.linear.kernel[...], kernel)
  assert int(optimizer.step[...]) == 1
  assert bool(optax_gaf.stats(optimizer.opt_state)["ready"])


def test_nnx_errors_name_the_problem():
  model = Net(0.0, nnx.Rngs(4))
  with pytest.raises(ValueError, match=r"\[-4, 4\)"):
    gaf_flax.nnx_microgradients(_mse, N, batch_stats=4)
  with pytest.raises(TypeError, match="batch_stats"):
    gaf_flax.nnx_microgradients(_mse, N, batch_stats="median")
  with pytest.raises(ValueError, match="does not split evenly"):
    gaf_flax.nnx_microgradients(_mse, N)(model, _batch(size=6))
  fn = gaf_flax.nnx_microgradients(lambda m, b, r: _mse(m, b), N)
  with pytest.raises(TypeError, match="Keep the streams in the model"):
    fn(model, _batch(), nnx.Rngs(0))


class LinenNet(nn.Module):
  @nn.compact
  def __call__(self, x, train):
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(
      nn.Dense(2)(x)
    )
    return nn.Dropout(0.5, deterministic=not train)(x)


def _linen_loss(params, state, b, rng):
  out, new_state = LinenNet().apply(
    {"params": params, **state},
    b["x"],
    True,
    rngs={"dropout": rng},
    mutable=list(state),
  )
  return jnp.mean((out - b["y"]) ** 2), (new_state, out)


def test_linen_grads_stats_and_rngs():
  batch = _batch(5)
  variables = LinenNet().init(jax.random.key(0), batch["x"], False)
  params, state = variables["params"], {"batch_stats": variables["batch_stats"]}
  key = jax.random.key(7)
  fn = gaf_flax.linen_microgradients(_linen_loss, N, has_aux=True)
  (losses, out), grads, new_state = fn(params, state, batch, key)
  assert out.shape == (N, 2, 2)
  keys = jax.random.split(key, N)
  micro = optax_gaf.split_microbatches(batch, N)
  bn_means = []
  for i in range(N):
    b_i = jax.tree.map(lambda x, i=i: x[i], micro)
    (loss_i, (state_i, _)), g_i = jax.value_and_grad(_linen_loss, has_aux=True)(
      params, state, b_i, keys[i]
    )
    np.testing.assert_allclose(losses[i], loss_i, rtol=1e-5)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(g_i)):
      np.testing.assert_allclose(got[i], want, rtol=1e-5, atol=1e-5)
    bn_means.append(np.asarray(state_i["batch_stats"]["BatchNorm_0"]["mean"]))
  np.testing.assert_allclose(
    new_state["batch_stats"]["BatchNorm_0"]["mean"],
    np.mean(bn_means, 0),
    rtol=1e-5,
  )
  assert len(np.unique(np.asarray(losses))) == N


def test_missing_flax_says_how_to_install(monkeypatch):
  monkeypatch.setitem(sys.modules, "flax", None)  # import flax -> ImportError
  monkeypatch.delitem(sys.modules, "optax_gaf.flax")
  with pytest.raises(ImportError, match=r"optax_gaf\[examples\]"):
    importlib.import_module("optax_gaf.flax")
  monkeypatch.undo()
  importlib.import_module("optax_gaf.flax")
