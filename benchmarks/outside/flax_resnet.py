"""Flax's imagenet ResNet (Linen, BatchNorm) with its L2-penalised loss.

Follows google/flax, examples/imagenet/models.py (``ResNet``,
``ResNetBlock``) and examples/imagenet/train.py (``train_step``'s
``loss_fn``: cross-entropy plus ``0.0001 * 0.5 *`` the squared norm of every
params leaf with ``ndim > 1``; ``optax.sgd(lr, momentum=0.9,
nesterov=True)``), at commit 18f8f311c275d57f46d95e41b15aa97b454754c0.

Reduced in size only: two stages of one ``ResNetBlock`` each (ResNet18 has
four of two), 8 filters (64), 16x16x3 images (224x224x3), 10 classes
(1000). BatchNorm's ``axis_name="batch"`` is left out: there is no ``pmap``
here to name it.
"""

import functools
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from benchmarks.outside import Case

SOURCE = (
  "google/flax examples/imagenet/models.py, train.py @ 18f8f311c275d57f46d9"
  "5e41b15aa97b454754c0"
)
NUM_CLASSES = 10


class ResNetBlock(nn.Module):
  """Two 3x3 convolutions with BatchNorm and a projected shortcut."""

  filters: int
  conv: Any
  norm: Any
  act: Callable
  strides: tuple[int, int] = (1, 1)

  @nn.compact
  def __call__(self, x):
    residual = x
    y = self.conv(self.filters, (3, 3), self.strides)(x)
    y = self.act(self.norm()(y))
    y = self.conv(self.filters, (3, 3))(y)
    y = self.norm(scale_init=nn.initializers.zeros_init())(y)
    if residual.shape != y.shape:
      residual = self.conv(
        self.filters, (1, 1), self.strides, name="conv_proj"
      )(residual)
      residual = self.norm(name="norm_proj")(residual)
    return self.act(residual + y)


class ResNet(nn.Module):
  """ResNet V1.5: a 7x7 stem, max pooling, stages of blocks, a dense head."""

  stage_sizes: Sequence[int]
  block_cls: Any
  num_classes: int
  num_filters: int = 64
  dtype: Any = jnp.float32
  act: Callable = nn.relu

  @nn.compact
  def __call__(self, x, train: bool = True):
    conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype)
    norm = functools.partial(
      nn.BatchNorm,
      use_running_average=not train,
      momentum=0.9,
      epsilon=1e-5,
      dtype=self.dtype,
    )
    x = conv(
      self.num_filters,
      (7, 7),
      (2, 2),
      padding=[(3, 3), (3, 3)],
      name="conv_init",
    )(x)
    x = nn.relu(norm(name="bn_init")(x))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
    for i, block_size in enumerate(self.stage_sizes):
      for j in range(block_size):
        strides = (2, 2) if i > 0 and j == 0 else (1, 1)
        x = self.block_cls(
          self.num_filters * 2**i, strides=strides, conv=conv, norm=norm,
          act=self.act,
        )(x)  # fmt: skip
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dense(self.num_classes, dtype=self.dtype)(x)
    return jnp.asarray(x, self.dtype)


def case(dtype=jnp.float32) -> Case:
  model = ResNet(
    stage_sizes=[1, 1],
    block_cls=ResNetBlock,
    num_classes=NUM_CLASSES,
    num_filters=8,
    dtype=dtype,
  )

  def init(key, batch_size):
    k1, k2, k3 = jax.random.split(key, 3)
    images = jax.random.normal(k1, (batch_size, 16, 16, 3), dtype)
    labels = jax.random.randint(k2, (batch_size,), 0, NUM_CLASSES)
    variables = model.init(k3, images[:1], train=False)
    variables = jax.tree.map(lambda x: x.astype(dtype), variables)
    state = {"batch_stats": variables["batch_stats"]}
    return variables["params"], state, {"image": images, "label": labels}

  def loss(params, model_state, batch, rng):
    del rng  # no dropout
    logits, new_model_state = model.apply(
      {"params": params, **model_state},
      batch["image"],
      mutable=["batch_stats"],
    )
    one_hot = jax.nn.one_hot(batch["label"], NUM_CLASSES)
    loss = jnp.mean(optax.softmax_cross_entropy(logits=logits, labels=one_hot))
    weight_l2 = sum(
      jnp.sum(x**2) for x in jax.tree.leaves(params) if x.ndim > 1
    )
    return loss + 0.0001 * 0.5 * weight_l2, new_model_state

  return Case(
    name="Flax imagenet ResNet",
    source=SOURCE,
    kind="stateful",
    init=init,
    loss=loss,
    optimizer=lambda: optax.sgd(0.1, momentum=0.9, nesterov=True),
  )
