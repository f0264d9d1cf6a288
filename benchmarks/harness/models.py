"""Flax NNX models for the noisy-label benchmarks: one definition each.

* ``MLP``: for 8x8 digits (flattened).
* ``SmallCNN``: two conv layers, for digits.
* ``ResNet18``: the CIFAR ResNet-18 of the paper's Figure 6 (3x3 stem, no
  max-pool, BatchNorm). Under ``jax.vmap`` over microbatches each microbatch
  normalises with its own batch statistics, as each worker of a data-parallel
  run would; the training loop averages the running statistics.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx


class MLP(nnx.Module):
  """``in -> hidden -> hidden -> classes`` with ReLU."""

  def __init__(
    self,
    in_features: int,
    num_classes: int,
    *,
    hidden: int = 256,
    rngs: nnx.Rngs,
  ):
    self.l1 = nnx.Linear(in_features, hidden, rngs=rngs)
    self.l2 = nnx.Linear(hidden, hidden, rngs=rngs)
    self.out = nnx.Linear(hidden, num_classes, rngs=rngs)

  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    x = jax.nn.relu(self.l1(x))
    x = jax.nn.relu(self.l2(x))
    return self.out(x)


class SmallCNN(nnx.Module):
  """Two 3x3 convolutions, global average pooling, a linear head."""

  def __init__(
    self, in_channels: int, num_classes: int, *, width: int = 32, rngs: nnx.Rngs
  ):
    self.c1 = nnx.Conv(in_channels, width, (3, 3), rngs=rngs)
    self.c2 = nnx.Conv(width, 2 * width, (3, 3), rngs=rngs)
    self.out = nnx.Linear(2 * width, num_classes, rngs=rngs)

  def __call__(self, x):
    x = jax.nn.relu(self.c1(x))
    x = jax.nn.relu(self.c2(x))
    return self.out(jnp.mean(x, axis=(1, 2)))


class BasicBlock(nnx.Module):
  """ResNet basic block: two 3x3 conv-BN, identity or 1x1 shortcut."""

  def __init__(self, cin: int, cout: int, stride: int, *, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(
      cin, cout, (3, 3), strides=stride, use_bias=False, rngs=rngs
    )
    self.bn1 = nnx.BatchNorm(cout, rngs=rngs)
    self.conv2 = nnx.Conv(cout, cout, (3, 3), use_bias=False, rngs=rngs)
    self.bn2 = nnx.BatchNorm(cout, rngs=rngs)
    if stride != 1 or cin != cout:
      self.proj = nnx.Conv(
        cin, cout, (1, 1), strides=stride, use_bias=False, rngs=rngs
      )
      self.proj_bn = nnx.BatchNorm(cout, rngs=rngs)
    else:
      self.proj = None
      self.proj_bn = None

  def __call__(self, x):
    y = jax.nn.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    shortcut = x if self.proj is None else self.proj_bn(self.proj(x))
    return jax.nn.relu(y + shortcut)


class ResNet18(nnx.Module):
  """ResNet-18 for 32x32 inputs: stages of 64, 128, 256, 512 channels.

  ``width`` scales the stages (``width, 2 width, 4 width, 8 width``); the
  tests use a narrow one to run the real code path in seconds.
  """

  def __init__(
    self, in_channels: int, num_classes: int, *, width: int = 64, rngs: nnx.Rngs
  ):
    self.stem = nnx.Conv(in_channels, width, (3, 3), use_bias=False, rngs=rngs)
    self.stem_bn = nnx.BatchNorm(width, rngs=rngs)
    blocks = []
    cin = width
    for mult, stride in ((1, 1), (2, 2), (4, 2), (8, 2)):
      cout = mult * width
      blocks += [
        BasicBlock(cin, cout, stride, rngs=rngs),
        BasicBlock(cout, cout, 1, rngs=rngs),
      ]
      cin = cout
    self.blocks = nnx.List(blocks)
    self.head = nnx.Linear(cin, num_classes, rngs=rngs)

  def __call__(self, x):
    x = jax.nn.relu(self.stem_bn(self.stem(x)))
    for block in self.blocks:
      x = block(x)
    return self.head(jnp.mean(x, axis=(1, 2)))


MODELS = {"mlp": MLP, "cnn": SmallCNN, "resnet18": ResNet18}


def make_model(
  name: str, in_shape: tuple[int, ...], num_classes: int, seed: int
) -> nnx.Module:
  """Builds ``MODELS[name]`` for images of shape ``in_shape`` (H, W, C)."""
  if name not in MODELS:
    raise ValueError(f"Unknown model {name!r}; choose one of {sorted(MODELS)}.")
  rngs = nnx.Rngs(seed)
  if name == "mlp":
    return MLP(math.prod(in_shape), num_classes, rngs=rngs)
  return MODELS[name](in_shape[-1], num_classes, rngs=rngs)
