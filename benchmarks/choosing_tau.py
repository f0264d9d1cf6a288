"""Choosing tau: a tau sweep, ``AutoTau`` and averaging, setting by setting.

For every setting (model, N microbatches, examples per class in each
microbatch, symmetric label noise, optimizer) this trains the digits model
with every ``--taus`` value, with ``optax_gaf.AutoTau()`` (no tau) and with
averaging, over ``--seeds`` seeds, and records the final validation accuracy,
the memorisation of the corrupted training labels and the acceptance rate.

* Averaging is ``gaf(tau=2.0)``: every usable microgradient is accepted, so
  the update is their plain mean; it shares the compiled program of the sweep.
* All tau values and seeds of a setting train together: one ``jax.vmap`` over
  runs of a ``jax.lax.scan`` over steps, with tau a traced argument of
  ``optax_gaf.gaf``. ``AutoTau`` keeps extra state, so it is a second program.
* Every run is ``optax_gaf.process(identity, gaf, optimizer)``: a no-agreement
  step skips the optimizer entirely.
* Seed ``s`` fixes the label corruption, the microbatch order and the init.

Results go to ``<out>/choosing_tau.json`` after every setting, so an
interrupted run resumes where it stopped (``--fresh`` starts over), and runs
with other options add their settings to it. The table and the plot are
written from every setting in that file, at the end and by ``--report``.

Reproduce the committed results (from the repository root; see the docs page
"Choosing tau" for the grid and the time it took)::

  python -m benchmarks.choosing_tau
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import optax_gaf
from benchmarks.harness import datasets
from benchmarks.harness import models
from benchmarks.harness import training

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AVERAGE_TAU = 2.0  # accepts every usable microgradient: the plain mean
LEARNING_RATES = {"sgd": 0.01, "adamw": 1e-3}


def parse_args(argv=None):
  p = argparse.ArgumentParser(
    description=__doc__.split("\n\n")[0],
    formatter_class=argparse.ArgumentDefaultsHelpFormatter,
  )
  p.add_argument("--models", nargs="+", default=["mlp"], choices=["mlp", "cnn"])
  p.add_argument("--ns", type=int, nargs="+", default=[2, 4])
  p.add_argument("--per-class", type=int, nargs="+", default=[1, 5])
  p.add_argument("--noise", type=float, nargs="+", default=[0.0, 0.2, 0.4, 0.6])
  p.add_argument(
    "--optimizers",
    nargs="+",
    default=["sgd", "adamw"],
    choices=["sgd", "adamw"],
  )
  p.add_argument("--seeds", type=int, default=3)
  p.add_argument(
    "--taus", type=float, nargs="+", default=[0.97, 0.9, 0.8, 0.7, 0.6]
  )
  p.add_argument("--steps", type=int, default=2000)
  p.add_argument("--chunk", type=int, default=500, help="steps per jit call")
  p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
  p.add_argument("--fresh", action="store_true", help="ignore saved results")
  p.add_argument(
    "--report", action="store_true", help="only write the table and plot"
  )
  args = p.parse_args(argv)
  if min(args.ns) < 2:
    p.error("--ns: GAF compares microgradients, so N must be >= 2.")
  if min(args.per_class) < 1 or args.seeds < 1 or args.steps < 1:
    p.error("--per-class, --seeds and --steps must be >= 1.")
  if any(not 0.0 <= t <= 2.0 for t in args.taus):
    p.error("--taus are cosine distances in [0, 2].")
  return args


def setting_key(model, n, per_class, noise, optimizer) -> str:
  return f"{model}/N={n}/per_class={per_class}/noise={noise:g}/{optimizer}"


def _data(noise: float, seed: int, n: int, per_class: int, steps: int):
  data = datasets.symmetric_label_noise(datasets.load_digits(), noise, seed)
  idx = datasets.class_balanced_microbatches(
    data.train_y,
    data.num_classes,
    num_steps=steps,
    num_microbatches=n,
    per_class=per_class,
    seed=seed,
  )
  return data, idx


def make_program(model: str, n: int, optimizer: str, auto: bool, data):
  """``(init, run, evaluate)``, each over one run; vmap them over runs.

  ``init(seed_params, tau) -> state``; ``run(state, labels, idx [S, N, m],
  tau) -> (state, (acceptance [S], ready [S], tau [S]))``;
  ``evaluate(state, labels, corrupted) -> (val acc, memorisation)``.
  With ``auto`` the ``tau`` arguments are ignored: ``AutoTau()`` decides.
  """
  graphdef, _ = nnx.split(
    models.make_model(model, data.train_x.shape[1:], data.num_classes, 0)
  )
  train_x = jnp.asarray(data.train_x)
  val_x, val_y = jnp.asarray(data.val_x), jnp.asarray(data.val_y)

  def tx(tau):
    threshold = optax_gaf.AutoTau() if auto else tau
    gaf = optax_gaf.gaf(threshold, num_microbatches=n)
    inner = training.make_inner(optimizer, LEARNING_RATES[optimizer])
    return optax_gaf.process(optax.identity(), gaf, inner)

  def logits(params, x):
    return nnx.merge(graphdef, params)(x)

  def loss(params, batch):
    return optax.softmax_cross_entropy_with_integer_labels(
      logits(params, batch["x"]), batch["y"]
    ).mean()

  grads_of = optax_gaf.microbatch_grads(loss, n)

  def init(params, tau):
    return params, tx(tau).init(params)

  def run(state, labels, idx, tau):
    transform = tx(tau)

    def step(state, step_idx):
      params, opt_state = state
      flat = step_idx.reshape(-1)
      _, grads = grads_of(params, {"x": train_x[flat], "y": labels[flat]})
      updates, opt_state = transform.update(grads, opt_state, params)
      s = optax_gaf.stats(opt_state)
      params = optax.apply_updates(params, updates)
      return (params, opt_state), (s["acceptance_rate"], s["ready"], s["tau"])

    # XLA:CPU runs convolutions in a loop body slowly (jax-ml/jax#12868):
    # there conv nets unroll their chunk of steps instead.
    return jax.lax.scan(step, state, idx, unroll=training.use_stepwise(model))

  def evaluate(state, labels, corrupted):
    params = state[0]
    val = jnp.mean(jnp.argmax(logits(params, val_x), -1) == val_y)
    fit = jnp.argmax(logits(params, train_x), -1) == labels
    memorised = jnp.sum(fit & corrupted) / jnp.maximum(jnp.sum(corrupted), 1)
    return val, memorised

  return init, run, evaluate


def _stack(trees):
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def run_setting(args, model, n, per_class, noise, optimizer, progress):
  """Every run of one setting; returns their result rows."""
  seeds = range(args.seeds)
  per_seed = [_data(noise, s, n, per_class, args.steps) for s in seeds]
  data = per_seed[0][0]
  shape = data.train_x.shape[1:]
  params = [
    nnx.split(models.make_model(model, shape, data.num_classes, s))[1]
    for s in seeds
  ]
  sweep = [(AVERAGE_TAU, "average")] + [(t, f"tau={t:g}") for t in args.taus]
  groups = [(False, sweep), (True, [(AVERAGE_TAU, "auto")])]
  rows = []
  for auto, methods in groups:
    runs = list(itertools.product(methods, seeds))
    init, run, evaluate = make_program(model, n, optimizer, auto, data)
    tau = jnp.asarray([t for (t, _), _ in runs], jnp.float32)
    labels = jnp.stack([jnp.asarray(per_seed[s][0].train_y) for _, s in runs])
    idx = np.stack([per_seed[s][1] for _, s in runs], axis=1)  # [S, R, ...]
    state = jax.jit(jax.vmap(init))(_stack([params[s] for _, s in runs]), tau)
    run_v = jax.jit(jax.vmap(run, in_axes=(0, 0, 1, 0)))
    traces = []
    for start in range(0, args.steps, args.chunk):
      chunk = jnp.asarray(idx[start : start + args.chunk])
      state, trace = run_v(state, labels, chunk, tau)
      traces.append(jax.tree.map(np.asarray, trace))
      progress.update(chunk.shape[0] * len(runs))
    acceptance, ready, taus = (np.concatenate(t, axis=1) for t in zip(*traces))
    corrupted = jnp.stack(
      [jnp.asarray(per_seed[s][0].corrupted) for _, s in runs]
    )
    val, memorised = jax.jit(jax.vmap(evaluate))(state, labels, corrupted)
    for r, ((_, method), seed) in enumerate(runs):
      rows.append(
        {
          "method": method,
          "seed": seed,
          "val_acc": float(val[r]),
          "memorisation": float(memorised[r]),
          "acceptance": float(np.mean(acceptance[r])),
          "skip_rate": float(1.0 - np.mean(ready[r])),
          # The mean threshold over the last tenth of training.
          "final_tau": float(np.mean(taus[r, -max(1, args.steps // 10) :])),
        }
      )
  return rows


def summarize(rows) -> dict:
  """Per method: mean and std over seeds of every metric."""
  out = {}
  for method in dict.fromkeys(r["method"] for r in rows):
    mine = [r for r in rows if r["method"] == method]
    out[method] = {
      k: (
        float(np.mean([r[k] for r in mine])),
        float(np.std([r[k] for r in mine])),
      )
      for k in (
        "val_acc",
        "memorisation",
        "acceptance",
        "skip_rate",
        "final_tau",
      )
    }
  return out


def compare(summary: dict) -> dict:
  """AutoTau against the best swept tau, 0.97 and averaging (points)."""
  swept = {m: s for m, s in summary.items() if m.startswith("tau=")}
  best = max(swept, key=lambda m: swept[m]["val_acc"][0])
  val = lambda m: 100 * summary[m]["val_acc"][0]
  return {
    "best": best,
    "auto_minus_best": val("auto") - val(best),
    "auto_minus_average": val("auto") - val("average"),
    "auto_minus_0.97": val("auto") - val("tau=0.97")
    if "tau=0.97" in summary
    else None,
  }


def _gap_097(summary: dict) -> float | None:
  """Points of tau = 0.97 below the best swept tau (None if not swept)."""
  if "tau=0.97" not in summary:
    return None
  best = summary[compare(summary)["best"]]["val_acc"][0]
  return 100 * (summary["tau=0.97"]["val_acc"][0] - best)


def _pm(stat, scale=100.0, digits=1):
  mean, std = stat
  return f"{scale * mean:.{digits}f} ± {scale * std:.{digits}f}"


def table(results: dict) -> str:
  lines = [
    "| setting | best tau | val at best | AutoTau val | − best | − averaging"
    " | val at 0.97 | 0.97 − best | averaging"
    " | memorised: best / AutoTau / averaging"
    " | AutoTau final tau | AutoTau acceptance |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for key, entry in results.items():
    s, c = summarize(entry["rows"]), compare(summarize(entry["rows"]))
    b, a, avg = s[c["best"]], s["auto"], s["average"]
    at_097, gap_097 = "-", "-"
    if "tau=0.97" in s:
      at_097, gap_097 = _pm(s["tau=0.97"]["val_acc"]), f"{_gap_097(s):+.1f}"
    mem = " / ".join(f"{100 * x['memorisation'][0]:.1f}" for x in (b, a, avg))
    lines.append(
      f"| {key} | {c['best'][4:]} | {_pm(b['val_acc'])} | {_pm(a['val_acc'])}"
      f" | {c['auto_minus_best']:+.1f} | {c['auto_minus_average']:+.1f}"
      f" | {at_097} | {gap_097} | {_pm(avg['val_acc'])} | {mem}"
      f" | {a['final_tau'][0]:.2f} | {a['acceptance'][0]:.2f} |"
    )
  return "\n".join(lines)


def acceptance_table(results: dict) -> str:
  """Mean acceptance rate against tau, one row per setting."""
  methods = list(summarize(next(iter(results.values()))["rows"]))
  taus = [m for m in methods if m.startswith("tau=")]
  head = "| setting | " + " | ".join(m[4:] for m in taus) + " | AutoTau |"
  lines = [head, "|---" * (len(taus) + 2) + "|"]
  for key, entry in results.items():
    s = summarize(entry["rows"])
    cells = [f"{s[m]['acceptance'][0]:.2f}" for m in taus + ["auto"]]
    lines.append(f"| {key} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def verdict(results: dict) -> str:
  """How many settings meet each goal, and the worst shortfall."""
  cmp = {k: compare(summarize(e["rows"])) for k, e in results.items()}
  clean = {k: c for k, c in cmp.items() if "/noise=0/" in k}
  near = [c["auto_minus_best"] >= -1.5 for c in cmp.values()]
  vs_097 = [c["auto_minus_0.97"] for c in cmp.values()]
  vs_097 = [d for d in vs_097 if d is not None]
  worst = min(c["auto_minus_best"] for c in cmp.values())
  lines = [
    f"- AutoTau within 1.5 points of the best swept tau: {sum(near)} of"
    f" {len(near)} settings; worst {worst:+.1f}.",
  ]
  gaps = [_gap_097(summarize(e["rows"])) for e in results.values()]
  gaps = [g for g in gaps if g is not None]
  if gaps:
    lines.append(
      f"- tau = 0.97 within 1.5 points of the best swept tau:"
      f" {sum(g >= -1.5 for g in gaps)} of {len(gaps)}; worst {min(gaps):+.1f}."
    )
  if vs_097:
    lines.append(
      f"- AutoTau at least as good as tau = 0.97: {sum(d >= 0 for d in vs_097)}"
      f" of {len(vs_097)}; worst {min(vs_097):+.1f}."
    )
  if clean:
    ok = [c["auto_minus_average"] >= -0.5 for c in clean.values()]
    lines.append(
      f"- At 0% noise, AutoTau no more than 0.5 points below averaging:"
      f" {sum(ok)} of {len(ok)}; worst"
      f" {min(c['auto_minus_average'] for c in clean.values()):+.1f}."
    )
  return "\n".join(lines)


def plot(results: dict, path: str) -> None:
  """Three panels: accuracy gaps, acceptance against tau, memorisation."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  keys = list(results)
  summaries = [summarize(results[k]["rows"]) for k in keys]
  cmps = [compare(s) for s in summaries]
  x = np.arange(len(keys))
  fig, axes = plt.subplots(1, 3, figsize=(18, 5.5))
  ax = axes[0]
  ax.axhline(0, color="k", lw=0.8)
  ax.axhline(-1.5, color="gray", ls="--", lw=0.8, label="goal: -1.5")
  ax.plot(
    x, [c["auto_minus_best"] for c in cmps], "o", label="AutoTau − best tau"
  )
  ax.plot(
    x,
    [c["auto_minus_average"] for c in cmps],
    "s",
    mfc="none",
    label="AutoTau − averaging",
  )
  gap_097 = [
    100 * (s["tau=0.97"]["val_acc"][0] - s[c["best"]]["val_acc"][0])
    if "tau=0.97" in s
    else np.nan
    for s, c in zip(summaries, cmps)
  ]
  ax.plot(x, gap_097, "x", label="tau 0.97 − best tau")
  ax.set_xticks(x, keys, rotation=90, fontsize=6)
  ax.set_ylabel("final validation accuracy, points")
  ax.legend(fontsize=8)
  ax = axes[1]
  for key, s in zip(keys, summaries):
    taus = sorted(
      (float(m[4:]), v) for m, v in s.items() if m.startswith("tau=")
    )
    color = plt.cm.viridis(float(key.split("noise=")[1].split("/")[0]) / 0.6)
    ax.plot(
      [t for t, _ in taus],
      [v["acceptance"][0] for _, v in taus],
      color=color,
      lw=0.7,
    )
    ax.plot(
      s["auto"]["final_tau"][0], s["auto"]["acceptance"][0], "*", color=color
    )
  ax.set_xlabel("tau (AutoTau: its final tau, *)")
  ax.set_ylabel("acceptance rate (mean over steps)")
  ax.set_title("colour: label noise 0 (purple) to 0.6 (yellow)", fontsize=9)
  ax = axes[2]
  for name, pick, marker in (
    ("best tau", lambda s, c: s[c["best"]], "o"),
    ("AutoTau", lambda s, c: s["auto"], "*"),
    ("averaging", lambda s, c: s["average"], "s"),
  ):
    mem = [100 * pick(s, c)["memorisation"][0] for s, c in zip(summaries, cmps)]
    ax.plot(x, mem, marker, mfc="none", label=name)
  ax.set_xticks(x, keys, rotation=90, fontsize=6)
  ax.set_ylabel("corrupted training labels memorised, %")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def report(results: dict, out: str) -> None:
  """``choosing_tau.md`` and ``.png`` from every stored setting."""
  minutes = sum(e["seconds"] for e in results.values()) / 60
  commands = dict.fromkeys(e.get("command", "?") for e in results.values())
  with open(os.path.join(out, "choosing_tau.md"), "w") as f:
    f.write(
      "Reproduce (from the repository root): "
      + " and ".join(f"`{c}`" for c in commands)
      + f". {len(results)} settings, {minutes:.0f} minutes of training"
      f" ({jax.default_backend().upper()}, {os.cpu_count()} cores).\n\n"
      f"{verdict(results)}\n\n{table(results)}\n\n"
      f"Acceptance rate against tau:\n\n{acceptance_table(results)}\n"
    )
  plot(results, os.path.join(out, "choosing_tau.png"))


def main(argv=None) -> dict:
  from tqdm.auto import tqdm

  args = parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, "choosing_tau.json")
  results = {}
  if os.path.exists(path) and not args.fresh:
    with open(path) as f:
      results = json.load(f)
  settings = list(
    itertools.product(
      args.models, args.ns, args.per_class, args.noise, args.optimizers
    )
  )
  todo = [s for s in settings if setting_key(*s) not in results]
  runs = (len(args.taus) + 2) * args.seeds
  command = " ".join(["python -m benchmarks.choosing_tau", *(argv or [])])
  if not args.report and todo:
    with tqdm(total=len(todo) * runs * args.steps, unit="step") as progress:
      for setting in todo:
        progress.set_postfix_str(setting_key(*setting))
        start = time.perf_counter()
        rows = run_setting(args, *setting, progress)
        results[setting_key(*setting)] = {
          "rows": rows,
          "seconds": time.perf_counter() - start,
          "steps": args.steps,
          "command": command,
        }
        with open(path, "w") as f:
          json.dump(results, f, indent=1)
  if results:  # every stored setting, also those of earlier commands
    report(results, args.out)
    print(verdict(results))
  return results


if __name__ == "__main__":
  import sys

  main(sys.argv[1:])
