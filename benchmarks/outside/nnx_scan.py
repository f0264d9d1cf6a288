"""Flax NNX's scan-over-layers MLP (BatchNorm and Dropout in every layer).

Follows google/flax, examples/nnx_toy_examples/06_scan_over_layers.py
(``Block``: Linear, BatchNorm, Dropout(0.5), gelu; ``ScanMLP``: the blocks
created under ``nnx.vmap`` and applied under ``nnx.scan``), at its sizes
(width 10, 5 layers), at commit 18f8f311c275d57f46d95e41b15aa97b454754c0.
That file trains nothing; the loss and optimizer are those of the toy
examples that do (01_functional_api.py, 03_train_state.py): the mean squared
error and ``optax.sgd(0.1)``.
"""

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from benchmarks.outside import Case

SOURCE = (
  "google/flax examples/nnx_toy_examples/06_scan_over_layers.py @ 18f8f311c2"
  "75d57f46d95e41b15aa97b454754c0"
)


class Block(nnx.Module):
  def __init__(self, dim: int, *, rngs: nnx.Rngs):
    self.linear = nnx.Linear(dim, dim, rngs=rngs)
    self.bn = nnx.BatchNorm(dim, rngs=rngs)
    self.dropout = nnx.Dropout(0.5, rngs=rngs)

  def __call__(self, x):
    return jax.nn.gelu(self.dropout(self.bn(self.linear(x))))


class ScanMLP(nnx.Module):
  """``n_layers`` Blocks stacked on a layer axis, applied by ``nnx.scan``."""

  def __init__(self, dim: int, *, n_layers: int, rngs: nnx.Rngs):
    self.n_layers = n_layers

    @nnx.split_rngs(splits=n_layers)
    @nnx.vmap(axis_size=n_layers)
    def create_block(rngs: nnx.Rngs):
      return Block(dim, rngs=rngs)

    self.layers = create_block(rngs)

  def __call__(self, x):
    @nnx.scan
    def scan_fn(x, block: Block):
      return block(x), None

    x, _ = scan_fn(x, self.layers)
    return x


def case(dtype=jnp.float32) -> Case:
  def init(key, batch_size):
    k1, k2 = jax.random.split(key)
    model = ScanMLP(10, n_layers=5, rngs=nnx.Rngs(k1))
    state = nnx.state(model)
    nnx.update(
      model,
      jax.tree.map(
        lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating)
        else x,
        state,
      ),
    )  # fmt: skip
    x = jax.random.normal(k2, (batch_size, 10), dtype)
    y = 0.8 * jnp.sin(x) + 0.1
    return model, None, {"x": x, "y": y}

  def loss(model, batch):
    return jnp.mean((batch["y"] - model(batch["x"])) ** 2)

  return Case(
    name="NNX scan-over-layers MLP",
    source=SOURCE,
    kind="nnx",
    init=init,
    loss=loss,
    optimizer=lambda: optax.sgd(0.1),
  )
