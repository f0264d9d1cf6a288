"""What GAF costs against not using GAF: every route against the plain step.

The baseline is the step a user runs without GAF: ``jax.grad`` of the mean
loss over the batch, then the optimizer (SGD). Each GAF route runs the same
model, batch and optimizer inside ``optax_gaf.process`` (the true skip):

* ``materialized``: ``microbatch_grads`` (``vmap``, N x P microgradients),
  then ``gaf`` as shipped (its O(NP) block route above 16 microbatches);
* ``streaming``: ``streaming_filtered_grads`` (one microgradient at a time) and
  ``record_filtered``;
* ``ghost``: ``ghost_microgradients`` (layer inputs and output gradients, no
  N x P arrays) and ``gaf``.

Models (plain JAX functions of a params pytree): MLPs 64-256-256-10 and
64-1024-1024-10 on B=64 vectors; a CNN (two 3x3 convs, 8x8x1 inputs,
B=64); the 32x32x3 CNN of ``_common``; a one-block transformer LM (d=64, 4
heads, MLP 256, LayerNorm, vocabulary 128) on B=32 sequences of 16 tokens.
N runs from 2 to one example per microbatch.

Variants are timed interleaved in one process (``_common.interleaved``), as
medians; the table gives each route's time divided by the plain step's, and
the peak temporary memory of each compiled step (XLA's memory analysis)
divided by the plain step's. For ghost it also splits the step into its
parts (capture, Gram matrix, rule, combine) measured the same way, so a
ratio above target says which part costs what.

Run from the repository root::

  python -m benchmarks.vs_plain_step            # the docs' table
  python -m benchmarks.vs_plain_step --quick    # a smoke run

It writes ``benchmarks/results/vs_plain_step.md`` (and ``.json``, and the
plot ``.png``; ``--plot-only`` redraws it from the JSON).
"""

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

import optax_gaf
from benchmarks import _common
from optax_gaf import _gram
from optax_gaf import rules

TAU = 0.97
RESULTS = os.path.join(os.path.dirname(__file__), "results")


def _dense(key, fan_in, fan_out):
  w = jax.random.normal(key, (fan_in, fan_out)) / fan_in**0.5
  return {"w": w, "b": jnp.zeros(fan_out)}


def mlp(key, sizes=(64, 256, 256, 10)):
  keys = jax.random.split(key, len(sizes))
  params = [_dense(k, a, b) for k, a, b in zip(keys, sizes[:-1], sizes[1:])]

  def apply(p, x):
    for layer in p[:-1]:
      x = jax.nn.relu(x @ layer["w"] + layer["b"])
    return x @ p[-1]["w"] + p[-1]["b"]

  return params, apply


def _conv(x, layer):
  y = jax.lax.conv_general_dilated(
    x, layer["w"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
  )
  return jax.nn.relu(y + layer["b"])


def small_cnn(key):
  """conv3x3(16) - conv3x3(16) - dense on 8x8x1 (digits-sized) inputs."""
  k1, k2, k3 = jax.random.split(key, 3)
  params = {
    "c1": {"w": jax.random.normal(k1, (3, 3, 1, 16)) / 3, "b": jnp.zeros(16)},
    "c2": {"w": jax.random.normal(k2, (3, 3, 16, 16)) / 12, "b": jnp.zeros(16)},
    "out": _dense(k3, 8 * 8 * 16, 10),
  }

  def apply(p, x):
    x = _conv(_conv(x, p["c1"]), p["c2"])
    return x.reshape(x.shape[0], -1) @ p["out"]["w"] + p["out"]["b"]

  return params, apply


def _layer_norm(x, p):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) * jax.lax.rsqrt(var + 1e-6) * p["scale"] + p["bias"]


def transformer(key, vocab=128, d=64, heads=4, hidden=256, length=16):
  """A one-block pre-LayerNorm transformer LM with a causal mask."""
  k = jax.random.split(key, 8)
  ln = lambda: {"scale": jnp.ones(d), "bias": jnp.zeros(d)}
  params = {
    "embed": jax.random.normal(k[0], (vocab, d)) * 0.02,
    "pos": jax.random.normal(k[1], (length, d)) * 0.02,
    "ln1": ln(),
    "qkv": _dense(k[2], d, 3 * d),
    "proj": _dense(k[3], d, d),
    "ln2": ln(),
    "up": _dense(k[4], d, hidden),
    "down": _dense(k[5], hidden, d),
    "ln3": ln(),
    "head": _dense(k[6], d, vocab),
  }

  def attention(x, p):
    b, t, _ = x.shape
    q, kk, v = jnp.split(x @ p["qkv"]["w"] + p["qkv"]["b"], 3, axis=-1)
    split = lambda a: a.reshape(b, t, heads, d // heads)
    logits = jnp.einsum("bthd,bshd->bhts", split(q), split(kk))
    mask = jnp.tril(jnp.ones((t, t), bool))
    logits = jnp.where(mask, logits / (d // heads) ** 0.5, -1e9)
    out = jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(logits), split(v))
    return out.reshape(b, t, d) @ p["proj"]["w"] + p["proj"]["b"]

  def apply(p, ids):
    x = jnp.take(p["embed"], ids, axis=0) + p["pos"][: ids.shape[1]]
    x = x + attention(_layer_norm(x, p["ln1"]), p)
    h = jax.nn.gelu(_layer_norm(x, p["ln2"]) @ p["up"]["w"] + p["up"]["b"])
    x = x + h @ p["down"]["w"] + p["down"]["b"]
    return _layer_norm(x, p["ln3"]) @ p["head"]["w"] + p["head"]["b"]

  return params, apply


def xent_of(apply):
  def loss(p, b):
    logits = apply(p, b["x"])
    return optax.softmax_cross_entropy_with_integer_labels(
      logits, b["y"]
    ).mean()

  return loss


def model_and_batch(name, key):
  """``(params, loss_fn, batch)`` of one benchmark model."""
  kp, kx, ky = jax.random.split(key, 3)
  if name == "transformer LM":
    params, apply = transformer(kp)
    ids = jax.random.randint(kx, (32, 17), 0, 128)
    return params, xent_of(apply), {"x": ids[:, :-1], "y": ids[:, 1:]}
  if name.startswith("MLP"):
    sizes = tuple(int(w) for w in name.split()[1].split("-"))
    params, apply = mlp(kp, sizes)
    x = jax.random.normal(kx, (64, 64))
  elif name == "CNN 8x8x1":
    params, apply = small_cnn(kp)
    x = jax.random.normal(kx, (64, 8, 8, 1))
  else:  # "CNN 32x32x3"
    params, apply = _common.cnn_init(kp), _common.cnn_apply
    x = jax.random.normal(kx, (64, 32, 32, 3))
  return (
    params,
    xent_of(apply),
    {"x": x, "y": jax.random.randint(ky, (64,), 0, 10)},
  )


MODELS = {
  "MLP 64-256-256-10": (2, 8, 16, 64),
  "MLP 64-1024-1024-10": (8, 64),
  "CNN 8x8x1": (2, 8, 16, 64),
  "CNN 32x32x3": (2, 8, 16, 64),
  "transformer LM": (2, 8, 32),
}
ROUTES = ("materialized", "streaming", "ghost")


def _grad_and_aggregator(route, loss, n):
  if route == "materialized":
    return optax_gaf.microbatch_grads(loss, n), optax_gaf.gaf(TAU)
  if route == "streaming":
    return optax_gaf.streaming_filtered_grads(
      loss, n, TAU
    ), optax_gaf.record_filtered()
  return optax_gaf.ghost_microgradients(loss, n), optax_gaf.gaf(TAU)


def steps(loss, n, opt):
  """The plain step and one step per route, each ``(init, step)``."""

  def plain(p, s, b):
    u, s = opt.update(jax.grad(loss)(p, b), s, p)
    return optax.apply_updates(p, u), s

  out = {"plain": (opt.init, plain)}
  for route in ROUTES:
    grad_fn, agg = _grad_and_aggregator(route, loss, n)
    tx = optax_gaf.process(optax.identity(), agg, opt)

    def step(p, s, b, grad_fn=grad_fn, tx=tx):
      _, g = grad_fn(p, b)
      u, s = tx.update(g, s, p)
      return optax.apply_updates(p, u), s

    out[route] = (tx.init, step)
  return out


def ghost_parts(loss, n):
  """Cumulative prefixes of the ghost step: capture, + Gram, + rule, + combine.

  Each returns something that depends on all it computed, so XLA keeps it.
  """
  grad_fn = optax_gaf.ghost_microgradients(loss, n)

  def capture(p, b):
    return grad_fn(p, b)[1].max_abs()

  def gram(p, b):
    ghost = grad_fn(p, b)[1]
    return _gram.safe_gram(ghost)

  def rule(p, b):
    g, ok, _ = gram(p, b)
    return rules.sequential(g, ok, TAU)

  def combine(p, b):
    ghost = grad_fn(p, b)[1]
    g, ok, _ = _gram.safe_gram(ghost)
    return ghost.combine(rules.sequential(g, ok, TAU).weights, ok)

  return {"capture": capture, "gram": gram, "rule": rule, "combine": combine}


def peak_bytes(fn, *args) -> int:
  """Temporary memory of the compiled ``fn`` (XLA's memory analysis)."""
  stats = jax.jit(fn).lower(*args).compile().memory_analysis()
  return int(stats.temp_size_in_bytes)


def measure(name, n, rounds, key):
  """Time and memory ratios of every route (and ghost's parts) to plain."""
  params, loss, batch = model_and_batch(name, key)
  opt = optax.sgd(0.01)
  fns, memory = {}, {}
  for route, (init, step) in steps(loss, n, opt).items():
    state = init(params)
    jitted = jax.jit(step)
    fns[route] = lambda f=jitted, s=state: f(params, s, batch)
    memory[route] = peak_bytes(step, params, state, batch)
    if route == "plain":
      plain_flops = _common.flops(jitted, params, state, batch)
  for part, fn in ghost_parts(loss, n).items():
    jitted = jax.jit(fn)
    fns[f"ghost:{part}"] = lambda f=jitted: f(params, batch)
  t = {k: float(np.median(v)) for k, v in
       _common.interleaved(fns, rounds).items()}  # fmt: skip
  base = t["plain"]
  parts = ["capture", "gram", "rule", "combine"]
  cumulative = [t[f"ghost:{p}"] for p in parts]
  return {
    "model": name,
    "n": n,
    "plain_ms": base * 1e3,
    "time": {r: t[r] / base for r in ROUTES},
    "floor": 1
    + _common.gram_flops(optax_gaf.ghost_microgradients(loss, n), params, batch)
    / plain_flops,
    "temp_mib": {r: memory[r] / 2**20 for r in ("plain", *ROUTES)},
    "ghost_parts": {
      p: (c - (cumulative[i - 1] if i else 0.0)) / base
      for i, (p, c) in enumerate(zip(parts, cumulative))
    },
  }


def _floor_text(r) -> str:
  return f"{r['floor']:.2f}x" if "floor" in r else "-"  # older rows: none


def table(rows) -> str:
  head = (
    "| model | N | plain step (ms) | materialized | streaming | ghost |"
    " floor | temp MiB: plain / materialized / ghost |"
    " ghost parts: capture / Gram / rule / combine |\n"
    "|---|---|---|---|---|---|---|---|---|\n"
  )
  lines = []
  for r in rows:
    t, m, g = r["time"], r["temp_mib"], r["ghost_parts"]
    lines.append(
      f"| {r['model']} | {r['n']} | {r['plain_ms']:.2f} |"
      f" {t['materialized']:.2f}x | {t['streaming']:.2f}x |"
      f" **{t['ghost']:.2f}x** | {_floor_text(r)} |"
      f" {m['plain']:.2f} / {m['materialized']:.2f} / {m['ghost']:.2f} |"
      f" {g['capture']:.2f} / {g['gram']:.2f} / {g['rule']:.2f} /"
      f" {g['combine']:.2f} |"
    )
  return head + "\n".join(lines) + "\n"


def plot(rows, path) -> None:
  """One panel per model: each route's time over the plain step's, by N."""
  from matplotlib.figure import Figure
  from matplotlib.ticker import NullLocator

  models = list(dict.fromkeys(r["model"] for r in rows))
  fig = Figure(figsize=(3.2 * len(models), 3.2), layout="constrained")
  axes = fig.subplots(1, len(models), sharey=True, squeeze=False)[0]
  for ax, model in zip(axes, models):
    mine = [r for r in rows if r["model"] == model]
    ns = [r["n"] for r in mine]
    for route, style in zip(ROUTES, ("s--", "^:", "o-")):
      ax.plot(ns, [r["time"][route] for r in mine], style, label=route)
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set(yscale="log", title=model, xlabel="N (microbatches)")
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.xaxis.set_minor_locator(NullLocator())
  axes[0].set_ylabel("time / plain step")
  axes[0].legend()
  fig.savefig(path, dpi=120)
  print(f"wrote {path}")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="a smoke run")
  parser.add_argument("--rounds", type=int, default=15)
  parser.add_argument("--out", default=RESULTS)
  parser.add_argument(
    "--plot-only", action="store_true", help="redraw the plot from the JSON"
  )
  args = parser.parse_args(argv)
  if args.plot_only:
    with open(os.path.join(args.out, "vs_plain_step.json")) as f:
      rows = json.load(f)
    return plot(rows, os.path.join(args.out, "vs_plain_step.png"))
  configs = [(m, n) for m, ns in MODELS.items() for n in ns]
  if args.quick:
    configs, args.rounds = [("MLP 64-256-256-10", 8)], 3
  load_before, start = os.getloadavg()[0], time.time()
  rows = [
    measure(m, n, args.rounds, jax.random.key(0))
    for m, n in tqdm(configs, desc="models x N")
  ]
  text = (
    "# GAF against the plain train step\n\n"
    "Time per step of each route divided by the plain step's (`jax.grad` of"
    " the mean loss, then SGD), medians of interleaved rounds. Floor: the"
    " plain step plus the Gram matrix on the routes the ghost step takes,"
    " in FLOPs over the plain step's (XLA's cost analysis of the plain"
    " step, `GhostMicrogradients.gram_costs`). Temp MiB: the"
    " compiled step's temporary memory (XLA's memory analysis). Ghost"
    " parts: the increments of capture (forward and backward, no weight"
    " gradients), Gram matrix (with the float-range check), rule"
    " (sequential) and combine, as fractions of the plain step.\n\n"
    + table(rows)
    + f"\nReproduce: `python -m benchmarks.vs_plain_step"
    f"{' --quick' if args.quick else ''}`. Machine:"
    f" {os.cpu_count()} CPU cores, jax {jax.__version__}; load average"
    f" (1 min) {load_before:.1f} before, {os.getloadavg()[0]:.1f} after;"
    f" {time.time() - start:.0f} s.\n"
  )
  name = "vs_plain_step_quick" if args.quick else "vs_plain_step"
  _common.write_result(args.out, f"{name}.md", text)
  _common.write_result(args.out, f"{name}.json", json.dumps(rows, indent=1))
  plot(rows, os.path.join(args.out, f"{name}.png"))
  print(text)


if __name__ == "__main__":
  main()
