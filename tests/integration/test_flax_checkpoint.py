"""orbax round trips of gaf inside nnx.Optimizer and a Linen TrainState.

The recipes of docs/guides/flax.md: training resumed from the checkpoint is
bitwise the uninterrupted run.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from flax.training import train_state

import optax_gaf
import optax_gaf.flax as gaf_flax

N = 4


def _tx():
  return optax_gaf.process(
    optax.identity(),
    optax_gaf.gaf(0.8, num_microbatches=N),
    optax.adamw(optax.linear_schedule(1e-2, 1e-3, 10)),
  )


def _batches(steps):
  rng = np.random.default_rng(0)
  return [
    {
      "x": jnp.asarray(rng.normal(size=(8, 3)), jnp.float32),
      "y": jnp.asarray(rng.normal(size=(8, 2)), jnp.float32),
    }
    for _ in range(steps)
  ]


class Net(nnx.Module):
  def __init__(self, rngs):
    self.linear = nnx.Linear(3, 2, rngs=rngs)
    self.bn = nnx.BatchNorm(2, rngs=rngs)
    self.dropout = nnx.Dropout(0.2, rngs=rngs)

  def __call__(self, x):
    return self.dropout(self.bn(self.linear(x)))


def _mse(model, batch):
  return jnp.mean((model(batch["x"]) - batch["y"]) ** 2)


_grad_fn = gaf_flax.nnx_microgradients(_mse, N)


@nnx.jit
def _nnx_step(model, optimizer, batch):
  _, grads = _grad_fn(model, batch)
  optimizer.update(model, grads)


def _save(path, tree):
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(path, tree)
  checkpointer.wait_until_finished()
  checkpointer.close()


def _restore(path, target):
  checkpointer = ocp.StandardCheckpointer()
  restored = checkpointer.restore(path, target)
  checkpointer.close()
  return restored


def test_nnx_optimizer_round_trips_with_orbax(tmp_path):
  batches = _batches(6)
  model = Net(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, _tx(), wrt=nnx.Param)
  for b in batches[:3]:
    _nnx_step(model, optimizer, b)
  _save(tmp_path / "model", nnx.state(model))
  _save(tmp_path / "optimizer", nnx.state(optimizer))
  for b in batches[3:]:
    _nnx_step(model, optimizer, b)

  # A fresh program: build, then restore into the abstract state.
  model2 = Net(nnx.Rngs(1))
  optimizer2 = nnx.Optimizer(model2, _tx(), wrt=nnx.Param)
  nnx.update(
    model2,
    _restore(tmp_path / "model", jax.eval_shape(lambda: nnx.state(model2))),
  )
  nnx.update(
    optimizer2,
    _restore(
      tmp_path / "optimizer", jax.eval_shape(lambda: nnx.state(optimizer2))
    ),
  )
  assert int(optimizer2.step[...]) == 3
  for b in batches[3:]:
    _nnx_step(model2, optimizer2, b)
  for a, b in zip(
    jax.tree.leaves(nnx.state((model, optimizer))),
    jax.tree.leaves(nnx.state((model2, optimizer2))),
  ):
    np.testing.assert_array_equal(
      jax.random.key_data(a)
      if jnp.issubdtype(a.dtype, jax.dtypes.prng_key)
      else a,
      jax.random.key_data(b)
      if jnp.issubdtype(b.dtype, jax.dtypes.prng_key)
      else b,
    )
  assert "skipped_steps" in optax_gaf.stats(optimizer2.opt_state)


class LinenNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(2)(nn.relu(nn.Dense(4)(x)))


def _linen_state(seed):
  model = LinenNet()
  params = model.init(jax.random.key(seed), jnp.ones((1, 3)))["params"]
  return train_state.TrainState.create(
    apply_fn=model.apply, params=params, tx=_tx()
  )


@jax.jit
def _linen_step(state, batch):
  def loss_fn(params, b):
    out = state.apply_fn({"params": params}, b["x"])
    return jnp.mean((out - b["y"]) ** 2)

  _, grads = optax_gaf.microbatch_grads(loss_fn, N)(state.params, batch)
  return state.apply_gradients(grads=grads)


def test_linen_train_state_round_trips_with_orbax(tmp_path):
  batches = _batches(6)
  state = _linen_state(0)
  for b in batches[:3]:
    state = _linen_step(state, b)
  _save(tmp_path / "state", state)
  for b in batches[3:]:
    state = _linen_step(state, b)

  fresh = _linen_state(1)
  resumed = _restore(tmp_path / "state", jax.eval_shape(lambda: fresh))
  assert int(resumed.step) == 3
  for b in batches[3:]:
    resumed = _linen_step(resumed, b)
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(a, b)
