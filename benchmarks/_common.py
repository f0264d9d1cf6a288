"""Shared by the benchmarks: a small CNN on 32x32x3 inputs, and timing."""

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from optax.experimental import aggregating


def cnn_init(key, num_classes=10):
  """conv3x3(16) - pool - conv3x3(32) - pool - dense: 25.6k parameters."""
  k1, k2, k3 = jax.random.split(key, 3)
  he = lambda k, shape, fan_in: (
    jax.random.normal(k, shape) * (2 / fan_in) ** 0.5
  )
  return {
    "conv1": {"w": he(k1, (3, 3, 3, 16), 27), "b": jnp.zeros(16)},
    "conv2": {"w": he(k2, (3, 3, 16, 32), 144), "b": jnp.zeros(32)},
    "dense": {
      "w": he(k3, (8 * 8 * 32, num_classes), 2048),
      "b": jnp.zeros(num_classes),
    },
  }


def _conv(x, layer):
  y = jax.lax.conv_general_dilated(
    x, layer["w"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
  )
  y = jax.nn.relu(y + layer["b"])
  n, h, w, c = y.shape
  return y.reshape(n, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def cnn_apply(params, x):
  x = _conv(_conv(x, params["conv1"]), params["conv2"])
  return x.reshape(x.shape[0], -1) @ params["dense"]["w"] + params["dense"]["b"]


def xent(params, batch, apply_fn=cnn_apply):
  logits = apply_fn(params, batch["x"])
  logp = jax.nn.log_softmax(logits)
  return -jnp.mean(jnp.take_along_axis(logp, batch["y"][:, None], axis=1))


def image_batch(key, size, num_classes=10):
  kx, ky = jax.random.split(key)
  return {
    "x": jax.random.normal(kx, (size, 32, 32, 3)),
    "y": jax.random.randint(ky, (size,), 0, num_classes),
  }


def num_params(params):
  return sum(x.size for x in jax.tree.leaves(params))


def interleaved(fns, rounds, min_time=0.05):
  """Times zero-argument callables round-robin; returns per-call seconds.

  Each round calls every function (in a rotating order) enough times to last
  about ``min_time``; the result is the per-call median over rounds, so slow
  drifts of the machine hit all variants alike.
  """
  reps = {}
  for name, fn in fns.items():  # warm up and size the repetitions
    jax.block_until_ready(fn())
    t = time.perf_counter()
    jax.block_until_ready(fn())
    reps[name] = max(1, int(min_time / max(time.perf_counter() - t, 1e-6)))
  times = {name: [] for name in fns}
  names = list(fns)
  for r in range(rounds):
    for name in names[r % len(names) :] + names[: r % len(names)]:
      fn = fns[name]
      t = time.perf_counter()
      for _ in range(reps[name]):
        out = fn()
      jax.block_until_ready(out)
      times[name].append((time.perf_counter() - t) / reps[name])
  return {name: np.asarray(v) for name, v in times.items()}


def train_step(aggregator, grad_fn):
  """``grad_fn``, then ``aggregator`` in ``aggregating.process`` with SGD.

  Returns ``(tx, step)``; ``step(params, opt_state, batch)`` is not jitted.
  """
  tx = aggregating.process(
    optax.identity(), aggregator, optax.sgd(0.01, momentum=0.9)
  )

  def step(params, opt_state, batch):
    losses, grads = grad_fn(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, jnp.mean(losses)

  return tx, step


def write_result(out_dir, name, text):
  """Writes ``text`` to ``out_dir/name`` (the file the README quotes)."""
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, name)
  with open(path, "w") as f:
    f.write(text)
  print(f"wrote {path}")


def flops(jitted, *args) -> float:
  """XLA's count of the floating-point operations of ``jitted(*args)``."""
  cost = jitted.lower(*args).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return float(cost.get("flops", float("nan")))


def ghost_gram_flops(ghost) -> float:
  """FLOPs of a ``GhostMicrogradients``' Gram matrix on its routes."""
  return 2 * sum(ghost.gram_costs)


def gram_flops(grad_fn, *args) -> float:
  """FLOPs of the Gram matrix on the routes ``ghost_microgradients`` takes
  (``GhostMicrogradients.gram_costs``, multiply-adds, times two), read from
  one trace of ``grad_fn(*args)``."""
  seen = {}

  def trace(*args):
    ghost = grad_fn(*args)[1]
    seen["flops"] = ghost_gram_flops(ghost)
    return ghost.max_abs()

  jax.jit(trace).lower(*args)
  return seen["flops"]
