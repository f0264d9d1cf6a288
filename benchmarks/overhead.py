"""Overhead of GAF over plain averaging in a full jitted train step.

The step: per-microbatch gradients of a small CNN on 32x32x3 inputs (``vmap``
over N microbatches), the aggregator inside ``aggregating.process``, and SGD
with momentum. Variants are timed interleaved in one process (see
``_common.interleaved``); the table gives each GAF variant's time per step
divided by plain averaging's (``aggregating.average_per_element_updates``).

* ``sequential`` / ``pairwise``: ``gaf(rule=...)`` as shipped (the block
  fast path on one device).
* ``gram``: the sequential rule through the full N x N Gram matrix (the
  route every other rule and the multi-device placement take), for reference.

``--compare-ref REF`` times this checkout's gaf against the library at a
git revision instead (default variants off): the revision's ``optax_gaf/``
is written with ``git show`` into a temporary package (imports renamed) and
imported side by side, and both run interleaved in one process, whole train
steps and the aggregator alone. It writes ``overhead_float_range.md``: the
scale-safe Gram (c1baf38) against ``ef58a6b``, the last library before it.

Run from the repository root::

  python -m benchmarks.overhead              # the README table
  python -m benchmarks.overhead --quick      # a smoke run
  python -m benchmarks.overhead --isolated   # aggregators alone
  python -m benchmarks.overhead --compare-ref ef58a6b

It writes ``benchmarks/results/overhead.md`` and ``overhead.png`` (or
``overhead_isolated.md``, or ``overhead_float_range.md``).
"""

import argparse
import importlib
import os
import re
import subprocess
import sys
import tempfile

import jax
import numpy as np
from optax.experimental import aggregating
from tqdm import tqdm

import optax_gaf
from benchmarks import _common
from optax_gaf import rules

TAU = 0.97  # the paper's default; a random CNN accepts some and rejects some


def gram_sequential(tau):
  """The sequential rule through the full Gram matrix, for reference.

  A rule that gaf() does not know as a running-aggregate rule takes the Gram
  route whatever N, so wrapping ``rules.sequential`` forces it.
  """
  return optax_gaf.gaf(
    tau, rule=lambda gram, usable, t: rules.sequential(gram, usable, t)
  )


def variants(n):
  return {
    "average": aggregating.average_per_element_updates(),
    "sequential": optax_gaf.gaf(TAU, rule="sequential", num_microbatches=n),
    "pairwise": optax_gaf.gaf(TAU, rule="pairwise", num_microbatches=n),
    "gram": gram_sequential(TAU),
  }


def make_step(aggregator, n):
  tx, step = _common.train_step(
    aggregator, optax_gaf.microbatch_grads(_common.xent, n)
  )
  return tx, jax.jit(step)


def isolated(ns, rounds, out_dir):
  """The aggregators alone on stacked CNN microgradients (cost: N and P only).

  Far less noisy than whole steps: ``gaf - average`` here, divided by a
  whole step's time, is the overhead a step can show.
  """
  params = _common.cnn_init(jax.random.key(0))
  rows = []
  for n in tqdm(ns, desc="aggregator alone"):
    key = jax.random.key(n)
    grads = jax.tree.map(
      lambda p: p[None] + 0.3 * jax.random.normal(key, (n,) + p.shape), params
    )
    fns = {}
    for name, agg in variants(n).items():
      update = jax.jit(agg.update)
      state = agg.init(params)
      fns[name] = lambda update=update, state=state: update(grads, state)
    t = _common.interleaved(fns, rounds)
    rows.append((n, {k: float(np.median(v)) * 1e6 for k, v in t.items()}))
  table = "\n".join(
    [
      "| N | average (us) | sequential (us) | pairwise (us) |"
      " gram (sequential) (us) |",
      "| ---: | ---: | ---: | ---: | ---: |",
    ]
    + [
      f"| {n} | {r['average']:.0f} | {r['sequential']:.0f} |"
      f" {r['pairwise']:.0f} | {r['gram']:.0f} |"
      for n, r in rows
    ]
  )
  print(table)
  _common.write_result(
    out_dir,
    "overhead_isolated.md",
    f"The aggregator's `update` alone, jitted, on N stacked microgradients"
    f" of the {_common.num_params(params)}-parameter CNN (median"
    f" microseconds over {rounds} interleaved rounds, {os.cpu_count()} CPU"
    f" cores).\n`python -m benchmarks.overhead --isolated`"
    f"\n\n{table}\n",
  )


def _git(*args):
  return subprocess.run(
    ["git", *args], check=True, capture_output=True, text=True
  ).stdout


def import_at(ref):
  """The ``optax_gaf`` package of git revision ``ref``, as another module.

  ``git show`` writes every file of ``optax_gaf/`` at ``ref`` into a
  temporary directory as package ``optax_gaf_<sha>``, with every
  ``optax_gaf`` import renamed, and imports it next to this checkout's.
  """
  sha = _git("rev-parse", "--short", f"{ref}^{{commit}}").strip()
  name = f"optax_gaf_{sha}"
  root = tempfile.mkdtemp(prefix="optax_gaf_ref_")
  for path in _git("ls-tree", "-r", "--name-only", sha, "optax_gaf/").split():
    text = _git("show", f"{sha}:{path}")
    if path.endswith(".py"):
      text = re.sub(r"\boptax_gaf\b", name, text)
    target = os.path.join(root, name + path[len("optax_gaf") :])
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with open(target, "w") as f:
      f.write(text)
  sys.path.insert(0, root)
  return sha, importlib.import_module(name)


COMPARED_RULES = ("sequential", "medoid")  # block route above N=16; Gram


def _ratio_stats(t, num, den):
  r = t[num] / t[den]  # per round: both were timed in the same round
  return np.percentile(r, [25, 50, 75])


def compare(refs, ns, sizes, rounds, out_dir):
  """This checkout's gaf against ``refs`` (git revisions), interleaved.

  For each rule, N and microbatch size: whole train steps (as in the main
  table), and the aggregator's jitted ``update`` alone on the CNN's stacked
  microgradients; the table gives the median of the per-round time ratios
  now / ref (and the quartiles).
  """
  others = dict(import_at(ref) for ref in refs)
  head = _git("rev-parse", "--short", "HEAD").strip()
  dirty = bool(_git("status", "--porcelain", "--", "optax_gaf/").strip())
  now = f"{head}{' + uncommitted changes' if dirty else ''}"
  params = _common.cnn_init(jax.random.key(0))
  rows = []

  def gafs(rule, n):
    out = {"now": optax_gaf.gaf(TAU, rule=rule, num_microbatches=n)}
    for sha, lib in others.items():
      out[sha] = lib.gaf(TAU, rule=rule, num_microbatches=n)
    return out

  for rule in COMPARED_RULES:
    for n in tqdm(ns, desc=f"{rule}: aggregator alone"):
      key = jax.random.key(n)
      grads = jax.tree.map(
        lambda p: p[None] + 0.3 * jax.random.normal(key, (n,) + p.shape),
        params,
      )
      fns = {}
      for name, agg in gafs(rule, n).items():
        update, state = jax.jit(agg.update), agg.init(params)
        fns[name] = lambda update=update, state=state: update(grads, state)
      t = _common.interleaved(fns, rounds)
      rows.append((rule, "alone", n, float(np.median(t["now"])) * 1e3, t))
    for mb in sizes:
      for n in tqdm(ns, desc=f"{rule}: step, microbatch size {mb}"):
        batch = _common.image_batch(jax.random.key(n * 100 + mb), n * mb)
        fns = {}
        for name, agg in gafs(rule, n).items():
          tx, step = make_step(agg, n)
          state = tx.init(params)
          fns[name] = lambda step=step, state=state: step(params, state, batch)
        t = _common.interleaved(fns, rounds)
        rows.append((rule, mb, n, float(np.median(t["now"])) * 1e3, t))
      tqdm.write(f"{rule} microbatch size {mb} done")

  cols = "".join(f" now / {sha} |" for sha in others)
  lines = [
    "| rule | what | N | now (ms) |" + cols,
    "| --- | --- | ---: | ---: |" + " ---: |" * len(others),
  ]
  worst = 0.0
  for rule, what, n, ms, t in rows:
    what = "update alone" if what == "alone" else f"step, microbatch {what}"
    cells = ""
    for sha in others:
      q1, med, q3 = _ratio_stats(t, "now", sha)
      worst = max(worst, med)
      cells += f" {med:.3f} [{q1:.2f}, {q3:.2f}] |"
    lines.append(f"| {rule} | {what} | {n} | {ms:.2f} |{cells}")
  table = "\n".join(lines)
  print(table)
  print(f"largest median ratio: {worst:.3f}")
  cmd = " ".join(f"--compare-ref {r}" for r in refs)
  if out_dir != "benchmarks/results":
    cmd += f" --out {out_dir}"
  _common.write_result(
    out_dir,
    "overhead_float_range.md",
    f"This checkout's gaf (`now`: {now}) against the library at"
    f" {', '.join(f'`{r}` ({sha})' for r, sha in zip(refs, others))}"
    f" imported side by side (`git show` into a temporary package), timed"
    f" interleaved in one process: the median over {rounds} rounds of the"
    f" per-round time ratio, [quartiles]. Small CNN,"
    f" {_common.num_params(params)} parameters, 32x32x3 inputs,"
    f" aggregating.process with SGD momentum, tau={TAU}; microgradients"
    f" whose norms stay in the safe window (the common step)."
    f" {os.cpu_count()} CPU cores shared with other jobs, jax"
    f" {jax.__version__}.\n\n`python -m benchmarks.overhead {cmd}"
    f" --ns {' '.join(map(str, ns))} --sizes {' '.join(map(str, sizes))}"
    f" --rounds {rounds}`\n\n{table}\n\nLargest median ratio: {worst:.3f}\n",
  )


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument(
    "--quick",
    action="store_true",
    help="N in {2, 16}, microbatch sizes {8, 1}, 3 rounds",
  )
  parser.add_argument(
    "--isolated", action="store_true", help="time the aggregators alone, per N"
  )
  parser.add_argument("--rounds", type=int, default=11)
  parser.add_argument("--out", default="benchmarks/results")
  parser.add_argument(
    "--compare-ref",
    action="append",
    metavar="REF",
    help="time this checkout's gaf against the library at git revision REF"
    " (repeatable)",
  )
  parser.add_argument(
    "--ns", type=int, nargs="+", default=[4, 16, 32], help="with --compare-ref"
  )
  parser.add_argument(
    "--sizes",
    type=int,
    nargs="*",
    default=[4, 1],
    help="with --compare-ref; none: the aggregator alone only",
  )
  args = parser.parse_args()
  if args.compare_ref:
    return compare(args.compare_ref, args.ns, args.sizes, args.rounds, args.out)
  if args.isolated:
    return isolated([2, 4, 8, 16, 32, 64], 15, args.out)
  ns = [2, 16] if args.quick else [2, 4, 8, 16, 32, 64]
  sizes = [8, 1] if args.quick else [32, 4, 1]
  rounds = 3 if args.quick else args.rounds

  params = _common.cnn_init(jax.random.key(0))
  rows = []
  for mb in sizes:
    for n in tqdm(ns, desc=f"microbatch size {mb}"):
      batch = _common.image_batch(jax.random.key(n * 100 + mb), n * mb)
      fns = {}
      for name, agg in variants(n).items():
        tx, step = make_step(agg, n)
        state = tx.init(params)
        fns[name] = lambda step=step, state=state: step(params, state, batch)
      t = _common.interleaved(fns, rounds)
      ratio = {k: float(np.median(t[k] / t["average"])) for k in t}
      rows.append((mb, n, float(np.median(t["average"])) * 1e3, ratio))
      tqdm.write(
        f"mb={mb:2d} N={n:2d} avg {rows[-1][2]:8.2f} ms  "
        + "  ".join(f"{k} {v:.3f}" for k, v in ratio.items() if k != "average")
      )

  head = (
    "| microbatch size | N | average (ms/step) | sequential | pairwise |"
    " gram (sequential) |\n| ---: | ---: | ---: | ---: | ---: | ---: |"
  )
  lines = [head] + [
    f"| {mb} | {n} | {avg:.2f} | {r['sequential']:.3f} | {r['pairwise']:.3f}"
    f" | {r['gram']:.3f} |"
    for mb, n, avg, r in rows
  ]
  worst = max(max(r["sequential"], r["pairwise"]) for *_, r in rows)
  table = "\n".join(lines)
  print(table)
  print(f"worst gaf / average: {worst:.3f}")
  suffix = "_quick" if args.quick else ""
  _common.write_result(
    args.out,
    f"overhead{suffix}.md",
    f"Time per train step relative to `average_per_element_updates`"
    f" (median over {rounds} interleaved rounds). Small CNN,"
    f" {_common.num_params(params)} parameters, 32x32x3 inputs, SGD"
    f" momentum, tau={TAU}. {os.cpu_count()} CPU cores, jax"
    f" {jax.__version__}.\n`python -m benchmarks.overhead"
    f"{' --quick' if args.quick else ''}`\n\n{table}\n\n"
    f"Worst gaf / average: {worst:.3f}\n",
  )
  _plot(rows, ns, sizes, os.path.join(args.out, f"overhead{suffix}.png"))


def _plot(rows, ns, sizes, path):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(
    1, len(sizes), figsize=(4 * len(sizes), 3.2), sharey=True
  )
  for ax, mb in zip(np.atleast_1d(axes), sizes):
    sel = [r for r in rows if r[0] == mb]
    for key in ("sequential", "pairwise", "gram"):
      ax.plot([r[1] for r in sel], [r[3][key] for r in sel], "o-", label=key)
    ax.axhline(1.10, color="k", ls="--", lw=1, label="1.10x")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.set_title(f"microbatch size {mb}")
    ax.set_xlabel("N microbatches")
  np.atleast_1d(axes)[0].set_ylabel("step time / averaging")
  np.atleast_1d(axes)[0].legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)


if __name__ == "__main__":
  main()
