"""One process of ``tests/integration/test_multiprocess.py``: a pod host, in
miniature.

``python -m tests.multiprocess_worker --process-id I --port P --out DIR``
joins ``NUM_PROCESSES`` processes of ``LOCAL_DEVICES`` CPU devices each with
``jax.distributed.initialize`` (gloo collectives), runs ``gaf`` three ways
over all 8 devices (``shard_map`` replicated, ``shard_map`` with
``sharded_params``, FSDP under plain ``jax.jit``) and writes the raw bytes of
every addressable shard of every result to ``DIR/process_I.pkl``, for the
test to compare across processes and with the float64 oracle.

Importing this module runs nothing (the test suite collects ``tests/`` with
``--doctest-modules``).
"""

import argparse
import pathlib
import pickle
import time

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

import optax_gaf

NUM_PROCESSES = 2
LOCAL_DEVICES = 4
D = NUM_PROCESSES * LOCAL_DEVICES
N = 2 * D
TAU = 0.5
# Sharded along the first axis, along the second, and replicated (13 does
# not divide 8).
SHAPES = {"w": (16, 6), "v": (5, 24), "b": (13,)}
SPECS = {"w": ("data", None), "v": (None, "data"), "b": ()}


def microgradients(seed=0):
  """The same ``[N, ...]`` leaves on every process: agreeing and not."""
  rng = np.random.default_rng(seed)
  flip = np.where(np.arange(N) % 5 == 3, -1.0, 1.0)
  out = {}
  for k, shape in SHAPES.items():
    signal = rng.normal(size=shape)
    noise = rng.normal(size=(N,) + shape)
    sign = flip.reshape((N,) + (1,) * len(shape))
    out[k] = (sign * signal + 0.8 * noise).astype(np.float32)
  return out


def _shards(tree):
  """``{path: [(device id, index, raw bytes, dtype, shape), ...]}``.

  ``index`` is the shard's ``(start, stop)`` along each axis.
  """
  out = {}
  for path, x in jax.tree_util.tree_leaves_with_path(tree):
    out[jax.tree_util.keystr(path)] = [
      (
        s.device.id,
        tuple(i.indices(n)[:2] for i, n in zip(s.index, x.shape)),
        np.asarray(s.data).tobytes(),
        str(s.data.dtype),
        tuple(s.data.shape),
      )
      for s in x.addressable_shards
    ]
  return out


def _global(mesh, data, spec):
  """A global array from the full host copy every process holds."""
  sharding = jax.sharding.NamedSharding(mesh, P(*spec))
  return jax.make_array_from_callback(
    data.shape, sharding, lambda index: data[index]
  )


def _shard_map_case(mesh, grads, sharded):
  agg = optax_gaf.gaf(
    TAU, num_microbatches=N, axis_name="data", sharded_params=sharded
  )
  specs = {k: P(*s) for k, s in SPECS.items()} if sharded else None

  def step(g, state, params):
    updates, state = agg.update(g, state, params)
    # Every device's own copy, stacked: out_specs P("data") keeps them all.
    per_device = jax.tree.map(lambda x: x[None], state)
    if not sharded:
      updates = jax.tree.map(lambda x: x[None], updates)
    return updates, per_device

  fn = jax.jit(
    jax.shard_map(
      step,
      mesh=mesh,
      in_specs=(P("data"), P(), specs if sharded else P()),
      out_specs=(specs if sharded else P("data"), P("data")),
    )
  )
  g = {k: _global(mesh, v, ("data",)) for k, v in grads.items()}
  params = {
    k: _global(mesh, np.zeros(s, np.float32), SPECS[k] if sharded else ())
    for k, s in SHAPES.items()
  }
  return fn(g, agg.init(None), params)


def _jit_case(mesh, grads):
  agg = optax_gaf.gaf(TAU, num_microbatches=N)  # Explicit axes: no name
  g = {k: _global(mesh, v, ("data",)) for k, v in grads.items()}
  params = {
    k: _global(mesh, np.zeros(s, np.float32), SPECS[k])
    for k, s in SHAPES.items()
  }
  return jax.jit(agg.update)(g, agg.init(None), params)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--process-id", type=int, required=True)
  p.add_argument("--port", type=int, required=True)
  p.add_argument("--out", required=True)
  args = p.parse_args(argv)
  _log("imported")
  jax.config.update("jax_num_cpu_devices", LOCAL_DEVICES)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
    coordinator_address=f"127.0.0.1:{args.port}",
    num_processes=NUM_PROCESSES,
    process_id=args.process_id,
  )
  _log("initialized")
  assert jax.device_count() == D and jax.local_device_count() == LOCAL_DEVICES
  mesh = jax.make_mesh((D,), ("data",))  # Explicit axes
  grads = microgradients()
  results = {}
  for name, case in (
    ("shard_map", lambda: _shard_map_case(mesh, grads, sharded=False)),
    ("shard_map_sharded", lambda: _shard_map_case(mesh, grads, sharded=True)),
    ("jit_fsdp", lambda: _jit_case(mesh, grads)),
  ):
    results[name] = jax.block_until_ready(case())
    _log(name)
  out = {
    "process_index": jax.process_index(),
    "results": {name: _shards(r) for name, r in results.items()},
  }
  path = pathlib.Path(args.out) / f"process_{args.process_id}.pkl"
  path.write_bytes(pickle.dumps(out))
  _log("done")
  # No jax.distributed.shutdown() here: at exit JAX destroys the backends
  # (with their gloo collectives) first, then shuts the client down behind
  # a barrier. Shutting it down first made the exit stall for minutes now
  # and then, after everything was written.


_START = time.monotonic()


def _log(stage):
  """Progress on stdout: the test shows it when a launch hangs or fails."""
  clock = time.strftime("%H:%M:%S")
  print(f"[{clock}, {time.monotonic() - _START:5.1f} s] {stage}", flush=True)


if __name__ == "__main__":
  main()
