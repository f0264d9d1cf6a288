"""Compiled cost of each route's train step: FLOPs and bytes, deterministic.

Timings on a shared CPU are noisy; XLA's cost analysis of the compiled step
is not. This script compiles one train step per route (``process(identity,
aggregator, sgd)`` after the route's gradient function) on the MLP of
``vs_plain_step`` and prints XLA's FLOPs and bytes accessed, and the sum of
the updated params as a check of the result. Run it on two versions of the
code to show that a refactor changed neither the work nor the result. (XLA
counts a loop body once: the streaming route's FLOPs are one iteration's.)

  python -m benchmarks.compiled_cost --out /tmp/after.md
  git stash && python -m benchmarks.compiled_cost --out /tmp/before.md
  diff /tmp/before.md /tmp/after.md
"""

import argparse
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_gaf

TAU = 0.97


def _mlp():
  rng = np.random.default_rng(0)

  def w(*shape):
    return jnp.asarray(rng.normal(size=shape) * 0.1, jnp.float32)

  params = {
    "w1": w(64, 256),
    "b1": jnp.zeros(256),
    "w2": w(256, 256),
    "b2": jnp.zeros(256),
    "w3": w(256, 10),
  }
  batch = {
    "x": jnp.asarray(rng.normal(size=(64, 64)), jnp.float32),
    "y": jnp.asarray(rng.integers(0, 10, 64)),
  }

  def loss(p, b):
    h = jnp.tanh(b["x"] @ p["w1"] + p["b1"])
    h = jnp.tanh(h @ p["w2"] + p["b2"])
    logits = h @ p["w3"]
    xent = optax.softmax_cross_entropy_with_integer_labels(logits, b["y"])
    return jnp.mean(xent)

  return params, batch, loss


def routes(loss, n):
  """``name -> (gradient function, aggregator)``."""
  stacked = optax_gaf.microbatch_grads(loss, n)
  ghost = optax_gaf.ghost_microgradients(loss, n)
  return {
    "stacked sequential": (stacked, optax_gaf.gaf(TAU)),
    "stacked medoid": (stacked, optax_gaf.gaf(TAU, rule="medoid")),
    "streaming": (
      optax_gaf.streaming_filtered_grads(loss, n, TAU),
      optax_gaf.record_filtered(),
    ),
    "ghost": (ghost, optax_gaf.gaf(TAU)),
    "ghost per_leaf AutoTau": (
      ghost,
      optax_gaf.gaf(optax_gaf.AutoTau(), granularity="per_leaf"),
    ),
  }


def cost_rows(ns=(8, 64)):
  """One row per (N, route): FLOPs, bytes accessed, sum of new params."""
  params, batch, loss = _mlp()
  rows = []
  for n in ns:
    for name, (grad_fn, agg) in routes(loss, n).items():
      tx = optax_gaf.process(optax.identity(), agg, optax.sgd(0.1))

      def step(p, state, b, grad_fn=grad_fn, tx=tx):
        _, grads = grad_fn(p, b)
        updates, state = tx.update(grads, state, p)
        return optax.apply_updates(p, updates), state

      state = tx.init(params)
      compiled = jax.jit(step).lower(params, state, batch).compile()
      cost = compiled.cost_analysis()
      cost = cost[0] if isinstance(cost, list) else cost
      new_params, _ = compiled(params, state, batch)
      total = sum(float(jnp.sum(x)) for x in jax.tree.leaves(new_params))
      rows.append(
        (
          n,
          name,
          cost.get("flops", 0.0),
          cost.get("bytes accessed", 0.0),
          total,
        )
      )
  return rows


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--n", type=int, nargs="+", default=[8, 64])
  parser.add_argument("--out", type=pathlib.Path, default=None)
  args = parser.parse_args(argv)
  lines = [
    "| N | route | FLOPs | bytes accessed | sum of new params |",
    "|---|---|---|---|---|",
  ]
  for n, name, flops, nbytes, total in cost_rows(args.n):
    lines.append(f"| {n} | {name} | {flops:.6g} | {nbytes:.6g} | {total:.5f} |")
  text = "\n".join(lines) + "\n"
  sys.stdout.write(text)
  if args.out is not None:
    args.out.write_text(text)


if __name__ == "__main__":
  main()
