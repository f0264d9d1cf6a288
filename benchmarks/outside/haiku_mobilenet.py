"""Haiku's MobileNetV1 (depthwise convolutions, BatchNorm), L2-penalised.

The model is ``hk.nets.MobileNetV1`` as the dm-haiku package ships it
(haiku/_src/nets/mobilenetv1.py), used as it is. Its loss and optimizer are
those of Haiku's imagenet example, google-deepmind/dm-haiku
examples/imagenet/train.py (``loss_fn``: softmax cross-entropy plus ``1e-4
* 0.5 *`` the squared norm of every params leaf outside BatchNorm;
``make_optimizer``: Nesterov momentum 0.9), at commit
f4d858a5cbb29140855d68f81f5fd625e078a5ae.

Reduced in size only: four blocks of 16, 32, 32 and 64 channels with
strides 1, 2, 1, 2 (thirteen blocks of 64 to 1024), 32x32x3 images (224),
10 classes (1000).
"""

import haiku as hk
import jax
import jax.numpy as jnp
import optax

from benchmarks.outside import Case

SOURCE = (
  "hk.nets.MobileNetV1 (dm-haiku 0.0.17); google-deepmind/dm-haiku"
  " examples/imagenet/train.py @ f4d858a5cbb29140855d68f81f5fd625e078a5ae"
)
NUM_CLASSES = 10


def _forward(batch, is_training):
  net = hk.nets.MobileNetV1(
    strides=(1, 2, 1, 2), channels=(16, 32, 32, 64), num_classes=NUM_CLASSES
  )
  return net(batch["images"], is_training=is_training)


forward = hk.transform_with_state(_forward)


def l2_loss(params):
  return 0.5 * sum(jnp.sum(jnp.square(p)) for p in params)


def case(dtype=jnp.float32) -> Case:
  def init(key, batch_size):
    k1, k2, k3 = jax.random.split(key, 3)
    batch = {
      "images": jax.random.normal(k1, (batch_size, 32, 32, 3), dtype),
      "labels": jax.random.randint(k2, (batch_size,), 0, NUM_CLASSES),
    }
    params, state = forward.init(k3, batch, is_training=True)
    return params, state, batch

  def loss(params, state, batch, rng):
    del rng  # no dropout
    logits, state = forward.apply(params, state, None, batch, is_training=True)
    labels = jax.nn.one_hot(batch["labels"], NUM_CLASSES)
    loss = optax.softmax_cross_entropy(logits=logits, labels=labels).mean()
    l2_params = [
      p
      for ((mod_name, _), p) in _flatten_with_path(params)
      if "batchnorm" not in mod_name
    ]
    return loss + 1e-4 * l2_loss(l2_params), state

  return Case(
    name="Haiku MobileNetV1",
    source=SOURCE,
    kind="stateful",
    init=init,
    loss=loss,
    optimizer=lambda: optax.chain(
      optax.trace(decay=0.9, nesterov=True), optax.scale(-0.1)
    ),
  )


def _flatten_with_path(params):
  """``((module_name, param_name), value)``, as dm-tree's on Haiku params."""
  return [
    ((mod, name), p) for mod, ps in params.items() for name, p in ps.items()
  ]
