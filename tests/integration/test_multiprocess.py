"""Multi-process, as on a pod: 2 local processes x 4 CPU devices.

Each launch starts every process of one ``jax.distributed`` job (gloo CPU
collectives, a free port on localhost) and is bounded in time: a hung process
is killed and fails the test. The worker, ``tests/multiprocess_worker.py``,
writes the raw bytes of every shard it holds; here they are compared across
the 8 devices of both processes and with the float64 oracle.
"""

import os
import pathlib
import pickle
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from tests import multiprocess_worker as worker
from tests import oracle

ROOT = pathlib.Path(__file__).resolve().parents[2]
# Seconds per launch. A healthy one takes about 15-30 s on an idle 2-core
# machine; the bound is generous so that a loaded machine (CI beside other
# work) does not fail it, and only a real hang does.
TIMEOUT = 600


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launch(commands, log_dir, timeout=TIMEOUT):
  """Runs the commands at once; returns their outputs, or fails the test.

  Output goes to files, not pipes, so no process blocks on a full pipe while
  the others wait for it in a collective.
  """
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  env.pop("XLA_FLAGS", None)  # device counts come from the commands
  logs, procs = [], []
  try:
    for i, cmd in enumerate(commands):
      log = open(pathlib.Path(log_dir) / f"log_{i}.txt", "w+")  # noqa: SIM115
      log.write(f"[{time.strftime('%H:%M:%S')}] launched\n")
      log.flush()
      logs.append(log)
      procs.append(
        subprocess.Popen(
          cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
        )
      )
    deadline = time.monotonic() + timeout
    for p in procs:
      p.wait(timeout=max(deadline - time.monotonic(), 0.1))
  except subprocess.TimeoutExpired:
    pytest.fail(
      f"a process hung for {timeout} s (a generous bound: a healthy launch"
      " takes 15-30 s) and was killed; the last lines of every log:\n"
      + _tails(logs)
    )
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  outputs = _tails(logs, full=True)
  failed = [i for i, p in enumerate(procs) if p.returncode != 0]
  assert not failed, f"processes {failed} failed:\n" + _tails(logs)
  return outputs


def _tails(logs, full=False):
  out = []
  for log in logs:
    log.seek(0)
    text = log.read()
    log.close()
    out.append(text if full else text[-3000:])
  return out if full else "\n---\n".join(out)


def _worker_results(tmp_dir):
  port = _free_port()
  launch(
    [
      [
        sys.executable,
        "-m",
        "tests.multiprocess_worker",
        "--process-id",
        str(i),
        "--port",
        str(port),
        "--out",
        tmp_dir,
      ]
      for i in range(worker.NUM_PROCESSES)
    ],  # fmt: skip
    tmp_dir,
  )
  runs = [
    pickle.loads((pathlib.Path(tmp_dir) / f"process_{i}.pkl").read_bytes())
    for i in range(worker.NUM_PROCESSES)
  ]
  assert [r["process_index"] for r in runs] == [0, 1]
  return runs


@pytest.fixture(scope="module")
def results(tmp_path_factory):
  return _worker_results(str(tmp_path_factory.mktemp("multiprocess")))


def _by_device(runs, case):
  """``{path: {device id: (index, array)}}`` over both processes."""
  out = {}
  for run in runs:
    for path, shards in run["results"][case].items():
      for device, index, raw, dtype, shape in shards:
        x = np.frombuffer(raw, dtype).reshape(shape)
        assert device not in out.setdefault(path, {}), (path, device)
        out[path][device] = (index, raw, x)
  for path, per_device in out.items():
    assert len(per_device) == worker.D, path
  return out


def _assert_same_bytes_everywhere(per_device, path):
  raws = {d: raw for d, (_, raw, _) in per_device.items()}
  assert len(set(raws.values())) == 1, f"{path}: devices differ"


def _assemble(per_device):
  """The global array from its shards."""
  indices = [index for index, _, _ in per_device.values()]
  shape = [max(stop for _, stop in axis) for axis in zip(*indices)]
  out = np.zeros(shape, next(iter(per_device.values()))[2].dtype)
  for index, _, x in per_device.values():
    out[tuple(slice(a, b) for a, b in index)] = x
  return out


def _oracle():
  grads = worker.microgradients()
  flat = oracle.flatten([grads[k] for k in sorted(grads)])
  want, accepted, dist = oracle.sequential(flat, worker.TAU)
  assert not oracle.is_ambiguous(dist, worker.TAU)
  assert want is not None and not accepted.all()  # some are rejected
  return want, accepted


def _check(per_path, want, accepted, stacked_state, stacked_updates):
  """Decisions equal the oracle's; the update matches it to float32.

  Stacked results hold every device's copy ``[D, ...]``: read device 0's.
  """

  def value(path, stacked):
    if not stacked:
      return _assemble(per_path[path])
    return min(per_path[path].values(), key=lambda e: e[0])[2][0]

  np.testing.assert_array_equal(value("[1].accepted", stacked_state), accepted)
  assert bool(value("[1].ready", stacked_state))
  update = [
    value(f"[0]['{k}']", stacked_updates).reshape(-1)
    for k in sorted(worker.SHAPES)
  ]
  np.testing.assert_allclose(np.concatenate(update), want, rtol=2e-5, atol=2e-6)


def test_shard_map_replicated_across_processes(results):
  """gaf(axis_name="data"): one update, the same bytes on all 8 devices."""
  want, accepted = _oracle()
  per_path = _by_device(results, "shard_map")
  for path, per_device in per_path.items():
    _assert_same_bytes_everywhere(per_device, path)
  _check(per_path, want, accepted, True, True)


def test_shard_map_sharded_params_across_processes(results):
  """sharded_params=True: each device its shard; the state bitwise alike."""
  want, accepted = _oracle()
  per_path = _by_device(results, "shard_map_sharded")
  for path, per_device in per_path.items():
    if path.startswith("[1]") or path == "[0]['b']":  # state; replicated b
      _assert_same_bytes_everywhere(per_device, path)
  _check(per_path, want, accepted, True, False)
  w = per_path["[0]['w']"]
  assert {x.shape for _, _, x in w.values()} == {(2, 6)}  # 16 rows / 8


def test_jit_fsdp_across_processes(results):
  """Plain jit, params sharded: updates sharded alike, state replicated."""
  want, accepted = _oracle()
  per_path = _by_device(results, "jit_fsdp")
  for path, per_device in per_path.items():
    if path.startswith("[1]") or path == "[0]['b']":
      _assert_same_bytes_everywhere(per_device, path)
  _check(per_path, want, accepted, False, False)
  v = per_path["[0]['v']"]
  assert {x.shape for _, _, x in v.values()} == {(5, 3)}  # 24 columns / 8


def test_a_hung_launch_is_killed_and_fails(tmp_path):
  sleeper = [sys.executable, "-c", "import time; time.sleep(600)"]
  start = time.monotonic()
  with pytest.raises(pytest.fail.Exception, match="hung for 2 s"):
    launch([sleeper, sleeper], tmp_path, timeout=2)
  elapsed = time.monotonic() - start
  # Generous: two Python starts and kills, even on a loaded machine.
  assert elapsed < 120, f"killing two hung processes took {elapsed:.0f} s"


def test_data_parallel_example_multihost(tmp_path):
  """examples/data_parallel.py --multihost: 2 processes, one result."""
  port = _free_port()
  outputs = launch(
    [
      [
        sys.executable,
        str(ROOT / "examples" / "data_parallel.py"),
        "--multihost",
        "--cpu-devices",
        "4",
        "--coordinator-address",
        f"127.0.0.1:{port}",
        "--num-processes",
        "2",
        "--process-id",
        str(i),
        "--steps",
        "3",
        "--n-local",
        "1",
        "--microbatch-size",
        "4",
      ]
      for i in range(2)
    ],  # fmt: skip
    tmp_path,
  )
  results = [
    [
      line
      for line in out.splitlines()
      if line.startswith(("8 devices", "mean"))
    ]
    for out in outputs
  ]
  assert results[0][0].startswith("8 devices x 1 microbatches of 4 (N = 8)")
  assert "skipped steps" in results[0][1] and "test accuracy" in results[0][1]
  assert results[0] == results[1]
