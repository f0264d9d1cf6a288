"""Compiled memory of a GAF train step: vmap path vs streaming path.

``jax.jit(step).lower(...).compile().memory_analysis()`` for the small CNN of
``benchmarks/overhead.py`` (microbatch size 8) at N = 4, 16 and 64:

* ``vmap``: ``microbatch_grads`` (all N microgradients at once) + ``gaf``;
* ``streaming``: ``streaming_filtered_grads`` (one microgradient at a time in a
  ``fori_loop``) + ``streamed``, which records its decisions.

"temp" is XLA's scratch memory, what the step needs beyond its inputs and
outputs; the batch itself (an argument) grows with N on both paths.

Run::

  python -m benchmarks.memory

It writes ``benchmarks/results/memory.md``.
"""

import argparse

import jax

import optax_gaf
from benchmarks import _common

TAU = 0.97
MICROBATCH = 8


def make_step(n, streaming, rule):
  if streaming:
    grad_fn = optax_gaf.streaming_filtered_grads(
      _common.xent, n, TAU, rule=rule
    )
    aggregator = optax_gaf.record_filtered(num_microbatches=n)
  else:
    grad_fn = optax_gaf.microbatch_grads(_common.xent, n)
    aggregator = optax_gaf.gaf(TAU, rule=rule, num_microbatches=n)
  return _common.train_step(aggregator, grad_fn)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--ns", type=int, nargs="+", default=[4, 16, 64])
  parser.add_argument("--rule", default="sequential")
  parser.add_argument("--out", default="benchmarks/results")
  args = parser.parse_args()
  params = _common.cnn_init(jax.random.key(0))
  param_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
  rows = []
  for n in args.ns:
    batch = _common.image_batch(jax.random.key(n), n * MICROBATCH)
    batch_bytes = sum(x.nbytes for x in jax.tree.leaves(batch))
    row = [n, batch_bytes]
    for streaming in (False, True):
      tx, step = make_step(n, streaming, args.rule)
      mem = (
        jax.jit(step)
        .lower(params, tx.init(params), batch)
        .compile()
        .memory_analysis()
      )
      row.append(mem.temp_size_in_bytes)
    rows.append(row)
    print(
      f"N={n:3d} batch {batch_bytes / 2**20:6.2f} MiB  temp vmap"
      f" {row[2] / 2**20:7.2f} MiB  streaming {row[3] / 2**20:7.2f} MiB"
    )
  mib = lambda b: f"{b / 2**20:.2f}"
  table = "\n".join(
    [
      "| N | batch (MiB, an argument) | temp, vmap (MiB) |"
      " temp, streaming (MiB) |",
      "| ---: | ---: | ---: | ---: |",
    ]
    + [f"| {n} | {mib(b)} | {mib(v)} | {mib(s)} |" for n, b, v, s in rows]
  )
  print(table)
  _common.write_result(
    args.out,
    "memory.md",
    f"XLA temp memory of one jitted train step (`memory_analysis()`),"
    f" small CNN with {_common.num_params(params)} parameters"
    f" ({mib(param_bytes)} MiB), microbatch size {MICROBATCH},"
    f" rule={args.rule}, jax {jax.__version__} on CPU.\n"
    f"`PYTHONPATH=. python benchmarks/memory.py`\n\n{table}\n",
  )


if __name__ == "__main__":
  main()
