"""benchmarks/outside_models.py runs and writes what the ghost guide shows."""

import json

import jax
import pytest

from benchmarks import outside_models
from benchmarks.outside import haiku_mobilenet


def test_quick_run_writes_table_json_and_plot(tmp_path):
  outside_models.main(["--quick", "--rounds", "1", "--out", str(tmp_path)])
  (row,) = json.loads((tmp_path / "outside_models_quick.json").read_text())
  assert set(row["time"]) == set(outside_models.ROUTES)
  assert all(t > 0 for t in row["time"].values())
  assert row["decisions"]["equal"]
  assert {route for _, _, route in row["leaves"]} <= {
    "ghost", "materialize", "materialize*", "direct", "unused",
  }  # fmt: skip
  table = (tmp_path / "outside_models_quick.md").read_text()
  assert "| NNX scan-over-layers MLP | 8 |" in table
  assert (tmp_path / "outside_models_quick.png").stat().st_size > 0


def test_every_case_names_its_source_and_has_a_loss():
  for module in outside_models.MODULES:
    case = module.case()
    assert "@" in case.source  # repository file @ commit (or a package)
    assert case.name in outside_models.TARGETS
    if case.kind == "nnx":  # init returns a module: built for real
      params, model_state, batch = case.init(jax.random.key(0), 8)
    else:  # traced, not run: shapes are what the loss needs
      init = jax.eval_shape(lambda k: case.init(k, 8), jax.random.key(0))
      params, model_state, batch = init
    if case.kind == "stateful":
      out = jax.eval_shape(
        case.loss, params, model_state, batch, jax.random.key(1)
      )[0]
    elif case.kind == "nnx":
      out = case.loss(params, batch)
    else:
      out = jax.eval_shape(case.loss, params, batch)
    assert out.shape == ()


@pytest.mark.parametrize(
  "module",
  [haiku_mobilenet],
  ids=lambda m: m.__name__.rsplit(".", 1)[-1],
)
def test_ghost_decides_as_microbatch_grads_in_float64(module):
  """Haiku's MobileNetV1, its loss as its authors wrote it (an L2 term over
  every weight, depthwise convolutions, BatchNorm): one float64 GAF step
  on the ghost route accepts the microbatches ``microbatch_grads``
  accepts, with its cosine distances and update. (All six models, at N = 8
  and 32, in every full run of the benchmark: its results file. The L2
  term on Flax-style convolutions and nnx.scan models are also in
  tests/integration/test_ghost_residual.py and test_ghost_scan.py; one
  model here keeps CI inside its time.)"""
  d = outside_models.decisions(module, 8)
  assert d["equal"], d
  assert d["max_cos_diff"] < 1e-6 and d["max_param_rel_diff"] < 1e-12, d
