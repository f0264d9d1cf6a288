"""Times the filter alone on the vmap path for several block sizes.

``_running.filter_blocks`` walks the N microgradients in blocks: one
B x B Gram matrix per block, B dot products with the carried aggregate, one
fold. B = 1 is a pure stream, B >= N the full Gram matrix. The gradients are
the small CNN's parameters (25.6k) stacked N times; ``mean`` is the plain
average of the same stack. Interleaved, median microseconds per call.

Run from the repository root::

  python -m benchmarks.block_size
"""

import jax
import numpy as np

from benchmarks import _common
from optax_gaf import _running


def main():
  params = _common.cnn_init(jax.random.key(0))
  print("| N | " + " | ".join(f"B={b}" for b in (1, 4, 16, 64)) + " | mean |")
  print("| ---: " * 6 + "|")
  for n in (4, 16, 64):
    key = jax.random.key(n)
    grads = jax.tree.map(
      lambda p: p[None] + 0.5 * jax.random.normal(key, (n,) + p.shape), params
    )
    fns = {}
    for b in (1, 4, 16, 64):
      f = jax.jit(
        lambda g, b=b: _running.finish(
          _running.filter_blocks(jax.tree.leaves(g), 0.97, 1.0, b),
          1.0,
          [x.dtype for x in jax.tree.leaves(g)],
        )
      )
      fns[f"B={b}"] = lambda f=f: f(grads)
    mean = jax.jit(lambda g: jax.tree.map(lambda x: x.mean(0), g))
    fns["mean"] = lambda: mean(grads)
    t = _common.interleaved(fns, rounds=7)
    print(
      f"| {n} | "
      + " | ".join(f"{np.median(v) * 1e6:.0f}" for v in t.values())
      + " |"
    )


if __name__ == "__main__":
  main()
