"""Bytes moved and step time of data-parallel gradient aggregation, 8 devices.

Compiles one aggregation step for a gradient of 16.8M float32 parameters on 8
simulated CPU devices (one microgradient per device unless ``--n-local``):

* ``pmean``: plain averaging, ``lax.pmean`` in ``shard_map`` (the baseline);
* ``gaf all_to_all`` / ``gaf all_gather``: ``gaf(axis_name="data")`` in
  ``shard_map``;
* ``jit mean``: ``jnp.mean`` over a sharded microbatch axis under plain
  ``jax.jit``;
* ``jit gaf (unconstrained)``: single-device ``gaf()`` under plain ``jax.jit``
  over an Auto mesh, i.e. what XLA does on its own;
* ``jit gaf (constrained)``: ``gaf(axis_name="data")`` under ``jax.set_mesh``,
  which adds the sharding constraints of the all-to-all plan.

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
import pathlib
import re
import sys
import time

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
RESULTS = pathlib.Path(__file__).resolve().parent / "results"

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


def variants(n_local):
  """name -> (jitted fn, args builder)."""
  n = D * n_local
  mesh = jax.make_mesh((D,), ("data",))
  auto_mesh = jax.make_mesh((D,), ("data",), axis_types=(AxisType.Auto,))
  out = {}

  def pmean_step(g):
    return jax.tree.map(lambda x: lax.pmean(jnp.mean(x, 0), "data"), g)

  out["pmean"] = (
    mesh,
    jax.jit(
      jax.shard_map(pmean_step, mesh=mesh, in_specs=P("data"), out_specs=P())
    ),
    False,
  )
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
    out[f"gaf {collective}"] = (mesh, jax.jit(fn), False)
  out["jit mean"] = (
    auto_mesh,
    jax.jit(lambda g: jax.tree.map(lambda x: jnp.mean(x, 0), g)),
    False,
  )
  plain = optax_gaf.gaf(2.0, num_microbatches=n)
  out["jit gaf (unconstrained)"] = (
    auto_mesh,
    jax.jit(lambda g: plain.update(g, plain.init(None))[0]),
    False,
  )
  named = optax_gaf.gaf(2.0, axis_name="data", num_microbatches=n)
  out["jit gaf (constrained)"] = (
    auto_mesh,
    jax.jit(lambda g: named.update(g, named.init(None))[0]),
    True,
  )
  return out


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
  compiled, inputs, moved = {}, {}, {}
  for name, (mesh, fn, set_mesh) in tqdm.tqdm(table.items(), desc="compile"):
    with jax.set_mesh(mesh) if set_mesh else contextlib.nullcontext():
      x = jax.device_put(grads, NamedSharding(mesh, P("data")))
      compiled[name] = fn.lower(x).compile()
    inputs[name] = x
    moved[name] = ring_bytes(compiled[name].as_text())

  # Every variant averages here (tau = 2 accepts all): check they agree.
  ref = jax.tree.map(lambda x: np.mean(x, 0), grads)
  for name, c in compiled.items():
    got = c(inputs[name])
    for k in ref:
      np.testing.assert_allclose(
        got[k], ref[k], rtol=2e-4, atol=2e-5, err_msg=name
      )

  times = {name: [] for name in compiled}
  for _ in tqdm.tqdm(range(args.reps), desc="interleaved reps"):
    for name, c in compiled.items():
      t0 = time.perf_counter()
      jax.block_until_ready(c(inputs[name]))
      times[name].append(time.perf_counter() - t0)

  base_bytes = sum(moved["pmean"].values())
  base_time = np.median(times["pmean"])
  lines = [
    f"D = {D} simulated CPU devices, {num_params / 1e6:.1f}M float32"
    f" parameters, n_local = {args.n_local} (N = {n}), {args.reps}"
    " interleaved repetitions, jax " + jax.__version__ + ".",
    "",
    "| variant | MB sent per device (ring model) | by collective (MB) |"
    " bytes / pmean | median step (s) | time / pmean |",
    "| --- | ---: | --- | ---: | ---: | ---: |",
  ]
  for name in compiled:
    total = sum(moved[name].values())
    kinds = ", ".join(
      f"{k} {v / 1e6:.1f}" for k, v in moved[name].items() if v >= 1e4
    )
    med = np.median(times[name])
    lines.append(
      f"| {name} | {total / 1e6:.1f} | {kinds} | {total / base_bytes:.3f} |"
      f" {med:.3f} | {med / base_time:.2f} |"
    )
  text = "\n".join(lines) + "\n"
  print(text)
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(text)
  print(f"wrote {out}")
  _plot(compiled, moved, times, base_bytes, base_time, out.with_suffix(".png"))


def _plot(compiled, moved, times, base_bytes, base_time, path):
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  names = list(compiled)
  byte_ratio = [sum(moved[k].values()) / base_bytes for k in names]
  time_ratio = [np.median(times[k]) / base_time for k in names]
  fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
  for ax, vals, title in (
    (axes[0], byte_ratio, "bytes sent / pmean"),
    (axes[1], time_ratio, "step time / pmean"),
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
