"""A layer's weight that the loss also reads elsewhere (issue 25): an L2
term as Flax's and Haiku's imagenet examples write it, a weight norm, a
data-dependent read. The layer keeps its ghost or materialize route and the
other reads add an exact residual; each case is ``microbatch_grads``' step
in float64."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import optax_gaf
from tests import helpers
from tests.integration.test_ghost_exact import assert_same_step
from tests.integration.test_ghost_exact import stacked_gram

N = 8


def conv_net(p, x):
  h = jax.lax.conv_general_dilated(
    x, p["conv"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
  )
  h = jax.nn.relu(h + p["bias"]).mean(axis=(1, 2))
  return h @ p["dense"]


def l2_loss(p, b):
  """The authors' imagenet loss: cross entropy plus an L2 term over every
  leaf of rank > 1 (Flax ``examples/imagenet/train.py``)."""
  logits = conv_net(p, b["x"])
  xent = optax.softmax_cross_entropy_with_integer_labels(logits, b["y"])
  l2 = sum(jnp.sum(x**2) for x in jax.tree.leaves(p) if x.ndim > 1)
  return xent.mean() + 5e-2 * l2


def setup(dtype=jnp.float64):
  k = jax.random.split(jax.random.key(0), 4)
  params = {
    "conv": jax.random.normal(k[0], (3, 3, 2, 4), dtype) * 0.5,
    "bias": jnp.full((4,), 0.1, dtype),
    "dense": jax.random.normal(k[1], (4, 3), dtype),
  }
  batch = {
    "x": jax.random.normal(k[2], (16, 5, 5, 2), dtype),
    "y": jax.random.randint(k[3], (16,), 0, 3),
  }
  return params, batch


def ghost_of(loss, params, batch, route="auto"):
  out = {}

  def run(p, b):
    ghost = optax_gaf.ghost_microgradients(loss, N, route=route)(p, b)[1]
    out["routes"], out["residuals"] = ghost.routes, ghost.residuals
    out["kinds"] = ghost.kinds
    return ghost.gram(), ghost.combine(jnp.arange(N) / N, jnp.ones(N, bool))

  gram, combined = jax.jit(run)(params, batch)
  assert out["kinds"] == [None, "Conv", "Dense"]  # bias, conv, dense
  return gram, combined, out["routes"], out["residuals"]


@pytest.mark.parametrize("route", ["auto", "ghost", "materialize"])
def test_l2_term_keeps_the_layers_routes(route):
  """Leaves: bias (direct), conv, dense. The L2 term's gradient is the same
  for every microbatch ("shared"); Gram matrix, weighted sum and the gaf
  step are the stacked route's."""
  with jax.enable_x64(True):
    params, batch = setup()
    gram, combined, routes, residuals = ghost_of(l2_loss, params, batch, route)
    assert routes[0] == "direct" and residuals == [None, "shared", "shared"]
    assert "direct" not in routes[1:]
    if route != "auto":
      assert routes[1:] == [route] * 2
    np.testing.assert_allclose(
      gram, stacked_gram(l2_loss, N, params, batch), rtol=1e-10
    )
    g = optax_gaf.microbatch_grads(l2_loss, N)(params, batch)[1]
    want = [jnp.tensordot(jnp.arange(N) / N, x, 1) for x in jax.tree.leaves(g)]
    for a, b in zip(combined, want):
      np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14)
    assert_same_step(l2_loss, N, params, batch, tau=0.9)


@pytest.mark.parametrize("route", ["ghost", "materialize"])
def test_l2_term_on_a_grouped_convolution(route):
  """A depthwise-then-grouped stack (kernel features split in groups) with
  an L2 term: the residual in the grouped layout, exact."""

  def loss(p, b):
    conv = lambda x, w, g: jax.lax.conv_general_dilated(
      x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=g,
    )  # fmt: skip
    h = jnp.tanh(conv(conv(b["x"], p["dw"], 2), p["gw"], 2))
    l2 = jnp.sum(p["dw"] ** 2) + jnp.sum(p["gw"] ** 2)
    return jnp.mean((h.mean(axis=(1, 2)) - b["t"]) ** 2) + 0.1 * l2

  with jax.enable_x64(True):
    k = jax.random.split(jax.random.key(1), 4)
    params = {
      "dw": jax.random.normal(k[0], (3, 3, 1, 4), jnp.float64),
      "gw": jax.random.normal(k[1], (1, 1, 2, 6), jnp.float64),
    }
    batch = {
      "x": jax.random.normal(k[2], (16, 5, 5, 2), jnp.float64),
      "t": jax.random.normal(k[3], (16, 6), jnp.float64),
    }
    ghost = optax_gaf.ghost_microgradients(loss, N, route=route)
    _, g = ghost(params, batch)
    assert g.routes == [route] * 2 and g.residuals == ["shared"] * 2
    np.testing.assert_allclose(
      g.gram(), stacked_gram(loss, N, params, batch), rtol=1e-10
    )
    assert_same_step(loss, N, params, batch, tau=0.9)


def test_a_read_that_depends_on_the_data_is_per_microbatch():
  """An L2 term scaled by the microbatch's own mean input differs per
  microbatch: it is formed per microbatch, exactly."""

  def loss(p, b):
    scale = 1 + jnp.mean(b["x"] ** 2)
    return l2_loss(p, b) + scale * jnp.sum(p["dense"] ** 2)

  with jax.enable_x64(True):
    params, batch = setup()
    gram, _, routes, residuals = ghost_of(loss, params, batch, "ghost")
    assert residuals == [None, "shared", "per_microbatch"]
    assert routes == ["direct", "ghost", "materialize"]
    np.testing.assert_allclose(
      gram, stacked_gram(loss, N, params, batch), rtol=1e-10
    )
    assert_same_step(loss, N, params, batch, tau=0.9)


def test_weight_norm_and_an_aux_output_are_residuals():
  """A weight read by its layer, by a norm in the loss and returned as aux:
  the norm's gradient depends on the weight alone ("shared")."""

  def loss(p, b):
    return l2_loss(p, b) + jnp.linalg.norm(p["dense"]), p["dense"]

  with jax.enable_x64(True):
    params, batch = setup()
    fn = optax_gaf.ghost_microgradients(loss, N, has_aux=True)
    (_, aux), ghost = fn(params, batch)
    assert ghost.residuals[2] == "shared" and aux.shape == (N, 4, 3)
    want = stacked_gram(lambda p, b: loss(p, b)[0], N, params, batch)
    np.testing.assert_allclose(ghost.gram(), want, rtol=1e-10)


def test_float32_residual_matches_float64_oracle():
  """float32 captures and residual: the cosine distances of the stacked
  route's float64 Gram matrix, to float32 precision."""
  params, batch = setup(jnp.float32)
  gram = ghost_of(l2_loss, params, batch, "ghost")[0]
  with jax.enable_x64(True):
    p64 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), params)
    b64 = {"x": jnp.asarray(batch["x"], jnp.float64), "y": batch["y"]}
    want = np.asarray(stacked_gram(l2_loss, N, p64, b64))
  s = np.sqrt(np.diagonal(want))
  err = np.abs(np.asarray(gram, np.float64) - want) / s / s[:, None]
  assert np.max(err) < 1e-5


def test_inside_shard_map():
  """Per device under ``jax.shard_map``: each device's microbatches, with
  the shared residual, as ``microbatch_grads`` gives them."""
  params, batch = setup(jnp.float32)
  batch = helpers.shard(jax.tree.map(lambda x: jnp.concatenate([x] * 4), batch))

  def step(producer):
    tx = optax_gaf.gaf(0.9, num_microbatches=N)

    def one(p, b):
      if producer is optax_gaf.microbatch_grads:
        p = jax.lax.pcast(p, "data", to="varying")
      updates, state = tx.update(producer(l2_loss, N)(p, b)[1], tx.init(p), p)
      return jax.tree.map(lambda x: x[None], updates), state.accepted[None]

    return jax.jit(
      jax.shard_map(
        one,
        mesh=helpers.mesh(),
        in_specs=(P(), P("data")),
        out_specs=(P("data"), P("data")),
      )
    )

  got = step(optax_gaf.ghost_microgradients)(params, batch)
  want = step(optax_gaf.microbatch_grads)(params, batch)
  np.testing.assert_array_equal(got[1], want[1])
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6),
    got[0],
    want[0],
  )


def test_a_large_direct_leaf_warns_once_naming_why(monkeypatch):
  """Tied weights (two layers) of 300 x 300 go direct: one warning at
  trace time naming the leaf and the reason; the small bias stays quiet."""
  from optax_gaf._ghost import producer

  monkeypatch.setattr(producer, "_WARNED", set())

  def loss(p, b):
    return jnp.mean((jnp.tanh(b @ p["w"]) @ p["w"].T + p["b"]) ** 2)

  params = {"w": jnp.ones((300, 300)) / 300, "b": jnp.zeros(300)}
  batch = jnp.ones((8, 300))
  ghost = optax_gaf.ghost_microgradients(loss, 4)
  fn = jax.jit(lambda p, b: ghost(p, b)[1].gram())
  with pytest.warns(UserWarning, match=r"\['w'\] \(300, 300\).*2 layers"):
    fn(params, batch)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    fn(params, jnp.ones((16, 300)))  # traced again: warned already
