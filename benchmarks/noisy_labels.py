"""GAF against gradient averaging under label noise, with Flax NNX: the CLI.

The full experiment behind ``examples/noisy_labels.py`` (the short,
self-contained Quickstart program), on the harness in
``benchmarks/harness/``: every method of ``training.METHODS``, CIFAR, other
models and optimizers. Run from the repository root::

  python -m benchmarks.noisy_labels                     # digits, 40% noise
  python -m benchmarks.noisy_labels --help              # every option
  python -m benchmarks.noisy_labels --dataset cifar100 --model resnet18

The default run trains an MLP on scikit-learn's handwritten digits (offline)
with 40% of the training labels corrupted, once with plain averaging of the
microbatch gradients and once with GAF, on exactly the same batches, and
prints::

  method   val_acc  memorisation  acceptance  skip_rate

``memorisation`` is the accuracy on the corrupted training examples measured
against their corrupted labels: how much of the noise the network learnt.
It also writes ``metrics.json``, ``history.csv`` and ``curves.png`` into
``--out``.

Default settings and why (digits, 1300 training images):

* SGD with momentum 0.9, lr 0.01, 8000 steps of N=2 class-balanced
  microbatches of 5 examples per class (100 examples a step, about 600
  epochs): long enough that averaging memorises the noise completely.
* ``tau=0.8``: at tau 0.9 and above (``gaf``'s default is 0.97) enough
  noisy pairs get through that GAF memorises like averaging; 0.7 and 0.8 do
  best in the tau sweep of ``python -m benchmarks.noisy_labels_table``
  (picked on the validation split).

CIFAR: ``--dataset cifar100 --model resnet18`` (downloads through TFDS), and
``cifar100_n`` / ``cifar10_n`` with their human label noise (manual download;
the error message says how).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.harness import datasets
from benchmarks.harness import models
from benchmarks.harness import training

# --method choices -> METHODS entries.
METHOD_CHOICES = {
  "gaf": ["gaf-sequential"],
  "average": ["average"],
  "both": ["average", "gaf-sequential"],
}


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
    description=__doc__.split("\n\n")[0],
    formatter_class=argparse.ArgumentDefaultsHelpFormatter,
  )
  p.add_argument(
    "--dataset", default="digits", choices=["digits", *datasets.TFDS_LABELS]
  )
  p.add_argument(
    "--label-key",
    default=None,
    help="TFDS label feature: noise_label (cifar100_n);"
    " worse_label, aggre_label or random_label1 (cifar10_n).",
  )
  p.add_argument(
    "--label-noise",
    type=float,
    default=None,
    help="symmetric noise rate on the training labels (default"
    " 0.4 for digits and cifar100, 0 for CIFAR-N, whose labels"
    " are already noisy)",
  )
  p.add_argument("--method", default="both", choices=list(METHOD_CHOICES))
  p.add_argument(
    "--rule",
    default="sequential",
    choices=["sequential", "pairwise"],
    help="GAF rule",
  )
  p.add_argument("--tau", type=float, default=0.8)
  p.add_argument("--num-microbatches", type=int, default=2)
  p.add_argument(
    "--per-class",
    type=int,
    default=None,
    help="examples of every class in each microbatch (default 5"
    " for digits; for CIFAR, microbatches of 100 as in the"
    " authors' code: 1 per class on CIFAR-100, 10 on CIFAR-10)",
  )
  p.add_argument(
    "--model",
    default=None,
    choices=sorted(models.MODELS),
    help="default: mlp for digits, resnet18 for CIFAR",
  )
  p.add_argument(
    "--optimizer",
    default="sgd",
    choices=["sgd", "adamw"],
    help="sgd means momentum 0.9",
  )
  p.add_argument("--lr", type=float, default=0.01)
  group = p.add_mutually_exclusive_group()
  group.add_argument(
    "--steps", type=int, default=None, help="optimizer steps (default 8000)"
  )
  group.add_argument(
    "--epochs",
    type=float,
    default=None,
    help="passes over the training set, instead of --steps",
  )
  p.add_argument("--eval-every", type=int, default=250)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--data-dir", default=None, help="TFDS data directory")
  p.add_argument("--out", default="runs/noisy_labels")
  args = p.parse_args(argv)
  if args.num_microbatches < 2:
    p.error("--num-microbatches must be >= 2: GAF compares microgradients.")
  if args.per_class is not None and args.per_class < 1:
    p.error("--per-class must be >= 1.")
  if args.eval_every < 1:
    p.error("--eval-every must be >= 1.")
  return args


def load_data(args) -> datasets.Dataset:
  if args.dataset == "digits":
    data = datasets.load_digits()
  else:
    data = datasets.load_tfds(
      args.dataset, label_key=args.label_key, data_dir=args.data_dir
    )
  noise = args.label_noise
  if noise is None:
    noise = 0.0 if args.dataset.endswith("_n") else 0.4
  args.label_noise = noise
  return datasets.symmetric_label_noise(data, noise, seed=args.seed)


def resolve_defaults(args, data: datasets.Dataset) -> None:
  """Fills the options whose defaults depend on the dataset."""
  args.model = args.model or ("mlp" if args.dataset == "digits" else "resnet18")
  if args.per_class is None:
    args.per_class = 5 if args.dataset == "digits" else 100 // data.num_classes
  step_size = args.num_microbatches * args.per_class * data.num_classes
  if args.epochs is not None:
    args.steps = max(1, int(round(args.epochs * len(data.train_y) / step_size)))
  elif args.steps is None:
    args.steps = 8000


def _evaluate(accuracy, state, x, y, weights, chunk: int = 5000) -> float:
  """``accuracy`` over slices of ``chunk`` examples, weighted back together.

  ``trainer.accuracy`` unrolls its batches into one program: on CIFAR's 50k
  training images that would be 50 ResNet-18 forward passes to compile.
  Weights are 0/1, so accuracy * sum(weights) is the weighted count.
  """
  if len(y) <= chunk:  # digits: exactly the one-call result
    return float(accuracy(state, x, y, weights))
  correct, total = 0.0, 0.0
  for start in range(0, len(y), chunk):
    w = weights[start : start + chunk]
    w_sum = float(jnp.sum(w))
    if w_sum:
      correct += w_sum * float(
        accuracy(state, x[start : start + chunk], y[start : start + chunk], w)
      )
    total += w_sum
  return correct / max(total, 1.0)


def train_one(
  method: str, data: datasets.Dataset, idx: np.ndarray, args, progress
) -> list[dict[str, float]]:
  """Trains one model with ``method``; returns the evaluation history."""
  model = models.make_model(
    args.model, data.train_x.shape[1:], data.num_classes, seed=args.seed
  )
  tx = training.make_tx(
    method,
    tau=args.tau,
    num_microbatches=args.num_microbatches,
    inner=training.make_inner(args.optimizer, args.lr),
  )
  train_x = jnp.asarray(data.train_x)
  augment = training.flip_crop if args.dataset != "digits" else None
  trainer, state = training.build(
    model,
    tx,
    num_microbatches=args.num_microbatches,
    train_x=train_x,
    augment=augment,
  )
  if training.use_stepwise(args.model):
    step = jax.jit(trainer.step)
    run_chunk = lambda *a: training.run_stepwise(step, *a)
  else:
    run_chunk = jax.jit(trainer.run_chunk)
  accuracy = jax.jit(trainer.accuracy)
  labels = jnp.asarray(data.train_y)
  val_x, val_y = jnp.asarray(data.val_x), jnp.asarray(data.val_y)
  ones = jnp.ones(len(data.val_y))
  corrupted = jnp.asarray(data.corrupted, jnp.float32)
  clean = 1.0 - corrupted
  key = jax.random.key(args.seed)
  history = []
  for start, stop in training.chunks(len(idx), args.eval_every):
    state, metrics = run_chunk(
      state,
      jnp.asarray(idx[start:stop]),
      labels,
      jax.random.fold_in(key, start),
    )
    row = {
      "method": method,
      "step": stop,
      **training.summarize_metrics(metrics),
      "val_acc": _evaluate(accuracy, state, val_x, val_y, ones),
      "memorisation": _evaluate(accuracy, state, train_x, labels, corrupted),
      "clean_train_acc": _evaluate(accuracy, state, train_x, labels, clean),
    }
    history.append(row)
    progress.update(stop - start)
    progress.set_postfix(
      method=method,
      val=f"{row['val_acc']:.3f}",
      mem=f"{row['memorisation']:.3f}",
    )
  return history


def final_table(histories: dict[str, list[dict]]) -> list[dict[str, float]]:
  """The last evaluation of each method, plus the run-mean acceptance rate."""
  rows = []
  for method, hist in histories.items():
    last = hist[-1]
    rows.append(
      {
        "method": method,
        "val_acc": last["val_acc"],
        # The best evaluation: what early stopping on clean labels would get.
        "best_val_acc": max(h["val_acc"] for h in hist),
        "memorisation": last["memorisation"],
        # Mean over all steps of the fraction of microgradients accepted.
        "acceptance": float(np.mean([h["acceptance_rate"] for h in hist])),
        "skip_rate": float(np.mean([h["skip_rate"] for h in hist])),
      }
    )
  return rows


def format_table(rows) -> str:
  lines = [
    f"{'method':<16}{'val_acc':>9}{'best_val_acc':>14}"
    f"{'memorisation':>14}{'acceptance':>12}{'skip_rate':>11}"
  ]
  for r in rows:
    acc = "-" if np.isnan(r["acceptance"]) else f"{r['acceptance']:.3f}"
    skip = "-" if np.isnan(r["acceptance"]) else f"{r['skip_rate']:.3f}"
    lines.append(
      f"{r['method']:<16}{r['val_acc']:>9.3f}"
      f"{r['best_val_acc']:>14.3f}{r['memorisation']:>14.3f}"
      f"{acc:>12}{skip:>11}"
    )
  return "\n".join(lines)


def plot(histories, path: str, title: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
  for method, hist in histories.items():
    steps = [h["step"] for h in hist]
    axes[0].plot(steps, [h["val_acc"] for h in hist], label=method)
    axes[1].plot(steps, [h["memorisation"] for h in hist], label=method)
    if not np.isnan(hist[0]["acceptance_rate"]):
      axes[2].plot(
        steps,
        [h["acceptance_rate"] for h in hist],
        label=f"{method}: acceptance",
      )
      axes[2].plot(
        steps,
        [h["skip_rate"] for h in hist],
        "--",
        label=f"{method}: skipped steps",
      )
  axes[0].set(title="validation accuracy", xlabel="step")
  axes[1].set(title="memorisation (acc. on corrupted labels)", xlabel="step")
  axes[2].set(title="GAF acceptance / skip rate", xlabel="step", ylim=(0, 1))
  for ax in axes:
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None) -> list[dict[str, float]]:
  from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top

  args = parse_args(argv)
  data = load_data(args)
  resolve_defaults(args, data)
  # One index array for all methods: equal data at every step.
  idx = datasets.class_balanced_microbatches(
    data.train_y,
    data.num_classes,
    num_steps=args.steps,
    num_microbatches=args.num_microbatches,
    per_class=args.per_class,
    seed=args.seed,
  )
  methods = METHOD_CHOICES[args.method]
  if args.rule != "sequential":
    methods = [m.replace("gaf-sequential", f"gaf-{args.rule}") for m in methods]
  print(
    f"{args.dataset}: {len(data.train_y)} train / {len(data.val_y)} val,"
    f" {data.corrupted.mean():.1%} of training labels corrupted;"
    f" {args.model}, {args.optimizer} lr={args.lr}, {args.steps} steps of"
    f" {args.num_microbatches} x {args.per_class * data.num_classes}"
    f" examples, tau={args.tau}"
  )
  histories = {}
  start = time.time()
  with tqdm(total=args.steps * len(methods), unit="step") as progress:
    for method in methods:
      histories[method] = train_one(method, data, idx, args, progress)
  rows = final_table(histories)
  print(format_table(rows))
  print(f"({time.time() - start:.0f}s)")

  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "metrics.json"), "w") as f:
    json.dump(
      {
        "config": vars(args),
        "corrupted_fraction": float(data.corrupted.mean()),
        "final": rows,
        "history": histories,
      },
      f,
      indent=1,
    )
  with open(os.path.join(args.out, "history.csv"), "w", newline="") as f:
    writer = csv.DictWriter(
      f, fieldnames=list(next(iter(histories.values()))[0])
    )
    writer.writeheader()
    for hist in histories.values():
      writer.writerows(hist)
  plot(
    histories,
    os.path.join(args.out, "curves.png"),
    f"{args.dataset}, {args.label_noise:.0%} symmetric label noise,"
    f" tau={args.tau}, N={args.num_microbatches}",
  )
  print(f"wrote metrics.json, history.csv, curves.png to {args.out}")
  return rows


if __name__ == "__main__":
  main()
