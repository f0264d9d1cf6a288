"""The paper's Figure 6 experiment on digits: GAF against averaging vs noise.

For every method in ``--methods`` and every label noise rate, trains the
CLI's MLP (``python -m benchmarks.noisy_labels`` defaults: SGD momentum 0.9,
lr 0.01, N=2 class-balanced microbatches of 5 per class, tau 0.8) with
several seeds, ``vmap``-ped together in one jitted scan, and writes

* ``<out>/noisy_labels.md``: a markdown table (mean +- std over seeds of
  final validation accuracy, memorisation, GAF acceptance rate), the tau
  sweep and the random-label run;
* ``<out>/noisy_labels.png``: the same as plots;
* ``<out>/noisy_labels.json``: every number.

Methods come from ``benchmarks.harness.training.METHODS`` (name ->
aggregator); a new rule is one line there and then
``--methods average,gaf-sequential,NEW``.

Reproduce the committed results (from the repository root)::

  python -m benchmarks.noisy_labels_table
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks import noisy_labels
from benchmarks.harness import datasets
from benchmarks.harness import models
from benchmarks.harness import training

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The paper's Figure 6 (CIFAR-100, ResNet-18): noise -> (GAF, baseline) %.
PAPER_FIGURE_6 = {
  0.0: (63, 62),
  0.05: (61, 58),
  0.2: (58, 50),
  0.4: (53, 38),
  0.5: (48, 33),
  0.6: (39, 20),
  0.8: (8, 7),
}


def parse_args(argv=None):
  p = argparse.ArgumentParser(
    description="GAF vs averaging on digits under label noise.",
    formatter_class=argparse.ArgumentDefaultsHelpFormatter,
  )
  p.add_argument(
    "--methods",
    default="average,gaf-sequential",
    help=f"comma-separated, from {sorted(training.METHODS)}",
  )
  p.add_argument(
    "--noise", type=float, nargs="+", default=[0.0, 0.2, 0.4, 0.6, 0.8]
  )
  p.add_argument("--seeds", type=int, default=3)
  p.add_argument(
    "--taus",
    type=float,
    nargs="*",
    default=[0.6, 0.7, 0.8, 0.9, 1.0],
    help="tau sweep for each GAF method at --sweep-noise; empty to skip",
  )
  p.add_argument("--sweep-noise", type=float, default=0.4)
  p.add_argument(
    "--no-random-labels",
    action="store_true",
    help="skip the pure-random-label run",
  )
  p.add_argument(
    "--steps", type=int, default=None, help="default: the example's"
  )
  p.add_argument(
    "--num-microbatches",
    type=int,
    default=None,
    help="N (default: the example's)",
  )
  p.add_argument("--eval-every", type=int, default=1000)
  p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
  args = p.parse_args(argv)
  args.methods = args.methods.split(",")
  for m in args.methods:
    if m not in training.METHODS:
      p.error(f"unknown method {m!r}; choose from {sorted(training.METHODS)}")
  if args.seeds < 1:
    p.error("--seeds must be >= 1")
  # Everything else: the example's defaults, so the two agree.
  args.example = noisy_labels.parse_args(
    []
    if args.num_microbatches is None
    else ["--num-microbatches", str(args.num_microbatches)]
  )
  noisy_labels.resolve_defaults(args.example, datasets.load_digits())
  args.steps = args.steps or args.example.steps
  return args


def _compiled(method: str, tau: float, base, data, cache: dict):
  """The trainer and its vmapped, jitted functions for one (method, tau)."""
  if (method, tau) in cache:
    return cache[method, tau]
  model_fn = lambda seed: models.make_model(
    base.model, data.train_x.shape[1:], data.num_classes, seed
  )
  tx = training.make_tx(
    method,
    tau=tau,
    num_microbatches=base.num_microbatches,
    inner=training.make_inner(base.optimizer, base.lr),
  )
  trainer, _ = training.build(
    model_fn(0),
    tx,
    num_microbatches=base.num_microbatches,
    train_x=jnp.asarray(data.train_x),
  )

  def init(seed):
    model = model_fn(seed)
    return nnx.split((model, nnx.Optimizer(model, tx, wrt=nnx.Param)))[1]

  cache[method, tau] = (
    trainer,
    jax.jit(jax.vmap(init)),
    jax.jit(jax.vmap(trainer.run_chunk)),
    jax.jit(jax.vmap(trainer.accuracy, in_axes=(0, None, 0, 0))),
  )
  return cache[method, tau]


def run_group(
  method: str,
  tau: float,
  label_sets,
  idx_sets,
  seeds,
  base,
  data,
  eval_every: int,
  progress=None,
  cache=None,
):
  """Trains one model per row of ``label_sets`` / ``idx_sets``, vmapped.

  Returns:
    dict of ``[R]`` final metrics and ``[R, E]`` curves (E evaluations).
  """
  num_runs = len(seeds)
  _, init, run_chunk, accuracy = _compiled(
    method, tau, base, data, {} if cache is None else cache
  )
  state = init(jax.vmap(jax.random.key)(jnp.asarray(seeds)))  # as Rngs(seed)
  labels = jnp.asarray(np.stack(label_sets))
  clean = jnp.asarray(data.train_clean_y)
  corrupted = labels != clean[None]
  train_x = jnp.asarray(data.train_x)
  val_y = jnp.broadcast_to(jnp.asarray(data.val_y), (num_runs, len(data.val_y)))
  keys = jax.random.split(jax.random.key(0), num_runs)
  curves = {
    k: []
    for k in (
      "step",
      "val_acc",
      "memorisation",
      "train_acc",
      "acceptance_rate",
      "skip_rate",
    )
  }
  idx_sets = np.stack(idx_sets)
  for start, stop in training.chunks(idx_sets.shape[1], eval_every):
    state, metrics = run_chunk(
      state, jnp.asarray(idx_sets[:, start:stop]), labels, keys
    )
    curves["step"].append(stop)
    curves["val_acc"].append(
      np.asarray(
        accuracy(
          state, jnp.asarray(data.val_x), val_y, jnp.ones_like(val_y, float)
        )
      )
    )
    curves["memorisation"].append(
      np.asarray(
        accuracy(state, train_x, labels, corrupted.astype(jnp.float32))
      )
    )
    curves["train_acc"].append(
      np.asarray(
        accuracy(state, train_x, labels, jnp.ones(labels.shape, jnp.float32))
      )
    )
    curves["acceptance_rate"].append(np.mean(metrics.acceptance_rate, 1))
    curves["skip_rate"].append(1.0 - np.mean(metrics.ready, 1))
    if progress is not None:
      progress.update((stop - start) * num_runs)
  curves = {
    k: np.stack(v, axis=-1) if k != "step" else np.asarray(v)
    for k, v in curves.items()
  }
  final = {k: v[..., -1] for k, v in curves.items() if k != "step"}
  # Acceptance and skips: means over the whole run, not the last chunk.
  final["acceptance_rate"] = curves["acceptance_rate"].mean(-1)
  final["skip_rate"] = curves["skip_rate"].mean(-1)
  final["best_val_acc"] = curves["val_acc"].max(-1)
  return {"final": final, "curves": curves}


def noisy_sets(data, noise: float, seeds, base, steps, random_labels=False):
  """Labels and (shared across methods) microbatch indices for each seed."""
  label_sets, idx_sets = [], []
  for seed in seeds:
    noisy = (
      datasets.random_labels(data, seed)
      if random_labels
      else datasets.symmetric_label_noise(data, noise, seed)
    )
    label_sets.append(noisy.train_y)
    idx_sets.append(
      datasets.class_balanced_microbatches(
        noisy.train_y,
        data.num_classes,
        num_steps=steps,
        num_microbatches=base.num_microbatches,
        per_class=base.per_class,
        seed=seed,
      )
    )
  return label_sets, idx_sets


def mean_std(x) -> str:
  x = np.asarray(x, float)
  if np.all(np.isnan(x)):
    return "-"
  return f"{100 * np.mean(x):.1f} ± {100 * np.std(x):.1f}"


def run(args) -> dict:
  from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top

  base = args.example
  data = datasets.load_digits()
  seeds = list(range(args.seeds))
  # The tau sweep only for methods that use tau.
  gaf_methods = [m for m in args.methods if m.startswith("gaf")]
  total = (
    args.steps
    * args.seeds
    * (
      len(args.methods) * len(args.noise)
      + len(gaf_methods) * len(args.taus)
      + (0 if args.no_random_labels else len(args.methods))
    )
  )
  results = {
    "config": {k: v for k, v in vars(args).items() if k != "example"}
    | {"example": vars(base)},
    "noise": {},
    "tau_sweep": {},
    "random_labels": {},
  }
  cache = {}  # (method, tau) -> compiled functions, reused across noise rates
  start = time.time()
  with tqdm(total=total, unit="step") as progress:

    def run(method, tau, sets):
      return run_group(
        method, tau, *sets, seeds, base, data, args.eval_every, progress, cache
      )

    for noise in args.noise:
      sets = noisy_sets(data, noise, seeds, base, args.steps)
      for method in args.methods:
        progress.set_postfix(noise=noise, method=method)
        out = run(method, base.tau, sets)
        results["noise"].setdefault(method, {})[noise] = out
    if args.taus:
      sets = noisy_sets(data, args.sweep_noise, seeds, base, args.steps)
      for method in gaf_methods:
        for tau in args.taus:
          progress.set_postfix(tau=tau, method=method)
          out = run(method, tau, sets)
          results["tau_sweep"].setdefault(method, {})[tau] = out
    if not args.no_random_labels:
      sets = noisy_sets(data, 0.0, seeds, base, args.steps, random_labels=True)
      for method in args.methods:
        progress.set_postfix(labels="random", method=method)
        results["random_labels"][method] = run(method, base.tau, sets)
  results["seconds"] = time.time() - start
  return results


def markdown(results, args) -> str:
  base = args.example
  lines = [
    "# Noisy labels on digits: GAF vs averaging",
    "",
    f"MLP on scikit-learn digits (1300 train / 497 validation),"
    f" {base.optimizer} (momentum 0.9) lr {base.lr}, {args.steps} steps of"
    f" N={base.num_microbatches} class-balanced microbatches of"
    f" {base.per_class} examples per class, tau={base.tau} unless swept;"
    f" {args.seeds} seeds, mean ± std in %. Symmetric noise: that fraction"
    " of training labels moved to a uniformly random other class."
    " Memorisation: accuracy on the corrupted training examples measured"
    " against their corrupted labels. Acceptance: mean fraction of"
    " microgradients GAF accepted per step; skipped: fraction of"
    " no-agreement steps (the optimizer did not move).",
    "",
    "Reproduce: `"
    + shlex.join(["python", "-m", "benchmarks.noisy_labels_table", *args.argv])
    + f"` ({results['seconds'] / 60:.0f} min on 2 CPU cores).",
    "",
    "## Final validation accuracy, memorisation, acceptance vs label noise",
    "",
    "| noise | method | val acc | best val acc | memorisation | acceptance"
    " | skipped |",
    "| --- | --- | --- | --- | --- | --- | --- |",
  ]
  for noise in args.noise:
    for method in args.methods:
      f = results["noise"][method][noise]["final"]
      lines.append(
        f"| {noise:.0%} | {method} | {mean_std(f['val_acc'])} |"
        f" {mean_std(f['best_val_acc'])} | {mean_std(f['memorisation'])} |"
        f" {mean_std(f['acceptance_rate'])} |"
        f" {mean_std(f['skip_rate']) if method != 'average' else '-'} |"
      )
  if results["tau_sweep"]:
    lines += [
      "",
      f"## Tau sweep at {args.sweep_noise:.0%} noise",
      "",
      "| method | tau | val acc | memorisation | acceptance | skipped |",
      "| --- | --- | --- | --- | --- | --- |",
    ]
    for method, by_tau in results["tau_sweep"].items():
      for tau, out in by_tau.items():
        f = out["final"]
        lines.append(
          f"| {method} | {tau} | {mean_std(f['val_acc'])} |"
          f" {mean_std(f['memorisation'])} |"
          f" {mean_std(f['acceptance_rate'])} |"
          f" {mean_std(f['skip_rate'])} |"
        )
  if results["random_labels"]:
    lines += [
      "",
      "## Pure random labels (every training label uniform)",
      "",
      "Training accuracy on the random labels (chance: 10%).",
      "",
      "| method | train acc | val acc (true labels) | skipped |",
      "| --- | --- | --- | --- |",
    ]
    for method, out in results["random_labels"].items():
      f = out["final"]
      lines.append(
        f"| {method} | {mean_std(f['train_acc'])} |"
        f" {mean_std(f['val_acc'])} |"
        f" {mean_std(f['skip_rate']) if method != 'average' else '-'} |"
      )
  return "\n".join(lines) + "\n"


def plot(results, args, path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, axes = plt.subplots(1, 4, figsize=(18, 3.8))
  noise = np.asarray(args.noise) * 100
  for method in args.methods:
    by = results["noise"][method]
    for ax, key in ((axes[0], "val_acc"), (axes[1], "memorisation")):
      vals = np.array([by[n]["final"][key] for n in args.noise]) * 100
      ax.errorbar(
        noise, vals.mean(1), vals.std(1), marker="o", capsize=3, label=method
      )
  paper = sorted(PAPER_FIGURE_6.items())
  axes[0].plot(
    [100 * n for n, _ in paper],
    [g for _, (g, _) in paper],
    "k:",
    marker="^",
    label="paper GAF (CIFAR-100)",
  )
  axes[0].plot(
    [100 * n for n, _ in paper],
    [b for _, (_, b) in paper],
    "k--",
    marker="v",
    label="paper baseline (CIFAR-100)",
  )
  axes[0].set(title="final validation accuracy (%)", xlabel="label noise (%)")
  axes[1].set(title="memorisation (%)", xlabel="label noise (%)")
  for method, by_tau in results["tau_sweep"].items():
    taus = list(by_tau)
    val = np.array([by_tau[t]["final"]["val_acc"] for t in taus]) * 100
    acc = np.array([by_tau[t]["final"]["acceptance_rate"] for t in taus]) * 100
    axes[2].errorbar(
      taus,
      val.mean(1),
      val.std(1),
      marker="o",
      capsize=3,
      label=f"{method}: val acc",
    )
    axes[2].errorbar(
      taus,
      acc.mean(1),
      acc.std(1),
      marker="s",
      ls="--",
      capsize=3,
      label=f"{method}: acceptance",
    )
  axes[2].set(
    title=f"tau sweep at {args.sweep_noise:.0%} noise (%)", xlabel="tau"
  )
  for method, out in results["random_labels"].items():
    c = out["curves"]
    tr = c["train_acc"] * 100
    axes[3].plot(c["step"], tr.mean(0), marker=".", label=method)
  axes[3].axhline(10, color="gray", lw=0.8, label="chance")
  axes[3].set(title="random labels: training accuracy (%)", xlabel="step")
  for ax in axes:
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def to_jsonable(x):
  if isinstance(x, dict):
    return {str(k): to_jsonable(v) for k, v in x.items()}
  if isinstance(x, (np.ndarray, jax.Array)):
    return np.asarray(x).tolist()
  if isinstance(x, (np.floating, np.integer)):
    return x.item()
  return x


def main(argv=None):
  argv = sys.argv[1:] if argv is None else list(argv)
  args = parse_args(argv)
  args.argv = argv  # the Reproduce line repeats the full command
  results = run(args)
  os.makedirs(args.out, exist_ok=True)
  text = markdown(results, args)
  with open(os.path.join(args.out, "noisy_labels.md"), "w") as f:
    f.write(text)
  plot(results, args, os.path.join(args.out, "noisy_labels.png"))
  with open(os.path.join(args.out, "noisy_labels.json"), "w") as f:
    json.dump(to_jsonable(results), f)
  print(text)
  print(f"wrote noisy_labels.md, .png, .json to {args.out}")
  return results


if __name__ == "__main__":
  main()
