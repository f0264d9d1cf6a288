"""Ghost microgradients through Flax's own update paths and helpers.

``TrainState.apply_gradients(grads=ghost)`` and ``nnx.Optimizer.update(model,
ghost)`` give the materialized route's update (``microbatch_grads`` or
``nnx_microgradients`` + the same tx), in float64.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.training import train_state

import optax_gaf
import optax_gaf.flax as gaf_flax
from optax_gaf._ghost import NotArraysError

N = 4


def _tx(pre=None):
  pre = optax.identity() if pre is None else pre
  return optax_gaf.process(pre, optax_gaf.gaf(0.2), optax.adam(0.1))


def _close(got, want):
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    if jnp.issubdtype(g.dtype, jax.dtypes.prng_key):
      g, w = jax.random.key_data(g), jax.random.key_data(w)
    np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-12)


class LinenNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Conv(3, (3, 3), param_dtype=jnp.float64)(x)
    x = nn.tanh(x).reshape(x.shape[0], -1)
    return nn.Dense(2, param_dtype=jnp.float64)(x)


def _linen_case():
  net = LinenNet()
  k = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(k[0], (8, 5, 5, 1), jnp.float64)
  batch = {"x": x, "y": jax.random.normal(k[1], (8, 2), jnp.float64)}
  params = net.init(k[2], x[:1])["params"]

  def loss(p, b):
    return jnp.mean((net.apply({"params": p}, b["x"]) - b["y"]) ** 2)

  return net, params, batch, loss


def test_train_state_apply_gradients_takes_ghost():
  with jax.enable_x64(True):
    net, params, batch, loss = _linen_case()
    state = train_state.TrainState.create(
      apply_fn=net.apply, params=params, tx=_tx()
    )
    ghost_fn = optax_gaf.ghost_microgradients(loss, N)
    stacked_fn = optax_gaf.microbatch_grads(loss, N)

    def step(state, batch, ghost):
      grads = (ghost_fn if ghost else stacked_fn)(state.params, batch)[1]
      return state.apply_gradients(grads=grads)

    got, want = state, state
    for _ in range(3):  # adam's moments and gaf's state carried
      got = jax.jit(step, static_argnums=2)(got, batch, True)
      want = jax.jit(step, static_argnums=2)(want, batch, False)
    _close(got.params, want.params)
    _close(got.opt_state, want.opt_state)
    assert int(got.step) == 3


class NnxNet(nnx.Module):
  def __init__(self, rngs):
    kw = {"param_dtype": jnp.float64, "rngs": rngs}
    self.conv = nnx.Conv(1, 3, (3, 3), **kw)
    self.norm = nnx.LayerNorm(75, **kw)
    self.head = nnx.Linear(75, 2, **kw)

  def __call__(self, x):
    x = jnp.tanh(self.conv(x)).reshape(x.shape[0], -1)
    return self.head(self.norm(x))


def _mse(model, b):
  return jnp.mean((model(b["x"]) - b["y"]) ** 2)


def _nnx_batch():
  k = jax.random.split(jax.random.key(1))
  return {
    "x": jax.random.normal(k[0], (8, 5, 5, 1), jnp.float64),
    "y": jax.random.normal(k[1], (8, 2), jnp.float64),
  }


def _ghost_update(model, optimizer, batch):
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss(p, b):
    return _mse(nnx.merge(graphdef, p, rest), b)

  _, ghost = optax_gaf.ghost_microgradients(loss, N)(params, batch)
  optimizer.update(model, ghost)


def _stacked_update(model, optimizer, batch):
  _, grads = gaf_flax.nnx_microgradients(_mse, N)(model, batch)
  optimizer.update(model, grads)


@pytest.mark.parametrize("wrt", ["all", "kernels"])
def test_nnx_optimizer_update_takes_ghost(wrt):
  # "kernels": the optimizer filters part of the ghost's leaves; gaf then
  # compares the microgradients of those leaves only, as on stacked grads.
  flt = (
    nnx.Param
    if wrt == "all"
    else nnx.All(nnx.Param, nnx.PathContains("kernel"))
  )
  with jax.enable_x64(True):
    batch = _nnx_batch()
    models, optimizers = [], []
    for update in (_ghost_update, _stacked_update):
      model = NnxNet(nnx.Rngs(0))
      optimizer = nnx.Optimizer(model, _tx(), wrt=flt)
      for _ in range(3):
        nnx.jit(update)(model, optimizer, batch)
      models.append(model)
      optimizers.append(optimizer)
    _close(nnx.state(models[0]), nnx.state(models[1]))
    _close(nnx.state(optimizers[0]), nnx.state(optimizers[1]))


def test_nnx_tree_mode_takes_ghost_tree():
  # graph=False filters with jax's tree_util, which cannot look into the
  # ghost; its tree() is a plain tree of Param placeholders.
  with jax.enable_x64(True):
    batch = _nnx_batch()
    states = []
    for ghost in (True, False):
      model = NnxNet(nnx.Rngs(0))
      optimizer = nnx.Optimizer(model, _tx(), wrt=nnx.Param, graph=False)
      fn = gaf_flax.nnx_microgradients(_mse, N, ghost=ghost)

      @nnx.jit
      def step(model, optimizer, batch, fn=fn, ghost=ghost):
        grads = fn(model, batch)[1]
        optimizer.update(model, grads.tree() if ghost else grads)

      step(model, optimizer, batch)
      states.append(nnx.state((model, optimizer)))
    _close(*states)


def test_ghost_tree_parts_and_errors():
  with jax.enable_x64(True):
    _, params, batch, loss = _linen_case()

    @jax.jit
    def run(params, batch):
      _, ghost = optax_gaf.ghost_microgradients(loss, N)(params, batch)
      assert "Dense_0" in ghost and "nope" not in ghost
      tx = optax_gaf.gaf(0.2)
      part = ghost["Dense_0"]
      dense, _ = tx.update(part, tx.init(params), params["Dense_0"])
      with pytest.raises(TypeError, match="mixes"):
        tx.update({"a": part["kernel"], "b": jnp.ones((N, 2))}, tx.init(params))
      with pytest.raises(ValueError, match="twice"):
        tx.update([part["kernel"], part["kernel"]], tx.init(params))
      return dense

    grads = optax_gaf.microbatch_grads(loss, N)(params, batch)[1]
    tx = optax_gaf.gaf(0.2)
    want, _ = tx.update(grads["Dense_0"], tx.init(params), params["Dense_0"])
    _close(run(params, batch), want)


def test_transform_before_gaf_still_refused():
  # optax's clip before gaf would treat the captures as gradients.
  with jax.enable_x64(True):
    net, params, batch, loss = _linen_case()
    tx = _tx(optax.clip_by_global_norm(1.0))
    state = train_state.TrainState.create(
      apply_fn=net.apply, params=params, tx=tx
    )

    def step(state, batch):
      _, ghost = optax_gaf.ghost_microgradients(loss, N)(state.params, batch)
      return state.apply_gradients(grads=ghost)

    with pytest.raises(NotArraysError, match="microbatch_grads"):
      jax.jit(step)(state, batch)

    model = NnxNet(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    with pytest.raises(NotArraysError, match="microbatch_grads"):
      nnx.jit(_ghost_update)(model, optimizer, _nnx_batch())


class Dropped(nnx.Module):
  """Dropout on the input, BatchNorm, a dense head: the mask comes back."""

  def __init__(self, rngs):
    kw = {"param_dtype": jnp.float64, "rngs": rngs}
    self.dropout = nnx.Dropout(0.5, rngs=rngs)
    self.linear = nnx.Linear(6, 4, **kw)
    self.bn = nnx.BatchNorm(4, momentum=0.9, **kw)
    self.head = nnx.Linear(4, 2, **kw)

  def __call__(self, x):
    h = self.dropout(x)
    return self.head(jnp.tanh(self.bn(self.linear(h)))), h != 0


def _dropped_loss(model, b):
  out, mask = model(b["x"])
  return jnp.mean((out - b["y"]) ** 2), mask


def _dropped_batch(size=16):
  k = jax.random.split(jax.random.key(2))
  return {
    "x": 1.0 + jax.random.uniform(k[0], (size, 6), jnp.float64),
    "y": jax.random.normal(k[1], (size, 2), jnp.float64),
  }


def _distinct(masks):
  return len({np.asarray(m).tobytes() for m in masks})


def test_nnx_ghost_helper_equals_stacked_helper():
  # Same RNG streams, so the same masks; BatchNorm statistics, RNG counters
  # and the optimizer's update all equal the stacked helper's.
  with jax.enable_x64(True):
    batch = _dropped_batch()
    results = []
    for ghost in (True, False):
      model = Dropped(nnx.Rngs(0))
      stats = nnx.state(model, nnx.BatchStat)  # created in float32
      nnx.update(model, jax.tree.map(lambda x: x.astype(jnp.float64), stats))
      optimizer = nnx.Optimizer(model, _tx(), wrt=nnx.Param)
      fn = gaf_flax.nnx_microgradients(
        _dropped_loss, N, has_aux=True, ghost=ghost
      )

      @nnx.jit
      def step(model, optimizer, batch, fn=fn):
        (losses, masks), grads = fn(model, batch)
        optimizer.update(model, grads)
        return losses, masks

      out = [step(model, optimizer, batch) for _ in range(2)]
      results.append((out, nnx.state(model), nnx.state(optimizer)))
    (got, *got_state), (want, *want_state) = results
    _close(got, want)
    _close(got_state, want_state)
    masks = got[0][1]
    assert masks.shape == (N, 16 // N, 6)
    assert _distinct(masks) == N  # one mask a microbatch
    assert _distinct([got[0][1], got[1][1]]) == 2  # streams advanced


class LinenDropped(nn.Module):
  @nn.compact
  def __call__(self, x, train):
    h = nn.Dropout(0.5, deterministic=not train)(x)
    y = nn.Dense(4, param_dtype=jnp.float64)(h)
    y = nn.BatchNorm(not train, momentum=0.9, param_dtype=jnp.float64)(y)
    return nn.Dense(2, param_dtype=jnp.float64)(jnp.tanh(y)), h != 0


def test_linen_ghost_helper_equals_stacked_helper():
  with jax.enable_x64(True):
    net, batch = LinenDropped(), _dropped_batch()
    variables = net.init(jax.random.key(0), batch["x"][:1], False)

    def loss(params, model_state, b, rng):
      (out, mask), new_state = net.apply(
        {"params": params, **model_state},
        b["x"],
        True,
        rngs={"dropout": rng},
        mutable=list(model_state),
      )
      return jnp.mean((out - b["y"]) ** 2), (new_state, mask)

    def run(ghost):
      fn = gaf_flax.linen_microgradients(loss, N, has_aux=True, ghost=ghost)
      tx = _tx()

      @jax.jit
      def step(params, model_state, rng):
        (losses, masks), grads, model_state = fn(
          params, model_state, batch, rng
        )
        updates, _ = tx.update(grads, tx.init(params), params)
        return losses, masks, updates, model_state

      state = {"batch_stats": variables["batch_stats"]}
      return step(variables["params"], state, jax.random.key(3))

    got, want = run(True), run(False)
    _close(got, want)
    assert _distinct(got[1]) == N
