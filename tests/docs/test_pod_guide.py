"""The pod guide (docs/guides/pod.md): its snippets run as printed, and its
FSDP example (examples/fsdp.py) keeps adamw's state sharded like the params,
with the same decisions under jit and shard_map."""

import functools
import importlib.util
import pathlib
import re

import jax
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _spec(x):
  """A jit output's spec, one entry per axis (``P('data')`` -> 'data', )."""
  spec = tuple(x.sharding.spec)
  return spec + (None,) * (x.ndim - len(spec))


# --- the example


@functools.cache
def _example_run(mode):
  spec = importlib.util.spec_from_file_location(
    "fsdp_example", ROOT / "examples" / "fsdp.py"
  )
  example = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(example)
  args = example.parse_args(
    ["--mode", mode, "--steps", "3", "--hidden", "32", "--n-local", "2"]
  )
  return example.train(args, progress=False)


@pytest.mark.parametrize("mode", ["jit", "shard_map"])
def test_example_keeps_adamw_state_sharded_like_the_params(mode):
  out = _example_run(mode)
  params, opt_state = out["params"], out["opt_state"]
  assert _spec(params["w1"]) == ("data", None)
  assert _spec(params["b2"]) == (None,)  # 10 classes: replicated
  adam = [
    s for s in jax.tree.leaves(opt_state, is_leaf=_is_adam) if _is_adam(s)
  ]
  assert adam
  for moment in (adam[0].mu, adam[0].nu):
    for k, x in moment.items():
      assert x.sharding.is_equivalent_to(params[k].sharding, x.ndim), k
  assert len(out["loss"]) == 3 and np.isfinite(out["loss"]).all()


def _is_adam(x):
  return hasattr(x, "mu") and hasattr(x, "nu")


def test_example_modes_agree():
  """jit and shard_map: the same decisions, the same params."""
  runs = {mode: _example_run(mode) for mode in ("jit", "shard_map")}
  np.testing.assert_array_equal(
    runs["jit"]["accepted"], runs["shard_map"]["accepted"]
  )
  assert not np.all(runs["jit"]["accepted"])  # label noise: some rejected
  jax.tree.map(
    functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-6),
    runs["jit"]["params"],
    runs["shard_map"]["params"],
  )


# --- the pod guide


def _guide_snippets():
  text = (ROOT / "docs" / "guides" / "pod.md").read_text()
  return re.findall(r"```python\n(.*?)```", text, re.S)


@pytest.mark.parametrize("index", range(3))
def test_pod_guide_snippets_run(index, capsys):
  """The guide's DDP, FSDP-jit and FSDP-shard_map snippets run as printed."""
  snippets = _guide_snippets()
  assert len(snippets) == 3
  exec(compile(snippets[index], f"pod.md snippet {index}", "exec"), {})
  assert capsys.readouterr().out.strip()
