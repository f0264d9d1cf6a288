"""One of the programs that docs/guides/flax.md converts to GAF.

  python examples/flax_guide/linen_mnist.py      # the example, unchanged
  python examples/flax_guide/linen_mnist_gaf.py  # converted (the diff)

Flax's Linen MNIST example: a CNN trained with a ``TrainState`` and SGD with
momentum, scaled to scikit-learn's 8x8 digits (offline), with 40% of the
training labels moved to another class.
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax.training import train_state
from sklearn import datasets

import optax_gaf


def load_digits(label_noise=0.4, seed=0):
  """1300 training images (noisy labels), 497 clean test images."""
  x, y = datasets.load_digits(return_X_y=True)
  x = (x / 16.0).astype(np.float32).reshape(-1, 8, 8, 1)
  rng = np.random.default_rng(seed)
  perm = rng.permutation(len(x))
  x, y = x[perm], y[perm].astype(np.int32)
  train_y = y[:1300].copy()
  noisy = rng.random(1300) < label_noise
  train_y[noisy] = (train_y[noisy] + rng.integers(1, 10, noisy.sum())) % 10
  return x[:1300], train_y, x[1300:], y[1300:]


class CNN(nn.Module):
  """A simple CNN model."""

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(features=16, kernel_size=(3, 3))(x)
    x = nn.relu(x)
    x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
    x = nn.Conv(features=32, kernel_size=(3, 3))(x)
    x = nn.relu(x)
    x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))  # flatten
    x = nn.Dense(features=64)(x)
    x = nn.relu(x)
    x = nn.Dense(features=10)(x)
    return x


@jax.jit
def apply_model(state, images, labels):
  """Computes gradients, loss and accuracy for a single batch."""

  def loss_fn(params, batch):  # batch: one microbatch
    images, labels = batch
    logits = state.apply_fn({"params": params}, images)
    one_hot = jax.nn.one_hot(labels, 10)
    loss = jnp.mean(optax.softmax_cross_entropy(logits=logits, labels=one_hot))
    return loss, logits

  grad_fn = optax_gaf.microbatch_grads(loss_fn, 4, has_aux=True)
  (losses, logits), grads = grad_fn(state.params, (images, labels))
  loss, logits = losses.mean(), logits.reshape(-1, 10)  # [4, B/4] -> [B]
  accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
  return grads, loss, accuracy


@jax.jit
def eval_model(state, images, labels):  # any batch size: no microbatches
  logits = state.apply_fn({"params": state.params}, images)
  return jnp.mean(jnp.argmax(logits, -1) == labels)


@jax.jit
def update_model(state, grads):
  return state.apply_gradients(grads=grads)


def create_train_state(rng, learning_rate, momentum):
  """Creates initial `TrainState`."""
  cnn = CNN()
  params = cnn.init(rng, jnp.ones([1, 8, 8, 1]))["params"]
  tx = optax_gaf.process(  # skips sgd on steps where nothing agrees
    optax.identity(), optax_gaf.gaf(0.8), optax.sgd(learning_rate, momentum)
  )
  return train_state.TrainState.create(apply_fn=cnn.apply, params=params, tx=tx)


def main(steps=1000, batch_size=32, learning_rate=0.1, momentum=0.9):
  train_x, train_y, test_x, test_y = load_digits()
  state = create_train_state(jax.random.key(0), learning_rate, momentum)
  rng = np.random.default_rng(0)
  for _ in range(steps):
    idx = rng.choice(len(train_x), batch_size, replace=False)
    grads, loss, _ = apply_model(state, train_x[idx], train_y[idx])
    state = update_model(state, grads)
  test_accuracy = eval_model(state, test_x, test_y)  # 497: N=4 won't divide
  return float(loss), float(test_accuracy)


if __name__ == "__main__":
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--steps", type=int, default=1000)
  loss, accuracy = main(p.parse_args().steps)
  print(f"train loss {loss:.3f}, test accuracy {accuracy:.3f}")
