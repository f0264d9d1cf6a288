"""benchmarks/vs_plain_step.py runs and writes what the docs include."""

import json

from benchmarks import vs_plain_step


def test_quick_run_writes_table_json_and_plot(tmp_path):
  vs_plain_step.main(["--quick", "--rounds", "1", "--out", str(tmp_path)])
  rows = json.loads((tmp_path / "vs_plain_step_quick.json").read_text())
  (row,) = rows
  assert set(row["time"]) == set(vs_plain_step.ROUTES)
  assert all(t > 0 for t in row["time"].values())
  assert 1 < row["floor"] < 10  # the Gram matrix adds FLOPs, not ten steps
  # Ghost holds no N x P microgradients: less temp memory than vmap's.
  assert row["temp_mib"]["ghost"] < row["temp_mib"]["materialized"]
  table = (tmp_path / "vs_plain_step_quick.md").read_text()
  assert "| MLP 64-256-256-10 | 8 |" in table
  assert (tmp_path / "vs_plain_step_quick.png").stat().st_size > 0


def test_models_are_the_documented_ones():
  for name in vs_plain_step.MODELS:
    params, loss, batch = vs_plain_step.model_and_batch(
      name, vs_plain_step.jax.random.key(0)
    )
    assert vs_plain_step.jax.eval_shape(loss, params, batch).shape == ()
