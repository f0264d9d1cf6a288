"""Grouped, depthwise and transposed convolutions on the ghost route.

A depthwise-separable block (a depthwise, a pointwise and a transposed
convolution, Flax Linen) keeps its kernels on the ``ghost`` or
``materialize`` route, never ``direct``; its Gram matrix, ``gaf``'s
decisions and its update equal the stacked route's in float64.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from optax_gaf._ghost import layers
from optax_gaf._ghost import trace
from tests.integration import test_ghost_exact as exact

N = 4


class SeparableBlock(nn.Module):
  """MobileNet's depthwise-separable block, then a learnt upsampling."""

  transpose_kernel: bool = True

  @nn.compact
  def __call__(self, x):
    kw = {"use_bias": False, "param_dtype": jnp.float64}
    c = x.shape[-1]
    x = nn.Conv(c, (3, 3), 2, feature_group_count=c, name="depthwise", **kw)(x)
    x = nn.Conv(6, (1, 1), name="pointwise", **kw)(jax.nn.relu(x))
    x = nn.ConvTranspose(
      4, (3, 3), (2, 2), transpose_kernel=self.transpose_kernel, name="up", **kw
    )(jax.nn.relu(x))
    return nn.Dense(3, param_dtype=jnp.float64)(x.mean(axis=(1, 2)))


def block_setup(transpose_kernel):
  model = SeparableBlock(transpose_kernel)
  x = exact.normal(0, (8, 6, 6, 4))
  params = model.init(jax.random.key(1), x[:1])["params"]
  labels = jnp.arange(8) % 3

  def loss(p, b):
    logits = model.apply({"params": p}, b["x"])
    return optax.softmax_cross_entropy_with_integer_labels(
      logits, b["y"]
    ).mean()

  return loss, params, {"x": x, "y": labels}


@pytest.mark.parametrize("transpose_kernel", [False, True])
def test_depthwise_separable_block_matches_the_stacked_route(transpose_kernel):
  with jax.enable_x64(True):
    loss, params, batch = block_setup(transpose_kernel)
    one = jax.tree.map(lambda x: x[:2], batch)
    kinds = [type(s.layer) for s in trace.find_sites(loss, params, one).sites]
    assert kinds == [layers.Dense] + [layers.Conv] * 3
    # Leaves: Dense_0 bias (direct), Dense_0 kernel, depthwise, pointwise, up.
    routes = exact.routes_of(loss, N, params, batch)
    assert routes[0] == "direct"
    assert set(routes[1:]) <= {"ghost", "materialize"}
    want = jax.jit(exact.stacked_gram, static_argnums=(0, 1))(
      loss, N, params, batch
    )
    for route in ("ghost", "materialize"):  # "auto" is one of them
      got = jax.jit(
        exact.ghost_gram, static_argnums=(0, 1), static_argnames="route"
      )(loss, N, params, batch, route=route)
      np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)
      exact.assert_same_decisions(got, want, np.linspace(0.5, 1.5, 11))
    state = exact.assert_same_step(loss, N, params, batch, 0.9)
    assert 0 < int(np.sum(state.accepted)) < N  # both decisions taken
