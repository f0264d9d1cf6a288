"""docs/guides/flax.md: its diffs are the files', its programs and snippets run.

The programs live in examples/flax_guide/ (``<name>.py`` unchanged,
``<name>_gaf.py`` converted); the page shows the unified diff of each pair.
"""

import difflib
import importlib.util
import pathlib
import re

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
GUIDE = ROOT / "docs" / "guides" / "flax.md"
PROGRAMS = ROOT / "examples" / "flax_guide"


def guide_diff(name: str) -> str:
  """The diff the page shows: unchanged -> converted, 2 lines of context."""
  a = (PROGRAMS / f"{name}.py").read_text().splitlines(keepends=True)
  b = (PROGRAMS / f"{name}_gaf.py").read_text().splitlines(keepends=True)
  return "".join(
    difflib.unified_diff(
      a,
      b,
      f"examples/flax_guide/{name}.py",
      f"examples/flax_guide/{name}_gaf.py",
      n=2,
    )
  )


def _load(name):
  spec = importlib.util.spec_from_file_location(name, PROGRAMS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("name", ["nnx_tutorial", "linen_mnist"])
def test_the_page_shows_the_diff_and_it_is_under_20_lines(name):
  diff = guide_diff(name)
  assert f"```diff\n{diff}```" in GUIDE.read_text(), (
    f"docs/guides/flax.md is out of date; the diff of {name} is now:\n{diff}"
  )
  changed = [
    line
    for line in diff.splitlines()
    if line[:1] in "+-" and line[:3] not in ("+++", "---") and line[1:].strip()
  ]
  assert 0 < len(changed) < 20, changed


def test_converted_nnx_tutorial_trains(capsys):
  train, test = _load("nnx_tutorial_gaf").main(steps=3)
  assert np.isfinite(float(train["loss"]))
  assert 0.0 <= float(test["accuracy"]) <= 1.0
  assert "skip rate:" in capsys.readouterr().out


def test_converted_linen_example_trains():
  loss, accuracy = _load("linen_mnist_gaf").main(steps=3)
  assert np.isfinite(loss) and 0.0 <= accuracy <= 1.0


def _python_blocks():
  return re.findall(r"```python\n(.*?)```", GUIDE.read_text(), re.S)


def test_the_page_has_python_snippets():
  assert len(_python_blocks()) >= 4


def test_python_snippets_run_in_page_order(tmp_path, monkeypatch):
  """The page's ```python blocks run in order in one namespace, as a reader
  runs them (the ghost section continues the Linen example)."""
  monkeypatch.chdir(tmp_path)
  namespace = {}
  for block in _python_blocks():
    exec(compile(block, "docs/guides/flax.md", "exec"), namespace)
