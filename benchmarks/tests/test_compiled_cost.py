"""benchmarks/compiled_cost.py: a deterministic table of each route's cost."""

from benchmarks import compiled_cost


def test_table_has_every_route_and_ghost_does_less_work(tmp_path):
  out = tmp_path / "cost.md"
  compiled_cost.main(["--n", "32", "--out", str(out)])
  rows = [r.split("|")[1:-1] for r in out.read_text().splitlines()[2:]]
  by_route = {r[1].strip(): r for r in rows}
  _, _, loss = compiled_cost._mlp()
  assert set(by_route) == set(compiled_cost.routes(loss, 32))
  flops = {k: float(r[2]) for k, r in by_route.items()}
  assert flops["ghost"] < flops["stacked sequential"]
  # Every route of the sequential rule makes the same update.
  sums = {k: float(r[4]) for k, r in by_route.items()}
  assert abs(sums["ghost"] - sums["stacked sequential"]) < 1e-3
  assert abs(sums["streaming"] - sums["stacked sequential"]) < 1e-3
