"""Parameters read inside ``lax.scan`` take the ghost route, exactly.

A stack of layers scanned over (``lax.scan`` over ``W [L, ...]``, Flax NNX's
``nnx.scan`` over layers, also under ``nnx.remat``), an RNN's weight read
every iteration (a scan constant), a reverse scan and a checkpointed scan
body: ``ghost_microgradients`` routes those leaves ``ghost`` or
``materialize`` and gives, in float64, the Gram matrices, ``gaf``'s
decisions and its updates of ``microbatch_grads``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import optax_gaf
import optax_gaf.flax as gaf_flax
from optax_gaf import _gram
from optax_gaf import rules

N = 4
TAUS = np.linspace(0.2, 1.8, 17)


def normal(key, shape, scale=1.0):
  return scale * jax.random.normal(key, shape, jnp.float64)


@jax.jit
def decide(grams):
  """The sequential rule's decisions at each threshold of ``TAUS``."""
  gram, usable = _gram.sanitized(jnp.sum(grams, 0))
  rule = lambda t: rules.sequential(gram, usable, t).accepted
  return jax.vmap(rule)(jnp.asarray(TAUS))


def run_both(loss, params, batch, tau, route):
  """Jitted: per route (ghost, stacked) the per-leaf Gram matrices and one
  ``gaf`` step; with the ghost's routes."""
  tx = optax_gaf.gaf(tau, num_microbatches=N)
  routes = []

  @jax.jit
  def run(p, b):
    ghost = optax_gaf.ghost_microgradients(loss, N, route=route)(p, b)[1]
    routes[:] = ghost.routes
    stacked = optax_gaf.microbatch_grads(loss, N)(p, b)[1]
    grams = (
      ghost.gram(per_leaf=True),
      _gram.gram(jax.tree.leaves(stacked), per_leaf=True),
    )
    steps = [tx.update(g, tx.init(p), p) for g in (ghost, stacked)]
    return grams, steps

  return (*run(params, batch), routes)


def assert_same(loss, params, batch, tau=1.0, route="auto"):
  """The ghost route is the stacked route; returns the ghost's routes."""
  (got, want), (ghost, stacked), routes = run_both(
    loss, params, batch, tau, route
  )
  scale = float(np.max(np.abs(want)))
  np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12 * scale)
  # The sequential rule decides alike at every threshold.
  np.testing.assert_array_equal(decide(got), decide(want))
  (updates, state), (want_updates, want_state) = ghost, stacked
  np.testing.assert_array_equal(state.accepted, want_state.accepted)
  np.testing.assert_allclose(
    state.cosine_distance, want_state.cosine_distance, rtol=1e-10
  )
  for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(want_updates)):
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14)
  return routes


# --- plain JAX


def stack_loss(p, b):
  """A ``lax.scan`` over a stack of dense layers, then a head."""
  body = lambda h, w: (jnp.tanh(h @ w), None)
  h = jax.lax.scan(body, b["x"], p["stack"])[0]
  return jnp.sum(jnp.sin(h @ p["head"]) * b["t"])


def stack_setup(width=3, layers=4, tokens=1):
  k = iter(jax.random.split(jax.random.key(0), 5))
  params = {
    "head": normal(next(k), (width, 2)),
    "stack": normal(next(k), (layers, width, width), width**-0.5),
  }
  shape = (8, tokens, width) if tokens > 1 else (8, width)
  batch = {
    "x": normal(next(k), shape),
    "t": normal(next(k), (*shape[:-1], 2)),
  }
  return params, batch


@pytest.mark.parametrize(
  "route, tokens", [("auto", 1), ("ghost", 5), ("materialize", 5)]
)
def test_a_scan_over_a_stack_of_layers(route, tokens):
  with jax.enable_x64(True):
    params, batch = stack_setup(tokens=tokens)
    routes = assert_same(stack_loss, params, batch, route=route)
  if route != "auto":
    assert routes == [route, route]
  else:
    assert routes[1] in ("ghost", "materialize")


def rnn_loss(p, b, reverse=False):
  """An RNN: ``w_hh`` a scan constant, ``w_in`` a stack read per step."""

  def step(h, xs):
    x_t, w_in = xs
    h = jnp.tanh(h @ p["w_hh"] + x_t @ w_in)
    return h, h

  seq = b["seq"].swapaxes(0, 1)  # [T, batch, E]: the scan's axis first
  h, hs = jax.lax.scan(
    step, jnp.zeros(seq.shape[1:2] + (3,)), (seq, p["w_in"]), reverse=reverse
  )
  return jnp.sum(jnp.sin(h @ p["head"])) + 0.1 * jnp.sum(hs**2)


def rnn_setup(steps=5):
  k = iter(jax.random.split(jax.random.key(1), 5))
  params = {
    "head": normal(next(k), (3, 2)),
    "w_hh": normal(next(k), (3, 3), 0.5),
    "w_in": normal(next(k), (steps, 2, 3)),
  }
  return params, {"seq": normal(next(k), (8, steps, 2))}


@pytest.mark.parametrize(
  "route, reverse",
  [("auto", False), ("ghost", True), ("materialize", True)],
)
def test_an_rnn_weight_read_every_step(route, reverse):
  """A constant read in each iteration: the steps are more tokens."""
  loss = lambda p, b: rnn_loss(p, b, reverse)
  with jax.enable_x64(True):
    params, batch = rnn_setup()
    routes = assert_same(loss, params, batch, route=route)
  assert "direct" not in routes
  if route != "auto":
    assert routes == [route] * 3


def test_a_checkpointed_scan_body():
  """``jax.checkpoint`` in the body (remat in a scan over layers)."""

  def loss(p, b):
    block = jax.checkpoint(lambda h, w: jnp.tanh(h @ w))
    h = jax.lax.scan(lambda h, w: (block(h, w), None), b["x"], p["stack"])[0]
    return jnp.sum(jnp.sin(h @ p["head"]) * b["t"])

  with jax.enable_x64(True):
    params, batch = stack_setup()
    routes = assert_same(loss, params, batch, route="ghost")
  assert routes == ["ghost", "ghost"]


def test_a_weight_read_in_and_after_a_scan_is_direct():
  def loss(p, b):
    return stack_loss(p, b) + jnp.sum(p["stack"] ** 2)

  with jax.enable_x64(True):
    params, batch = stack_setup()
    routes = assert_same(loss, params, batch)
  assert routes[1] == "direct"


# --- Flax NNX: nnx.scan over layers


class Block(nnx.Module):
  def __init__(self, dim, rngs):
    kw = {"param_dtype": jnp.float64, "rngs": rngs}
    self.linear = nnx.Linear(dim, dim, **kw)
    self.bn = nnx.BatchNorm(dim, **kw)
    self.dropout = nnx.Dropout(0.5, rngs=rngs)

  def __call__(self, x):
    return jax.nn.gelu(self.dropout(self.bn(self.linear(x))))


class ScanMLP(nnx.Module):
  """Flax's scan-over-layers example (benchmarks/outside/nnx_scan.py)."""

  def __init__(self, dim, n_layers, rngs, remat=False):
    @nnx.split_rngs(splits=n_layers)
    @nnx.vmap(axis_size=n_layers)
    def create_block(rngs):
      return Block(dim, rngs)

    self.layers = create_block(rngs)
    self.remat = remat

  def __call__(self, x):
    body = lambda x, block: (block(x), None)
    body = nnx.remat(body) if self.remat else body
    return nnx.scan(body)(x, self.layers)[0]


def mse(model, b):
  return jnp.mean((b["y"] - model(b["x"])) ** 2)


# BatchNorm keeps its statistics in float32; nnx.scan writes the float64
# ones of each layer back into that stack.
@pytest.mark.filterwarnings("ignore:scatter inputs have incompatible types")
@pytest.mark.parametrize("remat", [False, True], ids=["scan", "scan_remat"])
def test_nnx_scan_over_layers(remat):
  """``nnx_microgradients(ghost=True)`` then ``nnx.Optimizer.update``: the
  stacked kernels go ghost (or materialize), and every state matches."""
  with jax.enable_x64(True):
    x = normal(jax.random.key(2), (8, 4))
    batch = {"x": x, "y": 0.8 * jnp.sin(x) + 0.1}
    tx = optax_gaf.process(
      optax.identity(), optax_gaf.gaf(0.97), optax.sgd(0.1)
    )
    states, routes = [], []
    for ghost in (True, False):
      model = ScanMLP(4, 3, nnx.Rngs(0), remat)
      optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
      fn = gaf_flax.nnx_microgradients(mse, N, ghost=ghost)

      @nnx.jit
      def step(model, optimizer, batch, fn=fn, ghost=ghost):
        grads = fn(model, batch)[1]
        if ghost:
          routes[:] = grads.routes
        optimizer.update(model, grads)

      for _ in range(2):
        step(model, optimizer, batch)
      states.append(nnx.state((model, optimizer)))
  for a, b in zip(*map(jax.tree.leaves, states), strict=True):
    if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
      a, b = jax.random.key_data(a), jax.random.key_data(b)
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
  # bn bias, bn scale, linear bias, linear kernel: the stacked kernel
  assert routes[3] in ("ghost", "materialize")
  assert routes[:3] == ["direct"] * 3
