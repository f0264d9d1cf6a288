"""The programs in examples/: self-contained, runnable as scripts.

Each file in ``examples/`` must run with ``python examples/<file>.py`` and
use nothing but optax_gaf's public API and third-party libraries: no other
example, no ``benchmarks`` harness. Their label noise must corrupt exactly
the fraction that the harness's does.
"""

import ast
import importlib.util
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

import optax_gaf
from benchmarks.harness import datasets

EXAMPLES = pathlib.Path(__file__).resolve().parents[2] / "examples"
SCRIPTS = sorted(p.name for p in EXAMPLES.glob("*.py"))
THIRD_PARTY = {
  "flax",
  "jax",
  "matplotlib",
  "numpy",
  "optax",
  "optax_gaf",
  "sklearn",
  "tqdm",
}


def _load(name):
  """Imports ``examples/<name>`` as a module (its main does not run)."""
  spec = importlib.util.spec_from_file_location(
    f"example_{name[:-3]}", EXAMPLES / name
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


EXAMPLE_MODULES = {
  name: _load(name)
  for name in ("noisy_labels.py", "data_parallel.py", "per_example.py")
}


# Seconds per example script: generous, so that only a hang fails on a
# loaded machine.
SCRIPT_TIMEOUT = 900


def _run(script, *args, cwd):
  """Runs ``python examples/<script> args`` from ``cwd``.

  The script gets the optax_gaf that this test imported (the checkout's),
  and otherwise only what is installed.
  """
  package_root = pathlib.Path(optax_gaf.__file__).resolve().parents[1]
  env = {**os.environ, "PYTHONPATH": str(package_root)}
  try:
    out = subprocess.run(
      [sys.executable, str(EXAMPLES / script), *args],
      cwd=cwd,
      capture_output=True,
      text=True,
      timeout=SCRIPT_TIMEOUT,
      check=False,
      env=env,
    )
  except subprocess.TimeoutExpired as e:
    pytest.fail(
      f"examples/{script} did not finish in {SCRIPT_TIMEOUT} s (a generous"
      f" bound, for a loaded machine); its last output:\n{e.stdout!r}"
    )
  assert out.returncode == 0, out.stderr[-3000:]
  return out.stdout


def test_examples_are_scripts_not_a_package():
  assert not (EXAMPLES / "__init__.py").exists()
  assert {"noisy_labels.py", "data_parallel.py", "per_example.py"} <= set(
    SCRIPTS
  )


def _imports(tree):
  """``(module, names)`` of every import statement in ``tree``."""
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        yield alias.name, ()
    elif isinstance(node, ast.ImportFrom):
      assert node.level == 0, "relative import"
      yield node.module, tuple(alias.name for alias in node.names)


@pytest.mark.parametrize("script", SCRIPTS)
def test_example_imports_only_libraries_and_the_public_api(script):
  source = (EXAMPLES / script).read_text()
  tree = ast.parse(source)
  siblings = {name[:-3] for name in SCRIPTS}
  allowed = THIRD_PARTY | set(sys.stdlib_module_names)
  for module, names in _imports(tree):
    top = module.split(".")[0]
    assert top not in siblings | {"examples", "benchmarks", "tests"}, module
    assert top in allowed, f"{script} imports {module}"
    if top == "optax_gaf":
      assert module == "optax_gaf", f"{script} imports {module}"
      assert set(names) <= set(optax_gaf.__all__), names
  used = {
    node.attr
    for node in ast.walk(tree)
    if isinstance(node, ast.Attribute)
    and isinstance(node.value, ast.Name)
    and node.value.id == "optax_gaf"
  }
  assert used and used <= set(optax_gaf.__all__), used
  # No reaching into the repository through the import path.
  assert "sys.path" not in source and "__file__" not in source


@settings(max_examples=30, deadline=None)
@given(
  rate=st.floats(0.0, 1.0, exclude_max=True),
  seed=st.integers(0, 2**32 - 1),
  num_classes=st.integers(2, 12),
)
def test_example_label_noise_corrupts_what_the_harness_does(
  rate, seed, num_classes
):
  """Exactly ``round(rate * n)`` labels move to another class, everywhere."""
  labels = np.arange(257, dtype=np.int32) % num_classes
  data = datasets.Dataset(
    labels[:, None], labels, labels, labels[:1, None], labels[:1], num_classes
  )
  harness = datasets.symmetric_label_noise(data, rate, seed).train_y
  expected = int(round(rate * len(labels)))
  assert np.sum(harness != labels) == expected
  for script in EXAMPLE_MODULES:
    noisy = EXAMPLE_MODULES[script].symmetric_label_noise(
      labels, num_classes, rate, seed
    )
    assert noisy.dtype == np.int32 and noisy.shape == labels.shape
    assert np.sum(noisy != labels) == expected, script
    # The same function: the same examples get the same wrong labels.
    np.testing.assert_array_equal(noisy, harness)


@pytest.mark.parametrize("script", sorted(EXAMPLE_MODULES))
@pytest.mark.parametrize(
  "flags,message",
  [
    (["--label-noise", "1.0"], "--label-noise must lie in"),
    (["--label-noise", "-0.1"], "--label-noise must lie in"),
    (["--steps", "0"], "--steps"),
  ],
)
def test_examples_reject_bad_flags(script, flags, message, capsys):
  with pytest.raises(SystemExit):
    EXAMPLE_MODULES[script].parse_args(flags)
  assert message in capsys.readouterr().err


def test_noisy_labels_rejects_tau_outside_0_2(capsys):
  with pytest.raises(SystemExit):
    EXAMPLE_MODULES["noisy_labels.py"].parse_args(["--tau", "2.5"])
  assert "--tau" in capsys.readouterr().err


@pytest.mark.parametrize(
  "flags,message",
  [
    (["--tau", "2.5"], "--tau is a cosine distance"),
    (["--tau", "loose"], "--tau must be a number or 'auto'"),
    (["--rule", "pairwise"], "--rule"),
  ],
)
def test_per_example_rejects_bad_tau_and_rule(flags, message, capsys):
  with pytest.raises(SystemExit):
    EXAMPLE_MODULES["per_example.py"].parse_args(flags)
  assert message in capsys.readouterr().err


def test_per_example_batches_are_the_quickstarts():
  """The same seed gives the Quickstart's microbatches, back to back."""
  labels = np.arange(1300, dtype=np.int32) % 10
  quick = EXAMPLE_MODULES["noisy_labels.py"].class_balanced_batches(
    labels, 7, 3
  )
  idx = EXAMPLE_MODULES["per_example.py"].class_balanced_batches(labels, 7, 3)
  assert idx.shape == (7, 100)
  np.testing.assert_array_equal(idx, quick.reshape(7, 100))


def test_noisy_labels_runs_as_a_script(tmp_path):
  """The Quickstart job, on tiny settings: the table and the plot."""
  out = _run(
    "noisy_labels.py",
    *("--steps", "40", "--eval-every", "20", "--tau", "0.9"),
    *("--out", str(tmp_path / "out")),
    cwd=tmp_path,
  )
  assert "40.0% of 1300 training labels corrupted" in out
  assert re.search(r"method\s+val acc\s+memorisation\s+acceptance", out)
  avg = re.search(r"^averaging\s+([\d.]+)\s+([\d.]+)\s+-\s+-$", out, re.M)
  gaf = re.search(
    r"^GAF tau=0.9\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+(\d+) / 40$", out, re.M
  )
  assert avg and gaf, out
  for value in (*avg.groups(), *gaf.groups()[:3]):
    assert 0.0 <= float(value) <= 1.0
  assert float(avg.group(1)) > 0.2  # above chance after 40 steps
  # The first microgradient always counts: at least half are accepted.
  assert 0.5 <= float(gaf.group(3)) <= 1.0
  assert 0 <= int(gaf.group(4)) <= 40
  assert (tmp_path / "out" / "curves.png").stat().st_size > 10_000


def test_data_parallel_runs_as_a_script(tmp_path):
  """8 simulated devices x 2 microbatches, a few steps."""
  out = _run("data_parallel.py", "--steps", "6", cwd=tmp_path)
  assert (
    "8 devices x 2 microbatches of 16 (N = 16), tau = 0.95, label noise 40%"
  ) in out
  found = re.search(
    r"mean acceptance rate ([\d.]+), skipped steps (\d+) / 6, final train"
    r" loss ([\d.]+), test accuracy ([\d.]+)",
    out,
  )
  assert found, out
  acceptance, skipped, loss, accuracy = found.groups()
  assert 1 / 16 <= float(acceptance) <= 1.0
  assert 0 <= int(skipped) <= 6
  assert np.isfinite(float(loss)) and 0.0 <= float(accuracy) <= 1.0


def test_per_example_runs_as_a_script(tmp_path):
  """Plain step, N=2 GAF and per-example GAF (ghost), a few steps."""
  out = _run(
    "per_example.py",
    *("--steps", "20", "--eval-every", "10", "--tau", "auto"),
    *("--rule", "medoid", "--out", str(tmp_path / "out")),
    cwd=tmp_path,
  )
  assert "20 steps of 100 examples" in out
  number = r"([\d.]+)"
  rows = {
    "averaging": rf"^averaging\s+{number}\s+{number}\s+-\s+-\s+1.00x$",
    "N=2": rf"^GAF N=2 tau=0.8\s+{number}\s+{number}\s+{number}"
    rf"\s+(\d+) / 20\s+{number}x$",
    "N=100": rf"^GAF N=100 AutoTau medoid\s+{number}\s+{number}\s+{number}"
    rf"\s+(\d+) / 20\s+{number}x$",
  }
  found = {k: re.search(v, out, re.M) for k, v in rows.items()}
  assert all(found.values()), out
  for match in found.values():
    val_acc, memorisation = map(float, match.groups()[:2])
    assert 0.0 <= val_acc <= 1.0 and 0.0 <= memorisation <= 1.0
  # GAF keeps at least its anchor: acceptance >= 1/N.
  assert 0.5 <= float(found["N=2"].group(3)) <= 1.0
  assert 1 / 100 <= float(found["N=100"].group(3)) <= 1.0
  for key in ("N=2", "N=100"):
    assert 0 <= int(found[key].group(4)) <= 20
    assert float(found[key].group(5)) > 0
  assert (tmp_path / "out" / "curves.png").stat().st_size > 10_000
