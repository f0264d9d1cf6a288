"""Per-example GAF on models nobody here wrote, against a plain step.

Six models from Flax's, Haiku's and Equinox's own examples
(``benchmarks/outside/``: each file names the source file and commit it
follows), each with the loss and optimizer its authors train it with:

* Flax's imagenet ResNet (Linen, BatchNorm, an L2 term in the loss);
* Flax's lm1b transformer LM (Linen, dropout);
* Flax NNX's scan-over-layers MLP (BatchNorm and dropout inside
  ``nnx.scan``);
* Haiku's ``hk.nets.MobileNetV1`` (depthwise convolutions, BatchNorm, the
  imagenet example's L2 term);
* Haiku's transformer LM (dropout);
* Equinox's vision transformer (one dropout key per image).

Routes, each with the authors' optimizer, at N = 8 and N = 32 (one example
per microbatch) on batches of 32:

* ``plain``: the authors' step, ``jax.grad`` of the mean loss, then the
  optimizer;
* ``microbatch_grads``: N microgradients by ``vmap``
  (``optax_gaf.flax.linen_microgradients`` for Linen and Haiku, which take
  the same ``(params, state, batch, rng)`` loss, ``nnx_microgradients`` for
  NNX, ``microbatch_grads`` for Equinox), then ``gaf`` in ``process``;
* ``ghost``: the same helpers with ``ghost=True``
  (``ghost_microgradients`` for Equinox), then ``gaf``.

Times are medians of interleaved rounds in one process, as ratios to the
plain step. For the ghost route the table gives how its leaves are formed
(``ghost.routes``; ``materialize*``: an Opaque layer, per-example
``jax.vjp``) and the share of the parameters that go ``direct``. In float64
one step of each GAF route from the same state checks that the decisions
(``accepted``) are equal, with the largest difference of the cosine
distances and of the updated parameters.

Run from the repository root::

  python -m benchmarks.outside_models            # the docs' table
  python -m benchmarks.outside_models --quick    # a smoke run
  python -m benchmarks.outside_models --resume   # go on from the JSON

It writes ``benchmarks/results/outside_models.md`` (and ``.json``, and the
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
from flax import nnx
from tqdm import tqdm

import optax_gaf
import optax_gaf.flax
from benchmarks import _common
from benchmarks.outside import eqx_vit
from benchmarks.outside import flax_lm1b
from benchmarks.outside import flax_resnet
from benchmarks.outside import haiku_mobilenet
from benchmarks.outside import haiku_transformer
from benchmarks.outside import nnx_scan

TAU = 0.97
BATCH = 32
NS = (8, 32)
RESULTS = os.path.join(os.path.dirname(__file__), "results")
MODULES = (
  flax_resnet, flax_lm1b, nnx_scan, haiku_mobilenet, haiku_transformer,
  eqx_vit,
)  # fmt: skip
ROUTES = ("microbatch_grads", "ghost")
# The issue's targets: at most this times the plain step.
TARGETS = {
  "Flax imagenet ResNet": 1.5,
  "Haiku MobileNetV1": 1.5,
  "NNX scan-over-layers MLP": 1.25,
  "Flax lm1b transformer": 1.25,
  "Haiku transformer LM": 1.25,
  "Equinox ViT": 1.25,
}


def _grad_fn(case, route, n):
  """The route's gradient function, in the case's calling convention."""
  ghost = route == "ghost"
  if case.kind == "stateful":
    return optax_gaf.flax.linen_microgradients(case.loss, n, ghost=ghost)
  if case.kind == "nnx":
    return optax_gaf.flax.nnx_microgradients(case.loss, n, ghost=ghost)
  if ghost:
    return optax_gaf.ghost_microgradients(case.loss, n)
  return optax_gaf.microbatch_grads(case.loss, n)


def make_step(case, route, n, seen=None, num_microbatches=None):
  """``(carry, step, unpack)``: ``step(carry, batch, rng) -> carry``, not
  jitted; ``unpack(carry) -> (params, opt_state)``.

  ``seen`` (a dict) receives the ghost output's routes and leaf paths when
  the step is traced.
  """
  opt = case.optimizer()
  if route != "plain":
    agg = optax_gaf.gaf(TAU, num_microbatches=num_microbatches)
    opt = optax_gaf.process(optax.identity(), agg, opt)
    grad_fn = _grad_fn(case, route, n)

  def grads_of(*args):
    out = grad_fn(*args)
    g = out[1]
    if seen is not None and isinstance(g, optax_gaf.GhostMicrogradients):
      seen["leaves"] = _leaf_routes(g)
      seen["gram_flops"] = _common.ghost_gram_flops(g)
    return out

  if case.kind == "nnx":
    return _nnx_step(case, route, opt, grads_of)
  return _functional_step(case, route, opt, grads_of)


def _functional_step(case, route, opt, grads_of):
  params, model_state, _ = case.init(jax.random.key(0), BATCH)
  carry = (params, model_state, opt.init(params))

  def step(carry, batch, rng):
    params, model_state, opt_state = carry
    if case.kind == "stateful":
      if route == "plain":
        grad = jax.grad(case.loss, has_aux=True)
        grads, model_state = grad(params, model_state, batch, rng)
      else:
        _, grads, model_state = grads_of(params, model_state, batch, rng)
    elif route == "plain":
      grads = jax.grad(case.loss)(params, batch)
    else:
      grads = grads_of(params, batch)[1]
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), model_state, opt_state

  return carry, step, lambda c: (c[0], c[2])


def _nnx_step(case, route, opt, grads_of):
  model, _, _ = case.init(jax.random.key(0), BATCH)
  optimizer = nnx.Optimizer(model, opt, wrt=nnx.Param)
  graphdef, state = nnx.split((model, optimizer))

  def step(state, batch, rng):
    del rng  # the model's own streams
    model, optimizer = nnx.merge(graphdef, state)
    if route == "plain":
      grads = nnx.grad(case.loss)(model, batch)
    else:
      grads = grads_of(model, batch)[1]
    optimizer.update(model, grads)
    return nnx.state((model, optimizer))

  def unpack(state):
    model, optimizer = nnx.merge(graphdef, state)
    return nnx.state(model, nnx.Param), optimizer.opt_state

  return state, step, unpack


def _leaf_routes(ghost):
  """``[path, size, route]`` per leaf (``materialize*``: an Opaque layer)."""
  paths = jax.tree_util.tree_flatten_with_path(ghost.tree())[0]
  out = []
  for (path, _), kind, route, aval in zip(
    paths, ghost.kinds, ghost.routes, ghost.virtual_leaves
  ):
    route = "materialize*" if kind == "Opaque" else route
    name = jax.tree_util.keystr(path).removesuffix(".value")
    out.append([name, int(np.prod(aval.shape[1:])), route])
  return out


def _batch(case):
  return case.init(jax.random.key(1), BATCH)[2]


def time_routes(module, n, rounds):
  """Time ratios of each GAF route to the plain step, and ghost's leaves."""
  case, seen = module.case(), {}
  batch, rng = _batch(case), jax.random.key(2)
  fns, flops = {}, {}
  for route in ("plain", *ROUTES):
    carry, step, _ = make_step(case, route, n, seen)
    jitted = jax.jit(step)
    fns[route] = lambda f=jitted, c=carry: f(c, batch, rng)
    flops[route] = _common.flops(jitted, carry, batch, rng)
  t = {k: float(np.median(v)) for k, v in
       _common.interleaved(fns, rounds).items()}  # fmt: skip
  floor = 1 + seen["gram_flops"] / flops["plain"]
  flops = {r: flops[r] / flops["plain"] for r in ROUTES} | {"floor": floor}
  return case, t, seen["leaves"], flops


def _gaf_stats(opt_state):
  s = optax_gaf.stats(opt_state)
  return s["accepted"], s["cosine_distance"]


def decisions(module, n):
  """float64: one step of each GAF route from the same state, compared."""
  with jax.enable_x64(True):
    case = module.case(jnp.float64)
    batch, rng = _batch(case), jax.random.key(2)
    params, opts = [], []
    for route in ROUTES:
      carry, step, unpack = make_step(case, route, n, num_microbatches=n)
      p, o = unpack(jax.jit(step)(carry, batch, rng))
      params.append(p)
      opts.append(o)
    (acc_a, cos_a), (acc_b, cos_b) = map(_gaf_stats, opts)
    diff = max(
      float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-300))
      for a, b in zip(jax.tree.leaves(params[0]), jax.tree.leaves(params[1]))
    )
    return {
      "equal": bool(jnp.all(acc_a == acc_b)),
      "accepted": int(jnp.sum(acc_b)),
      "max_cos_diff": float(jnp.nanmax(jnp.abs(cos_a - cos_b))),
      "max_param_rel_diff": diff,
    }


def measure(module, n, rounds):
  case, t, leaves, flops = time_routes(module, n, rounds)
  counts = {}
  for _, _, route in leaves:
    counts[route] = counts.get(route, 0) + 1
  total = sum(size for _, size, _ in leaves)
  direct = sum(size for _, size, r in leaves if r == "direct")
  return {
    "model": case.name,
    "source": case.source,
    "n": n,
    "plain_ms": t["plain"] * 1e3,
    "time": {r: t[r] / t["plain"] for r in ROUTES},
    "flops": flops,
    "target": TARGETS[case.name],
    "routes": counts,
    "direct_share": direct / total,
    "leaves": leaves,
    "decisions": decisions(module, n),
  }


def _routes_text(r):
  order = ("ghost", "materialize", "materialize*", "direct", "unused")
  counts = r["routes"]
  text = ", ".join(f"{k} {counts[k]}" for k in order if k in counts)
  return f"{text}; {100 * r['direct_share']:.0f}% of params direct"


def _flops_text(r):
  f = r.get("flops")  # rows from before the column: none
  if not f:
    return "- | -"
  return f"{f['floor']:.2f}x | {f['microbatch_grads']:.2f}x / {f['ghost']:.2f}x"


def table(rows) -> str:
  head = (
    "| model | N | plain step (ms) | microbatch_grads | ghost | target |"
    " floor | XLA FLOPs: microbatch_grads / ghost | ghost leaves | float64"
    " decisions equal (max cos diff as recorded, max param rel diff,"
    " accepted) |\n|---|---|---|---|---|---|---|---|---|---|\n"
  )
  lines = []
  for r in rows:
    t, d = r["time"], r["decisions"]
    met = t["ghost"] <= r["target"] and t["ghost"] <= t["microbatch_grads"]
    lines.append(
      f"| {r['model']} | {r['n']} | {r['plain_ms']:.1f} |"
      f" {t['microbatch_grads']:.2f}x | **{t['ghost']:.2f}x** |"
      f" {r['target']}x {'met' if met else 'missed'} | {_flops_text(r)} |"
      f" {_routes_text(r)} |"
      f" {'yes' if d['equal'] else 'NO'} ({d['max_cos_diff']:.1e},"
      f" {d['max_param_rel_diff']:.1e}, {d['accepted']}/{r['n']}) |"
    )
  return head + "\n".join(lines) + "\n"


def plot(rows, path) -> None:
  """Per N, each model's two GAF routes over the plain step."""
  from matplotlib.figure import Figure

  ns = sorted({r["n"] for r in rows})
  fig = Figure(figsize=(5.0 * len(ns), 3.6), layout="constrained")
  axes = fig.subplots(1, len(ns), sharey=True, squeeze=False)[0]
  for ax, n in zip(axes, ns):
    mine = [r for r in rows if r["n"] == n]
    x = np.arange(len(mine))
    for k, (route, color) in enumerate(zip(ROUTES, ("tab:gray", "tab:blue"))):
      ratios = [r["time"][route] for r in mine]
      ax.bar(x + (k - 0.5) * 0.38, ratios, 0.38, label=route, color=color)
    ax.scatter(x, [r["target"] for r in mine], marker="_", s=400,
               color="tab:red", label="target", zorder=3)  # fmt: skip
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xticks(x, [r["model"] for r in mine], rotation=30, ha="right")
    ax.set(yscale="log", title=f"N = {n} (batch {BATCH})")
  axes[0].set_ylabel("time / plain step")
  axes[0].legend()
  fig.savefig(path, dpi=120)
  print(f"wrote {path}")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="a smoke run")
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument(
    "--resume", action="store_true", help="keep the rows the JSON has"
  )
  parser.add_argument("--out", default=RESULTS)
  parser.add_argument(
    "--plot-only", action="store_true", help="redraw the plot from the JSON"
  )
  args = parser.parse_args(argv)
  name = "outside_models_quick" if args.quick else "outside_models"
  if args.plot_only:
    with open(os.path.join(args.out, f"{name}.json")) as f:
      return plot(json.load(f), os.path.join(args.out, f"{name}.png"))
  configs = [(m, n) for m in MODULES for n in NS]
  if args.quick:
    configs, args.rounds = [(nnx_scan, 8)], min(args.rounds, 2)
  load_before, start = os.getloadavg()[0], time.time()
  path = os.path.join(args.out, f"{name}.json")
  rows = []
  if args.resume and os.path.exists(path):
    with open(path) as f:
      rows = json.load(f)
  done = {(r["model"], r["n"]) for r in rows}
  for m, n in tqdm(configs, desc="models x N"):
    if (m.case().name, n) not in done:
      rows.append(measure(m, n, args.rounds))
      _common.write_result(args.out, f"{name}.json", json.dumps(rows, indent=1))
  order = [(m.case().name, n) for m, n in configs]
  rows.sort(key=lambda r: order.index((r["model"], r["n"])))
  sources = sorted({(r["model"], r["source"]) for r in rows})
  text = (
    "# Per-example GAF on outside models\n\n"
    "Time per step of each GAF route divided by the plain step's (the"
    " authors' `jax.grad` step and optimizer), medians of interleaved"
    f" rounds, batches of {BATCH}. Target: the issue's bound for the ghost"
    " route (and never slower than `microbatch_grads`). Floor: the plain"
    " step plus the Gram matrix, in FLOPs over the plain step's (XLA's cost"
    " analysis of the plain step; each leaf's Gram matrix on the route"
    " `ghost_microgradients` takes, `GhostMicrogradients.gram_costs`). XLA"
    " FLOPs: each compiled GAF step's over the plain step's, load-free but"
    " counting the costlier branch of each rare-step conditional (the"
    " rescaled Gram matrix, the exact rows). Ghost leaves: how"
    " `ghost_microgradients` forms each leaf (`materialize*`: an Opaque"
    " layer, per-example `jax.vjp`). Decisions: one float64 step of each"
    " route from the same state: the accepted microbatches, the largest"
    " difference of the cosine distances `gaf` records (in float32) and of"
    " the updated parameters (relative, float64).\n\n"
    + table(rows)
    + "\nSources:\n\n"
    + "".join(f"- {m}: {s}\n" for m, s in sources)
    + f"\nReproduce: `python -m benchmarks.outside_models"
    f"{' --quick' if args.quick else ''}`. Machine:"
    f" {os.cpu_count()} CPU cores, jax {jax.__version__}; load average"
    f" (1 min) {load_before:.1f} before, {os.getloadavg()[0]:.1f} after;"
    f" {time.time() - start:.0f} s.\n"
  )
  _common.write_result(args.out, f"{name}.md", text)
  _common.write_result(args.out, f"{name}.json", json.dumps(rows, indent=1))
  plot(rows, os.path.join(args.out, f"{name}.png"))
  print(text)


if __name__ == "__main__":
  main()
