"""Bytes moved and step time of data-parallel gradient aggregation, 8 devices.

Compiles one aggregation step for a gradient of 16.8M float32 parameters on 8
simulated CPU devices (one microgradient per device unless ``--n-local``).
Replicated params (DDP):

* ``pmean``: plain averaging, ``lax.pmean`` in ``shard_map`` (the baseline);
* ``gaf all_to_all`` / ``gaf all_gather``: ``gaf(axis_name="data")`` in
  ``shard_map``;
* ``jit mean``: ``jnp.mean`` over a sharded microbatch axis under plain
  ``jax.jit``;
* ``jit gaf (unconstrained)``: single-device ``gaf()`` under plain ``jax.jit``
  over an Auto mesh, i.e. what XLA does on its own;
* ``jit gaf (constrained)``: ``gaf(axis_name="data")`` under ``jax.set_mesh``,
  which adds the sharding constraints of the all-to-all plan.

FSDP, params sharded as ``FSDP_SPECS`` (w1 along its first axis, w2 along
its second, the bias replicated: 8 divides none of its axes):

* ``fsdp reduce-scatter``: the mean reduce-scattered like the params
  (``lax.psum_scatter`` in ``shard_map``; ``pmean`` for the bias), the
  baseline;
* ``fsdp jit mean``: ``jnp.mean`` resharded like the params under plain
  ``jax.jit`` (XLA:CPU all-reduces, then slices);
* ``fsdp gaf shard_map (sharded_params)``: ``gaf(axis_name="data",
  sharded_params=True)``, each device gets its shard;
* ``fsdp gaf jit (params' shardings)``: ``gaf()`` under plain ``jax.jit`` on
  Explicit axes, updates sharded like the params;
* ``gaf all_to_all`` again, the replicated output, for reference;

and, per leaf case, gaf's bytes over the reduce-scatter (or all-reduce) of
that leaf alone.

Bytes per device come from the collectives in the compiled HLO with the ring
model: all-reduce ``2 (D-1)/D x size``; all-gather, all-to-all and
reduce-scatter ``(D-1)/D x`` their full (gathered) size; collective-permute
its size. Step times are medians over repetitions run interleaved in one
process (this machine is noisy: read the ratios).

Run from the repository root:
  python -m benchmarks.collectives            # writes benchmarks/results/
  python -m benchmarks.collectives --n-local 2 --reps 3 \
      --skip "gaf all_gather,jit gaf (unconstrained)" \
      --out benchmarks/results/collectives_n_local2.md
"""

import argparse
import contextlib
import math
import pathlib
import re
import shlex
import sys
import time
from typing import Any
from typing import NamedTuple

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import tqdm  # noqa: E402
from jax import lax  # noqa: E402
from jax.sharding import AxisType  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import optax_gaf  # noqa: E402

D = 8
# 16.8M float32 parameters; the bias is not a multiple of D (padding path).
SHAPES = {"w1": (4096, 2048), "w2": (2048, 4096), "b": (4097,)}
# FSDP: w1 split along its first axis, w2 along its second; the bias has no
# axis that 8 divides, so it stays replicated.
FSDP_SPECS = {"w1": P("data", None), "w2": P(None, "data"), "b": P()}
RESULTS = pathlib.Path(__file__).resolve().parent / "results"
COMMAND = ["python", "-m", "benchmarks.collectives"]  # written to the results

_DTYPE_BYTES = {
  "f64": 8,
  "f32": 4,
  "bf16": 2,
  "f16": 2,
  "s32": 4,
  "u32": 4,
  "s64": 8,
  "u64": 8,
  "s8": 1,
  "u8": 1,
  "pred": 1,
}
_OP = re.compile(
  r"= (.*?) (all-reduce|all-gather|all-to-all|reduce-scatter|"
  r"collective-permute)(-start)?\("
)
_SHAPE = re.compile(r"(\w+)\[([\d,]*)\]")


def _shapes(type_text):
  """``[(dtype, dims), ...]`` of an HLO result type, known dtypes only."""
  out = []
  for dtype, dims in _SHAPE.findall(type_text):
    if dtype in _DTYPE_BYTES:
      out.append((dtype, tuple(int(d) for d in dims.split(",") if d)))
  return out


def collective_ops(hlo_text, num_devices=D):
  """``[(kind, shapes, bytes sent per device), ...]`` under the ring model."""
  frac = (num_devices - 1) / num_devices
  out = []
  for line in hlo_text.splitlines():
    m = _OP.search(line)
    if not m:
      continue
    type_text, kind, start = m.groups()
    shapes = _shapes(type_text)
    if start and kind == "all-gather":
      shapes = shapes[-1:]  # (operand, result)
    size = sum(int(np.prod(s)) * _DTYPE_BYTES[t] for t, s in shapes)
    if kind == "all-reduce":
      moved = 2 * frac * size
    elif kind == "reduce-scatter":
      moved = frac * size * num_devices  # the result is 1/D of the full size
    elif kind == "collective-permute":
      moved = size
    else:
      moved = frac * size
    out.append((kind, [s for _, s in shapes], moved))
  return out


def ring_bytes(hlo_text, num_devices=D):
  """Bytes each device sends, by collective kind, under the ring model."""
  out = {}
  for kind, _, moved in collective_ops(hlo_text, num_devices):
    out[kind] = out.get(kind, 0.0) + moved
  return out


def make_grads(n, seed=0):
  rng = np.random.default_rng(seed)
  signal = {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
  return {
    k: (signal[k][None] + rng.normal(size=(n,) + s).astype(np.float32))
    for k, s in SHAPES.items()
  }


class Variant(NamedTuple):
  """A step to compile: ``fn(grads)``, or ``fn(grads, params)``."""

  mesh: Any
  fn: Any
  set_mesh: bool = False
  param_specs: dict | None = None  # the params' shardings, when it takes them


def _ddp_variants(n, mesh, auto_mesh):
  """Replicated params: pmean and gaf in shard_map, mean and gaf under jit."""

  def pmean_step(g):
    return jax.tree.map(lambda x: lax.pmean(jnp.mean(x, 0), "data"), g)

  out = {
    "pmean": Variant(
      mesh,
      jax.jit(
        jax.shard_map(pmean_step, mesh=mesh, in_specs=P("data"), out_specs=P())
      ),
    )
  }
  for collective in ("all_to_all", "all_gather"):
    agg = optax_gaf.gaf(
      2.0, axis_name="data", collective=collective, num_microbatches=n
    )
    state = agg.init(None)
    fn = jax.shard_map(
      lambda g, agg=agg, s=state: agg.update(g, s)[0],
      mesh=mesh,
      in_specs=P("data"),
      out_specs=P(),
    )
    out[f"gaf {collective}"] = Variant(mesh, jax.jit(fn))
  out["jit mean"] = Variant(
    auto_mesh, jax.jit(lambda g: jax.tree.map(lambda x: jnp.mean(x, 0), g))
  )
  plain = optax_gaf.gaf(2.0, num_microbatches=n)
  out["jit gaf (unconstrained)"] = Variant(
    auto_mesh, jax.jit(lambda g: plain.update(g, plain.init(None))[0])
  )
  named = optax_gaf.gaf(2.0, axis_name="data", num_microbatches=n)
  out["jit gaf (constrained)"] = Variant(
    auto_mesh,
    jax.jit(lambda g: named.update(g, named.init(None))[0]),
    set_mesh=True,
  )
  return out


def _sharded_axis(spec):
  return next((k for k, e in enumerate(spec) if e == "data"), None)


def reduce_scatter_step(specs):
  """FSDP's averaging: each leaf's mean reduce-scattered like its param
  (all-reduced where the param is replicated), in ``shard_map``."""

  def step(g):
    out = {}
    for k, x in g.items():
      axis = _sharded_axis(specs[k])
      m = jnp.mean(x, 0)
      out[k] = (
        lax.pmean(m, "data")
        if axis is None
        else lax.psum_scatter(m, "data", scatter_dimension=axis, tiled=True) / D
      )
    return out

  return step


def _fsdp_variants(n, mesh, specs):
  """Params sharded like ``specs``: the baseline, XLA's mean, gaf twice."""
  out = {
    "fsdp reduce-scatter": Variant(
      mesh,
      jax.jit(
        jax.shard_map(
          reduce_scatter_step(specs),
          mesh=mesh,
          in_specs=P("data"),
          out_specs=specs,
        )
      ),
    ),
    "fsdp jit mean": Variant(
      mesh,
      jax.jit(
        lambda g, p: jax.tree.map(
          lambda x, q: jax.sharding.reshard(
            jnp.mean(x, 0), jax.typeof(q).sharding
          ),
          g,
          p,
        )
      ),
      param_specs=specs,
    ),
  }
  sharded = optax_gaf.gaf(
    2.0, axis_name="data", num_microbatches=n, sharded_params=True
  )
  out["fsdp gaf shard_map (sharded_params)"] = Variant(
    mesh,
    jax.jit(
      jax.shard_map(
        lambda g, p: sharded.update(g, sharded.init(None), p)[0],
        mesh=mesh,
        in_specs=(P("data"), specs),
        out_specs=specs,
      )
    ),
    param_specs=specs,
  )
  plain = optax_gaf.gaf(2.0, num_microbatches=n)
  out["fsdp gaf jit (params' shardings)"] = Variant(
    mesh,
    jax.jit(lambda g, p: plain.update(g, plain.init(None), p)[0]),
    param_specs=specs,
  )
  return out


def variants(n_local):
  """name -> Variant."""
  n = D * n_local
  mesh = jax.make_mesh((D,), ("data",))
  auto_mesh = jax.make_mesh((D,), ("data",), axis_types=(AxisType.Auto,))
  return {
    **_ddp_variants(n, mesh, auto_mesh),
    **_fsdp_variants(n, mesh, FSDP_SPECS),
  }


def statistics_bytes(hlo_text, n, num_leaves, num_devices=D):
  """Bytes of the N x N statistics: Gram psums, the rescaled step's maxima."""
  total = 0.0
  for kind, shapes, moved in collective_ops(hlo_text, num_devices):
    gram = kind == "all-reduce" and all(s[-2:] == (n, n) for s in shapes)
    maxima = kind == "all-gather" and all(
      math.prod(s) == num_leaves * n for s in shapes
    )
    total += moved if gram or maxima else 0.0
  return total


def leaf_cases(n):
  """Per leaf case: gaf's gradient bytes (without the N x N statistics)
  over the reduce-scatter (or all-reduce) of its mean; compile only."""
  mesh = jax.make_mesh((D,), ("data",))
  sharded = optax_gaf.gaf(
    2.0, axis_name="data", num_microbatches=n, sharded_params=True
  )
  plain = optax_gaf.gaf(2.0, num_microbatches=n)
  rows = []
  for k, spec in FSDP_SPECS.items():
    specs = {k: spec}
    g = {
      k: jax.ShapeDtypeStruct(
        (n,) + SHAPES[k], jnp.float32, sharding=NamedSharding(mesh, P("data"))
      )
    }
    p = {
      k: jax.ShapeDtypeStruct(
        SHAPES[k], jnp.float32, sharding=NamedSharding(mesh, spec)
      )
    }
    fns = {
      "base": jax.shard_map(
        reduce_scatter_step(specs), mesh=mesh, in_specs=P("data"),
        out_specs=specs,
      ),
      "jit": lambda g, p: plain.update(g, plain.init(None), p)[0],
      "shard_map": jax.shard_map(
        lambda g, p: sharded.update(g, sharded.init(None), p)[0],
        mesh=mesh, in_specs=(P("data"), specs), out_specs=specs,
      ),
    }  # fmt: skip
    moved = {}
    for name, fn in fns.items():
      args = (g,) if name == "base" else (g, p)
      hlo = jax.jit(fn).lower(*args).compile().as_text()
      total = sum(m for _, _, m in collective_ops(hlo))
      moved[name] = total - statistics_bytes(hlo, n, 1)
    rows.append((k, spec, moved))
  return rows


def _compile_all(table, grads):
  """Compiles every variant on inputs shared by those on the same mesh."""
  compiled, inputs, moved = {}, {}, {}
  placed = {}
  for name, v in tqdm.tqdm(table.items(), desc="compile"):
    with jax.set_mesh(v.mesh) if v.set_mesh else contextlib.nullcontext():
      if id(v.mesh) not in placed:
        placed[id(v.mesh)] = jax.device_put(
          grads, NamedSharding(v.mesh, P("data"))
        )
      args = (placed[id(v.mesh)],)
      if v.param_specs is not None:
        args += (
          {
            k: jax.device_put(jnp.zeros(SHAPES[k]), NamedSharding(v.mesh, spec))
            for k, spec in v.param_specs.items()
          },
        )
      compiled[name] = v.fn.lower(*args).compile()
    inputs[name] = args
    moved[name] = ring_bytes(compiled[name].as_text())
  return compiled, inputs, moved


def _check_and_time(compiled, inputs, table, grads, reps):
  # Every variant averages here (tau = 2 accepts all): check they agree,
  # and that the FSDP ones come out sharded like the params.
  ref = jax.tree.map(lambda x: np.mean(x, 0), grads)
  for name, c in compiled.items():
    got = c(*inputs[name])
    for k in ref:
      np.testing.assert_allclose(
        got[k], ref[k], rtol=2e-4, atol=2e-5, err_msg=name
      )
      specs = table[name].param_specs
      if specs is not None:
        want = NamedSharding(table[name].mesh, specs[k])
        assert got[k].sharding.is_equivalent_to(want, got[k].ndim), name
  times = {name: [] for name in compiled}
  for _ in tqdm.tqdm(range(reps), desc="interleaved reps"):
    for name, c in compiled.items():
      t0 = time.perf_counter()
      jax.block_until_ready(c(*inputs[name]))
      times[name].append(time.perf_counter() - t0)
  return times


def _table(names, moved, times, base, label):
  base_bytes = sum(moved[base].values())
  base_time = np.median(times[base])
  lines = [
    f"| variant | MB sent per device (ring model) | by collective (MB) |"
    f" bytes / {label} | median step (s) | time / {label} |",
    "| --- | ---: | --- | ---: | ---: | ---: |",
  ]
  for name in names:
    total = sum(moved[name].values())
    kinds = ", ".join(
      f"{k} {v / 1e6:.1f}" for k, v in moved[name].items() if v >= 1e4
    )
    med = np.median(times[name])
    lines.append(
      f"| {name} | {total / 1e6:.1f} | {kinds} | {total / base_bytes:.3f} |"
      f" {med:.3f} | {med / base_time:.2f} |"
    )
  return lines


def _cases_table(rows):
  lines = [
    "| leaf | param sharding | baseline (MB) | gaf jit (MB) | gaf shard_map"
    " (MB) | jit / baseline | shard_map / baseline |",
    "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
  ]
  for k, spec, m in rows:
    base = "all-reduce" if _sharded_axis(spec) is None else "reduce-scatter"
    lines.append(
      f"| {k} {list(SHAPES[k])} | `{spec}` ({base}) | {m['base'] / 1e6:.3f} |"
      f" {m['jit'] / 1e6:.3f} | {m['shard_map'] / 1e6:.3f} |"
      f" {m['jit'] / m['base']:.4f} | {m['shard_map'] / m['base']:.4f} |"
    )
  return lines


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--reps", type=int, default=5)
  parser.add_argument("--n-local", type=int, default=1)
  parser.add_argument("--out", default=str(RESULTS / "collectives.md"))
  parser.add_argument(
    "--skip",
    default="",
    help="comma-separated variants to leave out (the all_gather ones need"
    " D x N x P floats of host memory)",
  )
  args = parser.parse_args()

  n = D * args.n_local
  grads = make_grads(n)
  num_params = sum(int(np.prod(s)) for s in SHAPES.values())
  table = variants(args.n_local)
  for name in filter(None, args.skip.split(",")):
    del table[name.strip()]
  compiled, inputs, moved = _compile_all(table, grads)
  times = _check_and_time(compiled, inputs, table, grads, args.reps)

  ddp = [k for k in compiled if not k.startswith("fsdp")]
  fsdp = [k for k in compiled if k.startswith("fsdp")]
  lines = [
    f"D = {D} simulated CPU devices, {num_params / 1e6:.1f}M float32"
    f" parameters, n_local = {args.n_local} (N = {n}), {args.reps}"
    " interleaved repetitions, jax " + jax.__version__ + ".",
    f"`{shlex.join(COMMAND + sys.argv[1:])}`",
    "",
    "Replicated params (DDP):",
    "",
    *_table(ddp, moved, times, "pmean", "pmean"),
  ]
  if "fsdp reduce-scatter" in fsdp:
    if "gaf all_to_all" in compiled:
      fsdp.append("gaf all_to_all")  # the replicated output, for reference
    specs = ", ".join(f"{k} `{s}`" for k, s in FSDP_SPECS.items())
    lines += [
      "",
      f"FSDP, params sharded over the 8 devices ({specs}):",
      "",
      *_table(fsdp, moved, times, "fsdp reduce-scatter", "reduce-scatter"),
      "",
      "Per leaf case (compile only; gaf's bytes without the N x N"
      " statistics, i.e. the Gram psum and the rescaled step's maxima):",
      "",
      *_cases_table(leaf_cases(n)),
    ]
  text = "\n".join(lines) + "\n"
  print(text)
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(text)
  print(f"wrote {out}")
  _plot(ddp, moved, times, "pmean", out.with_suffix(".png"))
  if "fsdp reduce-scatter" in fsdp:
    fsdp_png = out.with_name(out.stem + "_fsdp.png")
    _plot(fsdp, moved, times, "fsdp reduce-scatter", fsdp_png)


def _plot(names, moved, times, base, path):
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  base_bytes = sum(moved[base].values())
  base_time = np.median(times[base])
  byte_ratio = [sum(moved[k].values()) / base_bytes for k in names]
  time_ratio = [np.median(times[k]) / base_time for k in names]
  fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
  for ax, vals, title in (
    (axes[0], byte_ratio, f"bytes sent / {base}"),
    (axes[1], time_ratio, f"step time / {base}"),
  ):
    ax.barh(names, vals, color="tab:blue")
    ax.axvline(1.0, color="k", lw=0.8, ls="--")
    ax.set_title(title)
    for i, v in enumerate(vals):
      ax.text(v, i, f" {v:.2f}", va="center")
  axes[0].invert_yaxis()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
