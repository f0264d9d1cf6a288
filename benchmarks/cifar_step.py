"""Compile and step time of the CIFAR ResNet-18 train step, scan vs stepwise.

``benchmarks/harness/training.py`` runs a chunk of steps as one
``jax.lax.scan``. On XLA:CPU convolutions inside a loop body take a slow
generic path (jax-ml/jax#12868), which made
``python -m benchmarks.noisy_labels --dataset cifar100`` look stuck
"compiling": the first step alone took many minutes. The CLI now calls a
jitted single step from Python on CPU (``training.run_stepwise``).
This script times both on the CLI's CIFAR-100 defaults (ResNet-18, 32x32x3,
100 classes, N=2 microbatches of 100, SGD, GAF sequential, flip-crop), on
zero images: lowering, compilation, then the median of ``--repeats`` steps.

Run from the repository root::

  python -m benchmarks.cifar_step                          # both, defaults
  python -m benchmarks.cifar_step --loops stepwise --devices 8
"""

import argparse
import statistics
import time

import jax


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument(
    "--loops", default="stepwise,scan", help="comma-separated: stepwise, scan"
  )
  p.add_argument("--num-microbatches", type=int, default=2)
  p.add_argument("--microbatch-size", type=int, default=100)
  p.add_argument("--size", type=int, default=32, help="image height = width")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument(
    "--devices",
    type=int,
    default=1,
    help="simulated CPU devices (the step uses one)",
  )
  return p.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  jax.config.update("jax_num_cpu_devices", args.devices)
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from benchmarks.harness import models  # pylint: disable=g-import-not-at-top
  from benchmarks.harness import training  # pylint: disable=g-import-not-at-top

  n, m, h = args.num_microbatches, args.microbatch_size, args.size
  train_x = jnp.zeros((10 * n * m, h, h, 3), jnp.uint8)
  labels = jnp.arange(10 * n * m, dtype=jnp.int32) % 100
  idx = jnp.arange(n * m, dtype=jnp.int32).reshape(1, n, m)
  key = jax.random.key(0)
  print(
    f"ResNet-18 {h}x{h}x3, N={n} x {m}, backend {jax.default_backend()},"
    f" {args.devices} device(s)"
  )
  for loop in args.loops.split(","):
    model = models.make_model("resnet18", (h, h, 3), 100, seed=0)
    tx = training.make_tx(
      "gaf-sequential",
      tau=0.8,
      num_microbatches=n,
      inner=training.make_inner("sgd", 0.01),
    )
    trainer, state = training.build(
      model, tx, num_microbatches=n, train_x=train_x, augment=training.flip_crop
    )
    if loop == "scan":
      fn, fn_args = trainer.run_chunk, (state, idx, labels, key)
    elif loop == "stepwise":
      fn, fn_args = trainer.step, (state, (idx[0], key), labels)
    else:
      raise SystemExit(f"unknown loop {loop!r}")
    start = time.perf_counter()
    lowered = jax.jit(fn).lower(*fn_args)
    t_lower = time.perf_counter() - start
    start = time.perf_counter()
    compiled = lowered.compile()
    t_compile = time.perf_counter() - start
    times = []
    for _ in range(args.repeats):
      start = time.perf_counter()
      out = jax.block_until_ready(compiled(*fn_args))
      times.append(time.perf_counter() - start)
    loss = float(out[1].loss.reshape(-1)[0])
    print(
      f"{loop:>9}: lower {t_lower:.1f}s, compile {t_compile:.1f}s,"
      f" step median {statistics.median(times):.2f}s"
      f" (min {min(times):.2f}s, {args.repeats} runs), loss {loss:.3f}",
      flush=True,
    )


if __name__ == "__main__":
  main()
