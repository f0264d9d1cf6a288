"""One of the programs that docs/guides/flax.md converts to GAF.

  python examples/flax_guide/nnx_tutorial.py      # the tutorial, unchanged
  python examples/flax_guide/nnx_tutorial_gaf.py  # converted (the diff)

The Flax NNX MNIST tutorial's program: a CNN with BatchNorm and Dropout,
``nnx.Optimizer`` with adamw and ``nnx.MultiMetric``, scaled to
scikit-learn's 8x8 digits (offline), with 40% of the training labels moved to
another class.
"""

import argparse
from functools import partial

import numpy as np
import optax
from flax import nnx
from sklearn import datasets


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


class CNN(nnx.Module):
  """A simple CNN model."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(1, 16, kernel_size=(3, 3), rngs=rngs)
    self.batch_norm1 = nnx.BatchNorm(16, rngs=rngs)
    self.dropout1 = nnx.Dropout(rate=0.025, rngs=rngs)
    self.conv2 = nnx.Conv(16, 32, kernel_size=(3, 3), rngs=rngs)
    self.batch_norm2 = nnx.BatchNorm(32, rngs=rngs)
    self.avg_pool = partial(nnx.avg_pool, window_shape=(2, 2), strides=(2, 2))
    self.linear1 = nnx.Linear(128, 64, rngs=rngs)
    self.dropout2 = nnx.Dropout(rate=0.025, rngs=rngs)
    self.linear2 = nnx.Linear(64, 10, rngs=rngs)

  def __call__(self, x):
    x = self.avg_pool(nnx.relu(self.batch_norm1(self.dropout1(self.conv1(x)))))
    x = self.avg_pool(nnx.relu(self.batch_norm2(self.conv2(x))))
    x = x.reshape(x.shape[0], -1)  # flatten
    x = nnx.relu(self.dropout2(self.linear1(x)))
    return self.linear2(x)


def loss_fn(model: CNN, batch):
  logits = model(batch["image"])
  loss = optax.softmax_cross_entropy_with_integer_labels(
    logits=logits, labels=batch["label"]
  ).mean()
  return loss, logits


@nnx.jit
def train_step(model: CNN, optimizer: nnx.Optimizer, metrics, batch):
  """Train for a single step."""
  grad_fn = nnx.value_and_grad(loss_fn, has_aux=True)
  (loss, logits), grads = grad_fn(model, batch)
  metrics.update(loss=loss, logits=logits, labels=batch["label"])
  optimizer.update(model, grads)


@nnx.jit
def eval_step(model: CNN, metrics: nnx.MultiMetric, batch):
  loss, logits = loss_fn(model, batch)
  metrics.update(loss=loss, logits=logits, labels=batch["label"])


def create_optimizer(model, learning_rate, momentum):
  tx = optax.adamw(learning_rate, momentum)
  return nnx.Optimizer(model, tx, wrt=nnx.Param)


def main(steps=1000, batch_size=32, learning_rate=0.005, momentum=0.9):
  train_x, train_y, test_x, test_y = load_digits()
  model = CNN(rngs=nnx.Rngs(0))
  optimizer = create_optimizer(model, learning_rate, momentum)
  metrics = nnx.MultiMetric(
    accuracy=nnx.metrics.Accuracy(), loss=nnx.metrics.Average("loss")
  )
  rng = np.random.default_rng(0)
  model.train()
  for _ in range(steps):
    idx = rng.choice(len(train_x), batch_size, replace=False)
    train_step(
      model, optimizer, metrics, {"image": train_x[idx], "label": train_y[idx]}
    )
  train_metrics = metrics.compute()
  model.eval()
  metrics.reset()
  eval_step(model, metrics, {"image": test_x, "label": test_y})  # all 497
  return train_metrics, metrics.compute()


if __name__ == "__main__":
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--steps", type=int, default=1000)
  train, test = main(p.parse_args().steps)
  print(f"train loss {train['loss']:.3f}, test accuracy {test['accuracy']:.3f}")
