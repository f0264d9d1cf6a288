"""What GAF costs per train step in the two programs of docs/guides/flax.md.

  PYTHONPATH=. python -m benchmarks.flax_step

Times the train step of each program in ``examples/flax_guide/`` unchanged
and converted to GAF (N=4, the guide's diff), on the guide's 8x8 digits and
around the CNNs at the Flax tutorial's own sizes (28x28), interleaved round
by round so that the machine's drifts hit both alike, and reports the
per-round ratio GAF / unchanged (median and range). Then trains each program
for 1000 steps (its default) and 4000 and records the test accuracy. Writes
``benchmarks/results/flax_step.md``.
"""

import argparse
import importlib.util
import os
import pathlib
import platform
import time
from functools import partial

import jax
import numpy as np
from flax import linen as nn
from flax import nnx

from benchmarks import _common

GUIDE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "flax_guide"
PROGRAMS = {
  "NNX tutorial (BatchNorm, Dropout, adamw)": "nnx_tutorial",
  "Linen MNIST example (TrainState, sgd)": "linen_mnist",
}


def _load(name):
  spec = importlib.util.spec_from_file_location(name, GUIDE / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


class TutorialCNN(nnx.Module):
  """The NNX tutorial's CNN at its own sizes (28x28 inputs)."""

  def __init__(self, *, rngs):
    self.conv1 = nnx.Conv(1, 32, kernel_size=(3, 3), rngs=rngs)
    self.batch_norm1 = nnx.BatchNorm(32, rngs=rngs)
    self.dropout1 = nnx.Dropout(rate=0.025, rngs=rngs)
    self.conv2 = nnx.Conv(32, 64, kernel_size=(3, 3), rngs=rngs)
    self.batch_norm2 = nnx.BatchNorm(64, rngs=rngs)
    self.avg_pool = partial(nnx.avg_pool, window_shape=(2, 2), strides=(2, 2))
    self.linear1 = nnx.Linear(3136, 256, rngs=rngs)
    self.dropout2 = nnx.Dropout(rate=0.025, rngs=rngs)
    self.linear2 = nnx.Linear(256, 10, rngs=rngs)

  def __call__(self, x):
    x = self.avg_pool(nnx.relu(self.batch_norm1(self.dropout1(self.conv1(x)))))
    x = self.avg_pool(nnx.relu(self.batch_norm2(self.conv2(x))))
    x = x.reshape(x.shape[0], -1)
    x = nnx.relu(self.dropout2(self.linear1(x)))
    return self.linear2(x)


class LinenExampleCNN(nn.Module):
  """The Linen MNIST example's CNN at its own sizes (28x28 inputs)."""

  @nn.compact
  def __call__(self, x):
    x = nn.avg_pool(nn.relu(nn.Conv(32, (3, 3))(x)), (2, 2), (2, 2))
    x = nn.avg_pool(nn.relu(nn.Conv(64, (3, 3))(x)), (2, 2), (2, 2))
    x = nn.relu(nn.Dense(256)(x.reshape((x.shape[0], -1))))
    return nn.Dense(10)(x)


def _images(module, batch_size, size):
  """The program's digits, resized to size x size as MNIST stand-ins."""
  train_x, train_y, _, _ = module.load_digits()
  x = jax.image.resize(
    train_x[:batch_size], (batch_size, size, size, 1), "linear"
  )
  return np.asarray(x), train_y[:batch_size]


def _nnx_step_fn(module, batch_size, size):
  """One train step of the program, as a zero-argument callable."""
  x, y = _images(module, batch_size, size)
  model = (module.CNN if size == 8 else TutorialCNN)(rngs=nnx.Rngs(0))
  optimizer = module.create_optimizer(model, 0.005, 0.9)
  metrics = nnx.MultiMetric(
    accuracy=nnx.metrics.Accuracy(), loss=nnx.metrics.Average("loss")
  )
  batch = {"image": x, "label": y}
  model.train()

  def step():
    module.train_step(model, optimizer, metrics, batch)
    return optimizer.step[...]

  return step


def _linen_step_fn(module, batch_size, size):
  x, y = _images(module, batch_size, size)
  state = module.create_train_state(jax.random.key(0), 0.1, 0.9)
  if size != 8:  # the program's state, around the example's own CNN
    cnn = LinenExampleCNN()
    params = cnn.init(jax.random.key(0), x[:1])["params"]
    state = state.replace(
      apply_fn=cnn.apply, params=params, opt_state=state.tx.init(params)
    )
  holder = [state]

  def step():
    grads, _, _ = module.apply_model(holder[0], x, y)
    holder[0] = module.update_model(holder[0], grads)
    return holder[0].step

  return step


def _time(rounds, batch_size, size):
  rows = []
  for title, name in PROGRAMS.items():
    make = _nnx_step_fn if name.startswith("nnx") else _linen_step_fn
    fns = {
      "unchanged": make(_load(name), batch_size, size),
      "gaf": make(_load(f"{name}_gaf"), batch_size, size),
    }
    times = _common.interleaved(fns, rounds, min_time=0.2)
    ratio = times["gaf"] / times["unchanged"]  # paired by round
    rows.append(
      f"| {title} | {size}x{size} | {np.median(times['unchanged']) * 1e3:.2f} |"
      f" {np.median(times['gaf']) * 1e3:.2f} | {np.median(ratio):.2f} |"
      f" {ratio.min():.2f}-{ratio.max():.2f} |"
    )
    print(rows[-1])
  return rows


def _accuracy(steps):
  rows = []
  for title, name in PROGRAMS.items():
    accs = []
    for suffix in ("", "_gaf"):
      out = _load(name + suffix).main(steps)
      test = out[1]
      accs.append(float(test["accuracy"] if isinstance(test, dict) else test))
    rows.append(f"| {title} | {steps} | {accs[0]:.3f} | {accs[1]:.3f} |")
    print(rows[-1])
  return rows


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--rounds", type=int, default=31)
  p.add_argument("--batch-size", type=int, default=32)
  p.add_argument("--train-steps", type=int, nargs="*", default=[1000, 4000])
  p.add_argument("--out", default="benchmarks/results")
  args = p.parse_args(argv)
  load_before = os.getloadavg()
  start = time.perf_counter()
  timing = [
    row for size in (8, 28) for row in _time(args.rounds, args.batch_size, size)
  ]
  accuracy = [row for steps in args.train_steps for row in _accuracy(steps)]
  load_after = os.getloadavg()
  minutes = (time.perf_counter() - start) / 60
  text = "\n".join(
    [
      "**GAF's cost per train step in the Flax guide's programs.**",
      "",
      "`PYTHONPATH=. python -m benchmarks.flax_step`"
      f" ({minutes:.1f} minutes). {platform.machine()}, {os.cpu_count()}"
      f" cores, jax {jax.__version__}, {jax.devices()[0].platform}.",
      f"Load average (1, 5, 15 min) before: {load_before[0]:.2f},"
      f" {load_before[1]:.2f}, {load_before[2]:.2f}; after:"
      f" {load_after[0]:.2f}, {load_after[1]:.2f}, {load_after[2]:.2f}"
      " (the machine was shared; the ratios are paired by round, so a drift"
      " hits both programs alike).",
      "",
      f"Train step, batch {args.batch_size}, GAF with N=4 microbatches and"
      f" tau=0.8; median over {args.rounds} interleaved rounds. 8x8: the"
      " guide's programs as they are; 28x28: the same train steps and"
      " optimizers around the CNNs at the sizes of the Flax tutorial and"
      " example (conv 32 and 64 channels, dense 256), on digits resized to"
      " 28x28:",
      "",
      "| program | images | unchanged (ms/step) | GAF (ms/step) |"
      " GAF / unchanged (median) | range over rounds |",
      "| --- | --- | ---: | ---: | ---: | ---: |",
      *timing,
      "",
      "Test accuracy after training each program as it is (8x8 digits, 40%"
      " of training labels corrupted, one seed):",
      "",
      "| program | steps | unchanged | GAF |",
      "| --- | ---: | ---: | ---: |",
      *accuracy,
      "",
    ]
  )
  _common.write_result(args.out, "flax_step.md", text)


if __name__ == "__main__":
  main()
