"""A default tau: threshold policies against a tau sweep and averaging.

Issue 27 asks for a default of ``gaf()`` that never costs accuracy: as fast
as averaging early, robust to label noise late, with no tau to tune. This
study measures candidate threshold policies (``--policies``, the names of
:data:`POLICIES`) against a sweep of fixed taus and against averaging, at
every training length, in three suites:

* ``flax``: the two programs of ``examples/flax_guide/`` (the NNX tutorial:
  BatchNorm, Dropout, adamw; the Linen example: SGD with momentum), N = 4
  microbatches of 8, rebuilt as scannable runs
  (``benchmarks/harness/flax_guide.py``). Averaging is the unchanged
  program; the test accuracy is taken at every ``--checkpoints`` step.
* ``digits``: the settings of ``benchmarks.choosing_tau`` (digits MLP, N = 2
  and 4, 1 and 5 examples per class, SGD and adamw, and its one CNN
  setting), 2000 steps. The sweep, averaging and ``AutoTau`` are read from
  ``benchmarks/results/choosing_tau.json`` (the same harness, data, seeds
  and step count); only the policies that file lacks are trained here.
* ``per_example``: ``examples/per_example.py``'s per-example GAF (N = 100
  ghost microgradients, SGD with momentum, the Quickstart's data), with a
  sweep of taus for its default sequential rule, the example's tuned medoid
  rule at 0.6, averaging (the plain step) and the policies.

Every run is ``optax_gaf.process(identity, gaf, optimizer)`` (a true skip).
Seed ``s`` fixes the label corruption and the batch order (and, on digits,
the initialisation). Runs of one setting train together: one ``jax.vmap``
over seeds (and swept taus) of a ``jax.lax.scan`` over steps.

Results go to ``<out>/default_tau.json`` after every setting (resumable;
``--fresh`` starts over); ``default_tau.md`` and the plots
``default_tau_*.png`` are written from everything in that file.

Reproduce the committed results (from the repository root)::

  python -m benchmarks.default_tau
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
from benchmarks import choosing_tau
from benchmarks.harness import flax_guide
from benchmarks.harness import models
from benchmarks.harness import training

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")

# Candidate policies: name -> what gaf(tau=...) is given.
POLICIES = {
  "auto": lambda: optax_gaf.AutoTau(),
  "warmup_auto": lambda: optax_gaf.WarmupAutoTau(),  # 500 steps
  "warmup_auto_1000": lambda: optax_gaf.WarmupAutoTau(warmup_steps=1000),
}
SUITES = ("flax", "digits", "per_example")
PROGRAM_NAMES = {
  "nnx": "NNX tutorial (BatchNorm, Dropout, adamw)",
  "linen": "Linen example (SGD momentum)",
}


def parse_args(argv=None):
  p = argparse.ArgumentParser(
    description=__doc__.split("\n\n")[0],
    formatter_class=argparse.ArgumentDefaultsHelpFormatter,
  )
  p.add_argument("--suites", nargs="+", default=list(SUITES), choices=SUITES)
  p.add_argument(
    "--policies", nargs="+", default=list(POLICIES), choices=list(POLICIES)
  )
  p.add_argument(
    "--programs", nargs="+", default=["nnx", "linen"], choices=["nnx", "linen"]
  )
  p.add_argument("--noise", type=float, nargs="+", default=[0.4])
  p.add_argument("--seeds", type=int, default=3)
  p.add_argument(
    "--taus", type=float, nargs="+", default=[0.97, 0.9, 0.8, 0.7, 0.6]
  )
  p.add_argument(
    "--checkpoints",
    type=int,
    nargs="+",
    default=[250, 500, 1000, 2000, 4000, 8000],
    help="flax and per_example: steps at which the test accuracy is taken",
  )
  p.add_argument(
    "--digits-steps",
    type=int,
    default=2000,
    help="digits: steps (the committed sweep has 2000)",
  )
  p.add_argument(
    "--digits-settings",
    nargs="*",
    default=None,
    help="digits: setting keys to run (default: every key of the sweep file)",
  )
  p.add_argument(
    "--sweep",
    default=os.path.join(RESULTS, "choosing_tau.json"),
    help="digits: the committed sweep (benchmarks.choosing_tau's json)",
  )
  p.add_argument("--out", default=RESULTS)
  p.add_argument("--fresh", action="store_true", help="ignore saved results")
  p.add_argument("--report", action="store_true", help="only write reports")
  p.add_argument(
    "--quick",
    action="store_true",
    help="a few steps of one setting per suite (for the test suite)",
  )
  args = p.parse_args(argv)
  if args.quick:
    args.programs, args.noise, args.seeds = ["linen"], [0.4], 1
    args.taus, args.checkpoints, args.digits_steps = [0.8], [4, 8], 8
    args.digits_settings = ["mlp/N=2/per_class=1/noise=0.4/sgd"]
    # warmup_auto_1000 differs from warmup_auto only in its warm-up length.
    args.policies = [p for p in args.policies if p != "warmup_auto_1000"]
  if args.seeds < 1 or min(args.checkpoints) < 1 or args.digits_steps < 1:
    p.error("--seeds, --checkpoints and --digits-steps must be >= 1.")
  if any(not 0.0 <= t <= 2.0 for t in args.taus):
    p.error("--taus are cosine distances in [0, 2].")
  args.checkpoints = sorted(set(args.checkpoints))
  return args


def _stack(trees):
  return jax.tree.map(
    lambda *xs: jnp.stack([jnp.asarray(x) for x in xs]), *trees
  )


def _rows(method, seeds, checkpoints, acc, mem, trace):
  """Result rows from ``acc``, ``mem`` ``{step: [runs]}``, ``trace``."""
  rows = []
  for r, seed in enumerate(seeds):
    for step in checkpoints:
      ready = trace["ready"][r, :step]
      tail = trace["tau"][r, max(0, step - max(1, step // 10)) : step]
      rows.append(
        {
          "method": method,
          "seed": seed,
          "step": step,
          "test_acc": float(acc[step][r]),
          "memorisation": float(mem[step][r]),
          "acceptance": float(np.mean(trace["acceptance"][r, :step])),
          "skip_rate": float(1.0 - np.mean(ready)),
          # The mean threshold over the last tenth of the steps so far.
          "final_tau": float(np.mean(tail)),
        }
      )
  return rows


# ---------------------------------------------------------------- flax suite


def _train_flax(make_program, data, idx, checkpoints, progress, taus=None):
  """Trains vmapped runs; returns ``(acc, mem, trace)`` by checkpoint.

  ``make_program(tau)`` builds the program (``tau`` a traced scalar, one per
  run, or None); ``data`` and ``idx`` ``[S, runs, 32]`` hold one run each.
  """
  runs = idx.shape[1]
  tau = jnp.zeros([runs]) if taus is None else jnp.asarray(taus, jnp.float32)
  init = jax.jit(jax.vmap(lambda t: make_program(t).init()))
  run = jax.jit(
    jax.vmap(lambda s, d, i, t: make_program(t).run(s, d, i), (0, 0, 1, 0))
  )
  evaluate = jax.jit(jax.vmap(lambda s, d, t: make_program(t).evaluate(s, d)))
  state, prev, acc, mem, traces = init(tau), 0, {}, {}, []
  for step in checkpoints:
    state, trace = run(state, data, jnp.asarray(idx[prev:step]), tau)
    traces.append(jax.tree.map(np.asarray, trace))
    progress.update((step - prev) * runs)
    prev = step
    a, m, _ = evaluate(state, data, tau)
    acc[step], mem[step] = np.asarray(a), np.asarray(m)
  trace = {k: np.concatenate([t[k] for t in traces], 1) for k in traces[0]}
  return acc, mem, trace


def flax_methods(args, have=()):
  """``[(name, runs per seed)]`` of a flax setting not in ``have``."""
  methods = [("average", 1), ("sweep", len(args.taus))]
  methods += [(p, 1) for p in args.policies]
  swept = {f"tau={t:g}" for t in args.taus}
  return [
    (m, k)
    for m, k in methods
    if not ({m} if m != "sweep" else swept) <= set(have)
  ]


def run_flax_setting(args, program, noise, progress, have=()):
  """The runs of one program at one noise level that ``have`` lacks (method
  names); returns their result rows."""
  seeds = list(range(args.seeds))
  steps = args.checkpoints[-1]
  datas = [flax_guide.load_data(noise, s) for s in seeds]
  idx = np.stack([flax_guide.batch_indices(s, steps) for s in seeds], 1)
  build = flax_guide.PROGRAMS[program]
  n = flax_guide.NUM_MICROBATCHES
  rows = []
  for method, per_seed in flax_methods(args, have):
    if method == "average":

      def make(tau):
        return build(None)
    elif method == "sweep":

      def make(tau):
        return build(optax_gaf.gaf(tau, num_microbatches=n))
    else:
      policy = POLICIES[method]

      def make(tau, policy=policy):
        return build(optax_gaf.gaf(policy(), num_microbatches=n))

    taus = np.repeat(args.taus, len(seeds)) if method == "sweep" else None
    run_seeds = seeds * per_seed
    data = _stack([datas[s] for s in run_seeds])
    acc, mem, trace = _train_flax(
      make, data, np.tile(idx, (1, per_seed, 1)), args.checkpoints, progress,
      taus,
    )  # fmt: skip
    if method != "sweep":
      rows += _rows(method, seeds, args.checkpoints, acc, mem, trace)
      continue
    for k, t in enumerate(args.taus):
      part = slice(k * len(seeds), (k + 1) * len(seeds))
      rows += _rows(
        f"tau={t:g}",
        seeds,
        args.checkpoints,
        {s: a[part] for s, a in acc.items()},
        {s: m[part] for s, m in mem.items()},
        {key: v[part] for key, v in trace.items()},
      )
  return rows


# ---------------------------------------------------------------- digits suite


class _PatchCNN(models.SmallCNN):
  """``SmallCNN`` with its convolutions as ``flax_guide.patch_conv``.

  The same numbers up to rounding, without XLA:CPU's slow path for
  convolutions in a loop (jax-ml/jax#12868).
  """

  def __call__(self, x):
    for conv in (self.c1, self.c2):
      x = jax.nn.relu(
        flax_guide.patch_conv(x, conv.kernel[...], conv.bias[...])
      )
    return self.out(jnp.mean(x, axis=(1, 2)))


def _digits_model(model, shape, num_classes, seed):
  if model == "cnn":
    return _PatchCNN(shape[-1], num_classes, rngs=nnx.Rngs(seed))
  return models.make_model(model, shape, num_classes, seed)


def parse_setting(key: str):
  """``choosing_tau.setting_key``'s inverse."""
  model, n, per_class, noise, optimizer = key.split("/")
  return (
    model,
    int(n.split("=")[1]),
    int(per_class.split("=")[1]),
    float(noise.split("=")[1]),
    optimizer,
  )


def run_digits_policy(args, key, method, progress):
  """One policy in one ``choosing_tau`` setting, over seeds: result rows."""
  model, n, per_class, noise, optimizer = parse_setting(key)
  seeds = list(range(args.seeds))
  steps = args.digits_steps
  per_seed = [choosing_tau._data(noise, s, n, per_class, steps) for s in seeds]
  data = per_seed[0][0]
  shape = data.train_x.shape[1:]
  graphdef, _ = nnx.split(_digits_model(model, shape, data.num_classes, 0))
  params = _stack(
    [
      nnx.split(_digits_model(model, shape, data.num_classes, s))[1]
      for s in seeds
    ]
  )
  train_x = jnp.asarray(data.train_x)
  val_x, val_y = jnp.asarray(data.val_x), jnp.asarray(data.val_y)
  labels = _stack([d.train_y for d, _ in per_seed])
  corrupted = _stack([d.corrupted for d, _ in per_seed])
  idx = np.stack([i for _, i in per_seed], axis=1)  # [S, runs, N, m]
  policy = POLICIES[method]

  def tx():
    gaf = optax_gaf.gaf(policy(), num_microbatches=n)
    lr = choosing_tau.LEARNING_RATES[optimizer]
    inner = training.make_inner(optimizer, lr)
    return optax_gaf.process(optax.identity(), gaf, inner)

  def logits(p, x):
    return nnx.merge(graphdef, p)(x)

  def loss(p, batch):
    return optax.softmax_cross_entropy_with_integer_labels(
      logits(p, batch["x"]), batch["y"]
    ).mean()

  grads_of = optax_gaf.microbatch_grads(loss, n)

  def run(state, labels, idx):
    transform = tx()

    def step(state, step_idx):
      p, opt_state = state
      flat = step_idx.reshape(-1)
      _, grads = grads_of(p, {"x": train_x[flat], "y": labels[flat]})
      updates, opt_state = transform.update(grads, opt_state, p)
      s = optax_gaf.stats(opt_state)
      trace = {
        "acceptance": s["acceptance_rate"],
        "ready": s["ready"],
        "tau": s["tau"],
      }
      return (optax.apply_updates(p, updates), opt_state), trace

    return jax.lax.scan(step, state, idx)

  def evaluate(state, labels, corrupted):
    p = state[0]
    val = jnp.mean(jnp.argmax(logits(p, val_x), -1) == val_y)
    fit = jnp.argmax(logits(p, train_x), -1) == labels
    return val, jnp.sum(fit & corrupted) / jnp.maximum(jnp.sum(corrupted), 1)

  state = jax.jit(jax.vmap(lambda p: (p, tx().init(p))))(params)
  run_v = jax.jit(jax.vmap(run, in_axes=(0, 0, 1)))
  chunk = 500
  traces = []
  for start in range(0, steps, chunk):
    state, trace = run_v(state, labels, jnp.asarray(idx[start : start + chunk]))
    traces.append(jax.tree.map(np.asarray, trace))
    progress.update(min(chunk, steps - start) * len(seeds))
  trace = {k: np.concatenate([t[k] for t in traces], 1) for k in traces[0]}
  val, mem = jax.jit(jax.vmap(evaluate))(state, labels, corrupted)
  return _rows(
    method, seeds, [steps], {steps: np.asarray(val)}, {steps: np.asarray(mem)},
    trace,
  )  # fmt: skip


# ------------------------------------------------------------ per-example suite


def per_example_methods(args, ex):
  """``{name: examples/per_example.py method}``."""
  methods = {"average": ("plain",)}
  methods.update(
    {f"tau={t:g}": ("per_example", t, "sequential") for t in args.taus}
  )
  methods[f"medoid {ex.PER_EXAMPLE_TAU:g}"] = (
    "per_example",
    ex.PER_EXAMPLE_TAU,
    "medoid",
  )
  for p in args.policies:
    methods[p] = ("per_example", POLICIES[p](), "sequential")
  return methods


def run_per_example_seed(args, ex, seed, methods, progress):
  """``examples/per_example.py``'s runs of one seed: result rows."""
  steps = args.checkpoints[-1]
  train_x, val_x, clean_y, val_y = ex.load_digits()
  train_y = ex.symmetric_label_noise(clean_y, ex.NUM_CLASSES, 0.4, seed)
  idx = ex.class_balanced_batches(train_y, steps, seed)
  train_x, val_x, train_y, val_y, clean_y = (
    jnp.asarray(a) for a in (train_x, val_x, train_y, val_y, clean_y)
  )
  corrupted = train_y != clean_y
  rows = []
  for name, method in methods.items():
    graphdef, params = nnx.split(ex.MLP(nnx.Rngs(seed)))
    tx, run = ex.make_trainer(method, graphdef, train_x, train_y, idx.shape[-1])
    opt_state = tx.init(params)

    @jax.jit
    def evaluate(params, graphdef=graphdef):
      model = nnx.merge(graphdef, params)
      val = jnp.mean(jnp.argmax(model(val_x), -1) == val_y)
      fit = jnp.argmax(model(train_x), -1) == train_y
      return val, jnp.sum(fit & corrupted) / jnp.maximum(jnp.sum(corrupted), 1)

    prev, accepted = 0, []
    for step in args.checkpoints:
      params, opt_state, acceptance = run(params, opt_state, idx[prev:step])
      accepted.append(np.asarray(acceptance))
      progress.update(step - prev)
      prev = step
      val, mem = evaluate(params)
      plain = method[0] == "plain"
      s = None if plain else optax_gaf.stats(opt_state)
      rows.append(
        {
          "method": name,
          "seed": seed,
          "step": step,
          "test_acc": float(val),
          "memorisation": float(mem),
          "acceptance": float(np.mean(np.concatenate(accepted))),
          "skip_rate": 0.0 if plain else float(s["skip_rate"]),
          "final_tau": float("nan") if plain else float(s["tau"]),
        }
      )
  return rows


# ---------------------------------------------------------------- reports


def mean_at(rows, method, step=None, key="test_acc"):
  """Mean over seeds of ``key`` (points for accuracies), or None."""
  vals = [
    r[key]
    for r in rows
    if r["method"] == method and (step is None or r.get("step") == step)
  ]
  if not vals:
    return None
  scale = 100.0 if key in ("test_acc", "val_acc", "memorisation") else 1.0
  return scale * float(np.mean(vals))


def swept(rows):
  """The swept methods (``tau=...``) present in ``rows``, in order."""
  return list(
    dict.fromkeys(r["method"] for r in rows if r["method"][:4] == "tau=")
  )


def best_swept(rows, step=None, key="test_acc"):
  """``(method, points)`` of the best swept tau at ``step``."""
  scores = {m: mean_at(rows, m, step, key) for m in swept(rows)}
  scores = {m: v for m, v in scores.items() if v is not None}
  if not scores:
    return None, None
  best = max(scores, key=scores.get)
  return best, scores[best]


def candidates(results):
  """The methods judged against the issue's goals: 0.97 and the policies."""
  names = ["tau=0.97"]
  for entry in results.values():
    for r in entry["rows"]:
      if r["method"] in POLICIES and r["method"] not in names:
        names.append(r["method"])
  return names


def digits_rows(results, sweep):
  """``{setting: rows}``: the sweep file's rows and this study's policies.

  Rows of the sweep file get ``step`` = its step count and ``test_acc`` =
  its validation accuracy (the digits test set is the validation split).
  """
  out = {}
  for key, entry in results.items():
    if entry["suite"] != "digits":
      continue
    setting = key.split("/", 1)[1]
    base = sweep.get(setting)
    rows = [] if base is None else [
      {**r, "step": base.get("steps", 2000), "test_acc": r["val_acc"]}
      for r in base["rows"]
    ]  # fmt: skip
    mine = [
      r for r in entry["rows"] if r["method"] not in {x["method"] for x in rows}
    ]
    out[setting] = rows + mine
  return out


def _fmt(value, digits=1):
  return "-" if value is None else f"{value:.{digits}f}"


def _cell(value, average, best):
  if value is None:
    return "-"
  parts = []
  if average is not None:
    parts.append(f"{value - average:+.1f}")
  if best is not None:
    parts.append(f"{value - best:+.1f}")
  return f"{value:.1f} ({' / '.join(parts)})"


def flax_table(results, names) -> str:
  head = (
    "| program | noise | steps | averaging | best swept tau | "
    + " | ".join(names)
    + " |"
  )
  lines = [head, "|---" * (5 + len(names)) + "|"]
  for key, entry in results.items():
    if entry["suite"] != "flax":
      continue
    _, program, noise = key.split("/")
    rows = entry["rows"]
    for step in sorted({r["step"] for r in rows}):
      avg = mean_at(rows, "average", step)
      best, best_val = best_swept(rows, step)
      cells = [_cell(mean_at(rows, m, step), avg, best_val) for m in names]
      lines.append(
        f"| {program} | {noise.split('=')[1]} | {step} | {_fmt(avg)}"
        f" | {_fmt(best_val)} ({best and best[4:]}) | "
        + " | ".join(cells)
        + " |"
      )
  return "\n".join(lines)


def digits_table(drows, names) -> str:
  head = (
    "| setting | steps | averaging | best swept tau | "
    + " | ".join(names)
    + " |"
  )
  lines = [head, "|---" * (4 + len(names)) + "|"]
  for setting, rows in drows.items():
    step = max(r["step"] for r in rows)
    avg = mean_at(rows, "average", step)
    best, best_val = best_swept(rows, step)
    cells = [_cell(mean_at(rows, m, step), avg, best_val) for m in names]
    lines.append(
      f"| {setting} | {step} | {_fmt(avg)} | {_fmt(best_val)}"
      f" ({best and best[4:]}) | " + " | ".join(cells) + " |"
    )
  return "\n".join(lines)


def per_example_table(results, names) -> str:
  rows = [
    r
    for k, e in results.items()
    if e["suite"] == "per_example"
    for r in e["rows"]
  ]
  if not rows:
    return ""
  methods = list(dict.fromkeys(r["method"] for r in rows))
  extra = [
    m for m in methods if m not in names and m != "average" and m[:4] != "tau="
  ]
  cols = names + extra
  head = "| steps | averaging | best swept tau | " + " | ".join(cols) + " |"
  lines = [head, "|---" * (3 + len(cols)) + "|"]
  for step in sorted({r["step"] for r in rows}):
    avg = mean_at(rows, "average", step)
    best, best_val = best_swept(rows, step)
    cells = [_cell(mean_at(rows, m, step), avg, best_val) for m in cols]
    lines.append(
      f"| {step} | {_fmt(avg)} | {_fmt(best_val)} ({best and best[4:]}) | "
      + " | ".join(cells)
      + " |"
    )
  return "\n".join(lines)


def verdict(results, drows, name) -> list[str]:
  """The issue's goals for the method ``name``: one line each."""
  out = []
  flax = {k: e["rows"] for k, e in results.items() if e["suite"] == "flax"}
  early, late = [], []
  for key, rows in flax.items():
    if not key.endswith("noise=0.4"):
      continue
    program = key.split("/")[1]
    for step in (500, 1000):
      v, a = mean_at(rows, name, step), mean_at(rows, "average", step)
      if v is not None and a is not None:
        early.append((program, step, v - a))
    v, a = mean_at(rows, name, 4000), mean_at(rows, "average", 4000)
    if v is not None and a is not None:
      late.append((program, 4000, v - a))
  if early:
    ok = all(d >= -1.0 for *_, d in early)
    gaps = ", ".join(f"{p} {s}: {d:+.1f}" for p, s, d in early)
    out.append(
      f"- Flax guide, 40% noise, at most 1 point behind averaging at 500"
      f" and 1000 steps: {'met' if ok else 'not met'} ({gaps})."
    )
  if late:
    ok = all(d >= 15.0 for *_, d in late)
    gaps = ", ".join(f"{p}: {d:+.1f}" for p, _, d in late)
    out.append(
      f"- Flax guide, 40% noise, at least 15 points ahead of averaging at"
      f" 4000 steps: {'met' if ok else 'not met'} ({gaps})."
    )
  near, clean, total = [], [], 0
  for setting, rows in drows.items():
    step = max(r["step"] for r in rows)
    v = mean_at(rows, name, step)
    if v is None:
      continue
    total += 1
    near.append(v - best_swept(rows, step)[1])
    if "/noise=0/" in setting:
      clean.append(v - mean_at(rows, "average", step))
  if near:
    n_ok = sum(d >= -1.5 for d in near)
    out.append(
      f"- Digits: within 1.5 points of the best swept tau in {n_ok} of"
      f" {total} settings (goal: 28 of 33; worst {min(near):+.1f})."
    )
  if clean:
    n_ok = sum(d >= -0.5 for d in clean)
    out.append(
      f"- Digits, 0% noise: at most 0.5 points below averaging in {n_ok} of"
      f" {len(clean)} settings (worst {min(clean):+.1f})."
    )
  return out


def goals(results, drows, name) -> dict:
  """The issue's goals for ``name``: ``{goal: (met, worst, where)}``."""
  out = {}
  early, late, flax_clean = [], [], []
  for key, entry in results.items():
    if entry["suite"] == "flax" and key.endswith("noise=0"):
      rows, program = entry["rows"], key.split("/")[1]
      for step in sorted({r["step"] for r in rows}):
        v, a = mean_at(rows, name, step), mean_at(rows, "average", step)
        if v is not None and a is not None:
          flax_clean.append((v - a, f"{program} {step}"))
    if entry["suite"] != "flax" or not key.endswith("noise=0.4"):
      continue
    rows, program = entry["rows"], key.split("/")[1]
    for step, bucket in ((500, early), (1000, early), (4000, late)):
      v, a = mean_at(rows, name, step), mean_at(rows, "average", step)
      if v is not None and a is not None:
        bucket.append((v - a, f"{program} {step}"))
  if early:
    worst = min(early)
    out["flax_early"] = (worst[0] >= -1.0, *worst)
  if late:
    worst = min(late)
    out["flax_late"] = (worst[0] >= 15.0, *worst)
  if flax_clean:
    worst = min(flax_clean)
    out["flax_clean"] = (worst[0] >= -0.5, *worst)
  near, clean = [], []
  for setting, rows in drows.items():
    step = max(r["step"] for r in rows)
    v = mean_at(rows, name, step)
    if v is None:
      continue
    near.append(v - best_swept(rows, step)[1])
    if "/noise=0/" in setting:
      clean.append(v - mean_at(rows, "average", step))
  if near:
    ok = sum(d >= -1.5 for d in near)
    out["digits"] = (ok >= 28, ok, len(near))
  if clean:
    ok = sum(d >= -0.5 for d in clean)
    out["clean"] = (ok == len(clean), ok, len(clean))
  return out


def goals_table(results, drows, names) -> str:
  """One row per candidate, one column per goal: met or not, and by how
  much (the worst case)."""
  head = [
    "candidate",
    "Flax, 500 and 1000 steps: at most 1 point behind averaging",
    "Flax, 4000 steps: at least 15 points ahead",
    "digits: within 1.5 points of the best swept tau in 28 of 33",
    "digits, 0% noise: at most 0.5 points behind averaging",
    "Flax, 0% noise: at most 0.5 points behind averaging at any step",
  ]
  lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
  for name in names:
    g = goals(results, drows, name)
    cells = []
    for goal in ("flax_early", "flax_late"):
      if goal not in g:
        cells.append("-")
        continue
      met, worst, where = g[goal]
      verdict = "met" if met else "not met"
      cells.append(f"{verdict} (worst {worst:+.1f}, {where})")
    for goal in ("digits", "clean"):
      if goal not in g:
        cells.append("-")
        continue
      met, ok, total = g[goal]
      cells.append(f"{'met' if met else 'not met'} ({ok} of {total})")
    if "flax_clean" in g:
      met, worst, where = g["flax_clean"]
      verdict = "met" if met else "not met"
      cells.append(f"{verdict} (worst {worst:+.1f}, {where})")
    else:
      cells.append("-")
    lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def plot(results, drows, names, out) -> list[str]:
  """Learning curves of the flax suite and the digits regrets; paths."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  paths = []
  flax = [(k, e["rows"]) for k, e in results.items() if e["suite"] == "flax"]
  if flax:
    noises = sorted({k.split("=")[1] for k, _ in flax}, key=float)
    programs = list(dict.fromkeys(k.split("/")[1] for k, _ in flax))
    size = (6 * len(programs), 3.8 * len(noises))
    fig, axes = plt.subplots(
      len(noises), len(programs), figsize=size, squeeze=False
    )
    for key, rows in flax:
      ax = axes[noises.index(key.split("=")[1])][
        programs.index(key.split("/")[1])
      ]
      steps = sorted({r["step"] for r in rows})
      for m in swept(rows):
        ax.plot(
          steps, [mean_at(rows, m, s) for s in steps], color="0.75", lw=0.8
        )
      ax.plot(
        steps,
        [mean_at(rows, "average", s) for s in steps],
        "k-o",
        ms=3,
        label="averaging",
      )
      for i, m in enumerate(names):
        ys = [mean_at(rows, m, s) for s in steps]
        if any(y is not None for y in ys):
          ax.plot(steps, ys, "-o", ms=3, color=f"C{i}", label=m)
      ax.set_xscale("log")
      ax.set_xticks(steps, [str(x) for x in steps])
      ax.minorticks_off()
      program, noise = key.split("/")[1], key.split("=")[1]
      ax.set_title(f"{PROGRAM_NAMES[program]}, noise {noise}", fontsize=9)
      ax.set_xlabel("steps")
      ax.set_ylabel("test accuracy, % (grey: swept taus)")
      ax.grid(alpha=0.3)
      ax.legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(out, "default_tau_flax.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)
  if drows:
    keys = list(drows)
    x = np.arange(len(keys))
    fig, ax = plt.subplots(figsize=(12, 5))
    ax.axhline(0, color="k", lw=0.8)
    ax.axhline(-1.5, color="gray", ls="--", lw=0.8, label="goal: -1.5")
    for i, m in enumerate(names):
      gaps = []
      for k in keys:
        rows = drows[k]
        step = max(r["step"] for r in rows)
        v = mean_at(rows, m, step)
        gaps.append(np.nan if v is None else v - best_swept(rows, step)[1])
      ax.plot(
        x, gaps, "o", mfc="none", color=f"C{i}", label=f"{m} − best swept tau"
      )
    ax.set_xticks(x, keys, rotation=90, fontsize=6)
    ax.set_ylabel("final validation accuracy, points")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(out, "default_tau_digits.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)
  return paths


def report(results, sweep, out) -> str:
  """``default_tau.md`` and the plots from every stored setting."""
  names = candidates(results)
  drows = digits_rows(results, sweep)
  minutes = sum(e["seconds"] for e in results.values()) / 60
  commands = dict.fromkeys(c for e in results.values() for c in _commands(e))
  loads = [x for e in results.values() for x in np.ravel(e.get("load", []))]
  load = f"{min(loads):.1f} to {max(loads):.1f}" if loads else "not recorded"
  lines = [
    "Reproduce (from the repository root): "
    + ", ".join(f"`{c}`" for c in commands)
    + f". {len(results)} settings, {minutes:.0f} minutes of training"
    f" ({jax.default_backend().upper()}, {os.cpu_count()} cores shared with"
    f" other jobs; 1-minute load average {load}).",
    "",
    "Cells: test accuracy in %, mean over seeds (each seed is in the json),"
    " then (minus averaging / minus the best swept tau at that step) in"
    " points."
    " `tau=0.97` is the current default of `gaf()`.",
    "",
  ]
  for name in names:
    lines.append(f"**{name}**")
    lines.append("")
    lines += verdict(results, drows, name) or ["- no setting of the goals run."]
    lines.append("")
  if any(e["suite"] == "flax" for e in results.values()):
    lines += ["### Flax guide programs", "", flax_table(results, names), ""]
  if drows:
    lines += [
      "### Digits (benchmarks.choosing_tau settings)",
      "",
      "Averaging, the swept taus and `auto` from"
      " `benchmarks/results/choosing_tau.json`; the other policies trained"
      " here on the same data, seeds and steps (validation accuracy).",
      "",
      digits_table(drows, names),
      "",
    ]
  table = per_example_table(results, names)
  if table:
    lines += [
      "### Per-example GAF (examples/per_example.py, N = 100, 40% noise)",
      "",
      "Swept taus and the policies with the sequential rule;"
      " `medoid 0.6` is the example's tuned setting.",
      "",
      table,
      "",
    ]
  text = "\n".join(lines)
  with open(os.path.join(out, "default_tau.md"), "w") as f:
    f.write(text)
  with open(os.path.join(out, "default_tau_goals.md"), "w") as f:
    f.write(goals_table(results, drows, names) + "\n")
  plot(results, drows, names, out)
  return text


# ---------------------------------------------------------------- main


def _commands(entry) -> list[str]:
  """The commands that wrote a stored setting, in order."""
  if "commands" in entry:
    return entry["commands"]
  return [entry["command"]] if "command" in entry else []


def _todo(args, results, sweep):
  """``[(key, suite, what, runs x steps)]`` not yet in ``results``."""
  todo = []
  if "flax" in args.suites:
    for program, noise in itertools.product(args.programs, args.noise):
      key = f"flax/{program}/noise={noise:g}"
      rows = results.get(key, {}).get("rows", [])
      if rows and {r["step"] for r in rows} != set(args.checkpoints):
        continue  # other checkpoints: not mixed in one setting
      have = {r["method"] for r in rows}
      runs = sum(k for _, k in flax_methods(args, have)) * args.seeds
      if runs:
        todo.append(
          (key, "flax", (program, noise, have), runs * args.checkpoints[-1])
        )
  if "digits" in args.suites:
    settings = args.digits_settings
    if settings is None:
      settings = list(sweep)
    for setting in settings:
      key = f"digits/{setting}"
      have = {r["method"] for r in results.get(key, {}).get("rows", [])}
      have |= {r["method"] for r in sweep.get(setting, {}).get("rows", [])}
      for policy in args.policies:
        if policy not in have:
          todo.append(
            (key, "digits", (setting, policy), args.seeds * args.digits_steps)
          )
  if "per_example" in args.suites:
    for seed in range(args.seeds):
      key = f"per_example/seed={seed}"
      if key not in results:
        todo.append(
          (
            key,
            "per_example",
            seed,
            (len(args.taus) + 2 + len(args.policies)) * args.checkpoints[-1],
          )
        )
  return todo


def main(argv=None) -> dict:
  from tqdm.auto import tqdm

  args = parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, "default_tau.json")
  results = {}
  if os.path.exists(path) and not args.fresh:
    with open(path) as f:
      results = json.load(f)
  sweep = {}
  if os.path.exists(args.sweep):
    with open(args.sweep) as f:
      sweep = json.load(f)
  command = " ".join(["python -m benchmarks.default_tau", *(argv or [])])
  load = os.getloadavg()[0]
  todo = [] if args.report else _todo(args, results, sweep)
  if todo:
    ex = None
    with tqdm(
      total=sum(t[-1] for t in todo), unit="step", mininterval=10
    ) as progress:
      for key, suite, what, _ in todo:
        progress.set_postfix_str(key)
        start = time.perf_counter()
        if suite == "flax":
          rows = results.get(key, {}).get("rows", [])
          program, noise, have = what
          rows = rows + run_flax_setting(args, program, noise, progress, have)
        elif suite == "digits":
          rows = run_digits_policy(args, what[0], what[1], progress)
          rows = results.get(key, {}).get("rows", []) + rows
        else:
          if ex is None:
            from benchmarks import per_example_tau

            ex = per_example_tau.load_example()
          methods = per_example_methods(args, ex)
          rows = run_per_example_seed(args, ex, what, methods, progress)
        old = results.get(key, {})
        results[key] = {
          "suite": suite,
          "rows": rows,
          "seconds": time.perf_counter() - start + old.get("seconds", 0.0),
          "commands": list(dict.fromkeys([*_commands(old), command])),
          "load": [*old.get("load", []), [load, os.getloadavg()[0]]],
        }
        with open(path, "w") as f:
          json.dump(results, f, indent=1)
  if results:
    print(report(results, sweep, args.out))
  return results


if __name__ == "__main__":
  import sys

  main(sys.argv[1:])
