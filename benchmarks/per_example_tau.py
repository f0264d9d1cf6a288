"""Per-example GAF's tau and rule on the Quickstart's task, over seeds.

Trains ``examples/per_example.py``'s per-example GAF (N = the batch of 100,
through ``optax_gaf.ghost_microgradients``) with every ``--taus`` value and
``optax_gaf.AutoTau()``, for every ``--rules`` rule and ``--seeds`` seed, on
that program's data, batches and model, and prints the final validation
accuracy and memorisation (mean over seeds, min..max) and the acceptance and
skipped steps. For comparison it trains the example's other two methods on
the same seeds: the plain step (averaging) and GAF on 2 microbatches with
tau=0.8. The example's default ``--tau`` and ``--rule`` come from this table.

Run from the repository root::

  python -m benchmarks.record benchmarks/results/per_example_tau.md \\
    python -m benchmarks.per_example_tau
"""

import argparse
import importlib.util
import pathlib
import time

import numpy as np

import optax_gaf

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples"


def load_example():
  """``examples/per_example.py`` as a module (its main does not run)."""
  path = EXAMPLE / "per_example.py"
  spec = importlib.util.spec_from_file_location("per_example", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


class _Quiet:
  def update(self, n):
    pass

  def set_postfix(self, **kwargs):
    pass


def run_seed(ex, seed, steps, configs):
  """``{method: (val_acc, memorisation, acceptance, skipped)}``.

  A method is one of ``examples/per_example.py``'s: ``("plain",)``,
  ``("microbatch", N, tau)`` or ``("per_example", tau, rule)``.
  """
  args = ex.parse_args(["--steps", str(steps), "--seed", str(seed)])
  train_x, val_x, clean_y, val_y = ex.load_digits()
  train_y = ex.symmetric_label_noise(
    clean_y, ex.NUM_CLASSES, args.label_noise, seed
  )
  data = (train_x, val_x, train_y, val_y, clean_y)
  idx = ex.class_balanced_batches(train_y, steps, seed)
  out = {}
  for method in configs:
    history, state = ex.train(method, data, idx, args, _Quiet())
    plain = method[0] == "plain"
    out[method] = (
      history["val_acc"][-1],
      history["memorisation"][-1],
      np.nan if plain else float(np.mean(history["acceptance"])),
      np.nan if plain else int(optax_gaf.stats(state)["skipped_steps"]),
    )
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument(
    "--taus", default="0.6,0.65,0.7,0.75,0.8,auto", help="comma list"
  )
  p.add_argument("--rules", default="sequential,medoid", help="comma list")
  p.add_argument("--seeds", type=int, default=3)
  p.add_argument("--steps", type=int, default=8000)
  args = p.parse_args(argv)
  ex = load_example()
  taus = [t if t == "auto" else float(t) for t in args.taus.split(",")]
  configs = [("plain",), ("microbatch", ex.NUM_MICROBATCHES, ex.MICROBATCH_TAU)]
  rules = args.rules.split(",")
  configs += [("per_example", t, r) for r in rules for t in taus]
  print(
    f"digits, 40% label noise, batches of 100, {args.steps} steps,"
    f" seeds 0..{args.seeds - 1}; mean over seeds (min..max)"
  )
  start = time.time()
  runs = [run_seed(ex, s, args.steps, configs) for s in range(args.seeds)]
  print(
    f"{'N':>4}{'rule':>12}{'tau':>7}{'val acc':>22}{'memorisation':>22}"
    f"{'acceptance':>12}{'skipped':>9}"
  )
  for config in configs:
    v, m, a, k = (np.array(x) for x in zip(*(r[config] for r in runs)))
    n, rule, tau = {
      "plain": lambda: ("-", "averaging", "-"),
      "microbatch": lambda: (config[1], "sequential", config[2]),
      "per_example": lambda: (100, config[2], config[1]),
    }[config[0]]()
    tau = "Auto" if tau == "auto" else tau if tau == "-" else f"{tau:g}"
    print(
      f"{n:>4}{rule:>12}{tau:>7}"
      f"{f'{v.mean():.3f} ({v.min():.3f}..{v.max():.3f})':>22}"
      f"{f'{m.mean():.3f} ({m.min():.3f}..{m.max():.3f})':>22}"
      f"{a.mean():>12.3f}{k.mean():>9.0f}".replace("nan", "  -")
    )
  print(f"(ran in {time.time() - start:.0f} s)")


if __name__ == "__main__":
  main()
