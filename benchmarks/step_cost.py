"""XLA's own count of one train step's work, averaging against GAF.

The train step of ``benchmarks/overhead.py`` (the 25.6k-parameter CNN,
``microbatch_grads``, the aggregator in ``aggregating.process``, SGD with
momentum) at microbatch size 1, compiled for N microbatches and read with
``cost_analysis()`` (flops) and ``memory_analysis()`` (temp bytes); also the
flops of one microgradient (``value_and_grad`` of one example). Nothing is
timed, so the counts do not depend on the machine's load, only on the jax
version and the backend.

Run from the repository root::

  python -m benchmarks.step_cost

It writes ``benchmarks/results/step_cost.md``.
"""

import argparse

import jax

from benchmarks import _common
from benchmarks import overhead

VARIANTS = {"average": "average", "block route": "sequential", "gram": "gram"}


def compiled(fn, *args):
  return jax.jit(fn).lower(*args).compile()


def flops(executable) -> float:
  cost = executable.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return float(cost["flops"])


def step_costs(n, params):
  batch = _common.image_batch(jax.random.key(n), n)
  rows = {}
  for label, name in VARIANTS.items():
    tx, step = overhead.make_step(overhead.variants(n)[name], n)
    exe = compiled(step, params, tx.init(params), batch)
    temp = exe.memory_analysis().temp_size_in_bytes
    rows[label] = (flops(exe) / 1e6, temp / 2**20)
  return rows


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--ns", type=int, nargs="+", default=[16, 64])
  p.add_argument("--out", default="benchmarks/results")
  args = p.parse_args(argv)
  params = _common.cnn_init(jax.random.key(0))
  one = _common.image_batch(jax.random.key(0), 1)
  grad = compiled(jax.value_and_grad(_common.xent), params, one)
  lines = [
    "XLA's counts for one jitted train step of the small CNN"
    f" ({_common.num_params(params)} parameters), microbatch size 1,"
    f" SGD momentum, tau={overhead.TAU}; jax {jax.__version__},"
    f" backend {jax.default_backend()}. Compiled, not timed.",
    "`python -m benchmarks.step_cost`",
    "",
    f"One microgradient (`value_and_grad` of one example):"
    f" {flops(grad) / 1e6:.1f} MFLOP.",
    "",
    "| N | variant | MFLOP per step | vs average | temp memory (MiB) |",
    "| ---: | --- | ---: | ---: | ---: |",
  ]
  for n in args.ns:
    rows = step_costs(n, params)
    base = rows["average"][0]
    for label, (mflop, mib) in rows.items():
      lines.append(
        f"| {n} | {label} | {mflop:.0f} | {mflop / base - 1:+.0%} | {mib:.2f} |"
      )
  text = "\n".join(lines) + "\n"
  print(text)
  _common.write_result(args.out, "step_cost.md", text)


if __name__ == "__main__":
  main()
