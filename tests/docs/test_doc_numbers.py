"""The numbers in README.md and docs/ are those of benchmarks/results/.

Each result file is written by a script (its first lines name the command).
A page either includes the file (``{include}``) or quotes numbers from it;
the quoted ones are recomputed here from the file and looked up in the
page's prose, so a re-run benchmark that changes a number fails this test
until the prose says the new one. ``test_every_decimal_has_a_source`` catches
a number added without a source.
"""

import decimal
import json
import pathlib
import re
import statistics

import markdown_it
import pytest

from tests.docs.test_docs import doc_files

ROOT = pathlib.Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"


def result(name: str) -> str:
  return (RESULTS / name).read_text()


def prose(page: str) -> str:
  """A page's text without its code blocks, whitespace collapsed."""
  text = (ROOT / page).read_text()
  lines = text.split("\n")
  for token in markdown_it.MarkdownIt("commonmark").parse(text):
    if token.type in ("fence", "code_block") and token.map:
      for i in range(*token.map):
        lines[i] = ""
  return " ".join(" ".join(lines).split())


def says(page: str, *phrases: str) -> None:
  text = prose(page)
  for phrase in phrases:
    assert " ".join(phrase.split()) in text, (
      f"{page} should say {phrase!r} (recomputed from benchmarks/results/)"
    )


def tables(text: str) -> list[list[dict]]:
  """Every Markdown table in ``text``, as rows of {header: cell}."""
  found, rows, header = [], [], None
  for line in text.split("\n") + [""]:
    if line.startswith("|"):
      cells = [c.strip() for c in line.strip().strip("|").split("|")]
      if header is None:
        header = cells
      elif not set("".join(cells)) <= set("-: "):
        rows.append(dict(zip(header, cells)))
    elif header is not None:
      found.append(rows)
      rows, header = [], None
  return found


def table_with(text: str, column: str) -> list[dict]:
  return next(t for t in tables(text) if t and column in t[0])


def mean(cell: str) -> float:
  return float(cell.split("±")[0])


# --- noisy labels: README, results.md ----------------------------------------


def noisy_rows():
  rows = table_with(result("noisy_labels.md"), "noise")
  return {(r["noise"], r["method"]): r for r in rows}


def test_headline_at_40_percent_noise():
  rows = noisy_rows()
  avg, gaf = rows["40%", "average"], rows["40%", "gaf-sequential"]
  says(
    "README.md",
    f"averaging ends at {avg['val acc']}%",
    f"GAF ends at {gaf['val acc']}% and memorises {gaf['memorisation']}%",
    "16 minutes on 2 CPU cores",
  )
  assert "16 min on 2 CPU cores" in result("noisy_labels.md")
  says(
    "docs/guides/results.md",
    f"its best during training is {avg['best val acc']}%",
    f"its final {avg['val acc']}%",
    f"({gaf['skipped']}% of the steps skipped over 3 seeds)",
  )


def test_results_page_summary_table_matches_the_result_file():
  rows = noisy_rows()
  page = table_with(
    (ROOT / "docs/guides/results.md").read_text(), "label noise"
  )
  checked = 0
  for row in page:
    noise = row["label noise"]
    if (noise, "average") not in rows:
      assert row["digits: GAF"] == "", noise  # a paper-only row
      continue
    gaf, avg = rows[noise, "gaf-sequential"], rows[noise, "average"]
    assert row["digits: GAF"] == gaf["val acc"], noise
    assert row["digits: averaging"] == avg["val acc"], noise
    assert row["GAF steps skipped"] == gaf["skipped"], noise
    if noise != "0%":
      assert row["GAF memorisation"] == gaf["memorisation"], noise
      assert row["averaging memorisation"] == avg["memorisation"], noise
    checked += 1
  assert checked == 5


def test_tau_sweep_and_random_labels():
  text = result("noisy_labels.md")
  sweep = table_with(text, "tau")
  quoted = ", ".join(
    f"{mean(r['val acc']):.1f} / {mean(r['acceptance']):.1f} at"
    f"{' tau' if i == 0 else ''} {r['tau']}"
    for i, r in enumerate(sweep)
  )
  says("docs/guides/results.md", quoted)
  random = {r["method"]: r for r in table_with(text, "train acc")}
  says(
    "docs/guides/results.md",
    f"averaging fits {random['average']['train acc']}% of the random",
    f"GAF {random['gaf-sequential']['train acc']}%",
    f"skipping {mean(random['gaf-sequential']['skipped']):.1f}% of its steps",
  )


def test_quickstart_output_is_the_recorded_one():
  record = result("quickstart.md")
  output = re.search(r"```text\n(.*?)\n```", record, re.S)[1].split("\n")
  table = [line for line in output if not line.startswith(("(", "wrote"))]
  readme = (ROOT / "README.md").read_text()
  assert "```text\n" + "\n".join(table) + "\n```" in readme
  seconds = re.search(r"Wall time: (\d+) s", record)[1]
  before, after = re.search(r"([\d.]+) before, ([\d.]+) after", record).groups()
  says(
    "README.md",
    f"{seconds} s on 2 CPU cores at a load average of {before} to {after}",
  )
  assert "2 CPU cores" in record
  assert (
    "benchmarks/results/quickstart.md"
    in (ROOT / "docs/guides/results.md").read_text()
  )


def test_speedup_against_the_authors_package():
  ratios = [
    float(r["step_GAF / optax_gaf"].rstrip("x"))
    for r in table_with(result("vs_reference.md"), "step_GAF / optax_gaf")
  ]
  span = f"{min(ratios):.1f}x to {max(ratios):.1f}x"
  says("README.md", span)
  says("docs/guides/results.md", f"({span})")


def test_rules_page_tables_match_their_result_files():
  page = (ROOT / "docs/guides/rules.md").read_text()
  docs_tables = [t for t in tables(page) if t and "40%" in t[0]]
  assert len(docs_tables) == 2
  for doc_table, name in zip(docs_tables, ("rules", "rules_n4")):
    rows = table_with(result(f"{name}/noisy_labels.md"), "noise")
    rows = {(r["noise"], r["method"]): r for r in rows}
    for row in doc_table:
      method = row["method"].strip("`")
      for noise in ("0%", "20%", "40%", "60%", "80%"):
        r = rows[noise, method]
        mem = decimal.Decimal(r["memorisation"].split("±")[0].strip())
        mem = mem.quantize(decimal.Decimal(1), decimal.ROUND_HALF_UP)
        expected = f"{r['val acc']} ({mem})"
        assert row[noise] == expected, (name, method, noise)


# --- streaming.md: overhead, block size, XLA's counts ------------------------


def test_overhead_claims():
  rows = table_with(result("overhead.md"), "microbatch size")
  num = lambda r, k: float(r[k])
  small = [r for r in rows if int(r["N"]) <= 16]
  band = max(
    abs(num(r, "sequential") - num(r, "gram (sequential)")) for r in small
  )
  gaf_cells = [
    num(r, k)
    for r in rows
    if r["microbatch size"] in ("32", "4")
    for k in ("sequential", "pairwise")
  ]
  worst = max(
    (r for r in rows if r["microbatch size"] == "4"),
    key=lambda r: num(r, "pairwise"),
  )
  size1 = [
    num(r, k)
    for r in rows
    if r["microbatch size"] == "1"
    for k in ("sequential", "pairwise")
  ]
  big = [r for r in rows if r["microbatch size"] == "1" and int(r["N"]) >= 32]
  big_gaf = [num(r, k) for r in big for k in ("sequential", "pairwise")]
  says(
    "docs/guides/streaming.md",
    f"differ by up to {band:.3f}",
    f"{sum(c <= 1.10 for c in gaf_cells)} of the {len(gaf_cells)} GAF cells",
    f"(up to {num(worst, 'pairwise'):.2f}x, `pairwise` at microbatch size 4"
    f" and N = {worst['N']})",
    f"(`sequential`: {num(worst, 'sequential'):.2f}x there)",
    f"GAF costs {min(size1):.2f}x to {max(size1):.2f}x",
    f"Gram route's {max(num(r, 'gram (sequential)') for r in big):.2f}x down"
    f" to {min(big_gaf):.2f}x to {max(big_gaf):.2f}x",
  )
  steps = [
    float(r["average (ms/step)"])
    for r in rows
    if r["microbatch size"] == "1" and int(r["N"]) <= 8
  ]
  isolated = table_with(result("overhead_isolated.md"), "average (us)")
  agg = [
    float(r[k]) / 1e3
    for r in isolated
    if int(r["N"]) <= 8
    for k in r
    if k not in ("N", "average (us)")
  ]
  says(
    "docs/guides/streaming.md",
    f"takes {min(agg):.1f} to {max(agg):.1f} ms at N <= 8",
    f"against a {min(steps):.0f} to {max(steps):.0f} ms step",
  )


def test_block_size_claims():
  text = re.search(r"```text\n(.*?)```", result("block_size.md"), re.S)[1]
  rows = tables(text)[0]
  best = {}
  for r in rows:
    sizes = {k: float(v) for k, v in r.items() if k.startswith("B=")}
    best[int(r["N"])] = min(sizes, key=sizes.get)
  # B=64 covers every N up to 64 with one block: the whole Gram matrix.
  assert all(best[n] == "B=64" for n in best if n <= 16), best
  assert best[64] == "B=16", best
  says(
    "docs/guides/streaming.md",
    "Up to N = 16 one Gram matrix is cheapest; at N = 64 blocks of 16 are.",
  )


def test_step_cost_claims():
  text = result("step_cost.md")
  mflop = re.search(r"One microgradient .*?: ([\d.]+) MFLOP", text)[1]
  says("docs/guides/streaming.md", f"small ({mflop} MFLOP for 25.6k")


# --- choosing_tau.md ----------------------------------------------------------


def tau_rows():
  rows = table_with(result("choosing_tau.md"), "best tau")
  return {r["setting"]: r for r in rows}


def _setting(name):
  model, n, per_class, noise, opt = name.split("/")
  return {
    "model": model,
    "n": int(n.split("=")[1]),
    "per_class": int(per_class.split("=")[1]),
    "noise": float(noise.split("=")[1]),
    "opt": opt,
  }


def test_best_tau_ranges():
  rows = tau_rows()

  def span(pick):
    taus = sorted(
      float(r["best tau"]) for s, r in rows.items() if pick(_setting(s))
    )
    return f"{taus[0]:g} to {taus[-1]:g}"

  mlp = lambda s: s["model"] == "mlp"
  noisy = lambda per_class, opt: (
    lambda s: (
      mlp(s)
      and s["noise"] > 0
      and (s["per_class"], s["opt"]) == (per_class, opt)
    )
  )
  says(
    "docs/guides/choosing_tau.md",
    f"it ranges from {span(lambda s: True)}:",
    f"{span(lambda s: mlp(s) and s['noise'] == 0)} on clean labels,",
    f"{span(noisy(1, 'sgd'))} with SGD on noisy microbatches of 10",
    f"{span(noisy(5, 'adamw'))} with adamw on noisy microbatches of 50",
  )


def test_choosing_tau_summary_counts():
  text = result("choosing_tau.md")
  auto = re.search(
    r"AutoTau within 1.5 points.*?: (\d+) of (\d+) settings; worst (-\d+\.\d)",
    text,
  )
  fixed = re.search(
    r"tau = 0.97 within 1.5 points.*?: (\d+) of (\d+); worst -(\d+\.\d)", text
  )
  says(
    "docs/guides/choosing_tau.md",
    f"in only {fixed[1]} of {fixed[2]} settings, and up to {fixed[3]}"
    " points behind",
    f"within 1.5 points of the best swept tau in {auto[1]} of {auto[2]}"
    " settings",
  )
  rows = tau_rows()
  noisy_mlp = [
    r
    for s, r in rows.items()
    if s.startswith("mlp") and _setting(s)["noise"] > 0
  ]
  gains = [float(r["− averaging"]) for r in noisy_mlp]
  says(
    "docs/guides/choosing_tau.md",
    f"better than averaging by {min(gains):.1f} to {max(gains):.1f} points in"
    f" all {len(gains)} noisy MLP settings",
  )
  clean = [
    float(r["− averaging"])
    for s, r in rows.items()
    if s.startswith("mlp") and _setting(s)["noise"] == 0
  ]
  says(
    "docs/guides/choosing_tau.md",
    f"costs {-max(clean):.1f} to {-min(clean):.1f} points on clean labels",
  )


def test_autotau_skip_rates_on_clean_labels():
  runs = json.loads(result("choosing_tau.json"))
  spans = {}
  for n in (2, 4):
    rates = []
    for name, setting in runs.items():
      s = _setting(name)
      if s["model"] == "mlp" and s["noise"] == 0 and s["n"] == n:
        auto = [
          r["skip_rate"] for r in setting["rows"] if r["method"] == "auto"
        ]
        rates.append(100 * statistics.mean(auto))
    spans[n] = f"{min(rates):.0f}-{max(rates):.0f}%"
  says(
    "docs/guides/choosing_tau.md",
    f"({spans[2]} of them at N = 2, {spans[4]} at N = 4)",
  )


def test_cnn_row():
  runs = json.loads(result("choosing_tau.json"))
  (name,) = [n for n in runs if n.startswith("cnn")]
  val = lambda m: (
    100
    * statistics.mean(
      r["val_acc"] for r in runs[name]["rows"] if r["method"] == m
    )
  )
  says(
    "docs/guides/choosing_tau.md",
    f"(0.97: {val('tau=0.97'):.1f}%; 0.6: {val('tau=0.6'):.1f}%)",
    f"ends at {val('auto'):.1f}%",
  )
  cnn = runs[name]
  runs_per_setting = len(cnn["rows"])
  per_step = cnn["seconds"] / (runs_per_setting * cnn["steps"])
  says(
    "docs/guides/choosing_tau.md",
    f"about {per_step:.2f} s per run and step, so that one setting"
    f" ({runs_per_setting} runs of {cnn['steps']} steps) took"
    f" {cnn['seconds'] / 60:.0f} minutes",
  )


# --- default_tau.md (issue 27) ----------------------------------------------


def _default_study():
  from benchmarks import default_tau

  results = json.loads(result("default_tau.json"))
  sweep = json.loads(result("choosing_tau.json"))
  return default_tau, results, default_tau.digits_rows(results, sweep)


def test_default_study_claims():
  dt, results, drows = _default_study()
  flax = {k.split("/", 1)[1]: e["rows"] for k, e in results.items()}

  def gap(key, method, step):
    rows = flax[key]
    return dt.mean_at(rows, method, step) - dt.mean_at(rows, "average", step)

  page = "docs/guides/choosing_tau.md"
  nnx, linen = "nnx/noise=0.4", "linen/noise=0.4"
  says(
    page,
    f"within a point of averaging at 500 steps and"
    f" {gap(nnx, 'warmup_auto', 4000):.1f} to"
    f" {gap(linen, 'warmup_auto', 4000):.1f} points ahead at 4000, where"
    f" `tau = 0.97` is {gap(nnx, 'tau=0.97', 4000):.1f} and"
    f" {gap(linen, 'tau=0.97', 4000):.1f} points ahead",
    f"at 1000 steps it is {-gap(linen, 'warmup_auto', 1000):.1f} points"
    " behind averaging",
    f"(the worst case is {-gap(nnx, 'warmup_auto_1000', 500):.1f} points"
    " behind, the NNX program at 500 steps)",
    f"at 4000 steps it is {gap(nnx, 'warmup_auto_1000', 4000):.1f} points"
    " ahead of averaging, short of 15",
  )
  assert gap(nnx, "warmup_auto", 500) >= -1.0  # "within a point"
  goals = {m: dt.goals(results, drows, m) for m in dt.POLICIES}
  digits = {m: g["digits"][1] for m, g in goals.items()}
  says(
    page,
    f"({digits['warmup_auto']} of 33) than `AutoTau()`"
    f" ({digits['auto']} of 33)",
    f"`WarmupAutoTau(warmup_steps=1000)` in {digits['warmup_auto_1000']}",
    f"in {goals['warmup_auto']['clean'][1]} of the 8 clean settings"
    f" (`AutoTau()`: {goals['auto']['clean'][1]})",
  )
  setting = drows["mlp/N=2/per_class=5/noise=0.4/adamw"]
  val = lambda m: dt.mean_at(setting, m, 2000)
  says(page, f"{val('warmup_auto'):.1f} against {val('auto'):.1f}")
  clean = "nnx/noise=0"
  says(
    page,
    f"({-gap(clean, 'tau=0.97', 2000):.1f} points behind the unchanged NNX"
    " program at 2000 steps;",
    f"`WarmupAutoTau()` is {-gap('linen/noise=0', 'warmup_auto', 1000):.1f}"
    " points behind averaging in the Linen program at 1000 and 2000 steps",
  )
  assert f"{gap('linen/noise=0', 'warmup_auto', 2000):.1f}" == (
    f"{gap('linen/noise=0', 'warmup_auto', 1000):.1f}"
  )
  rows = [
    r for k, e in results.items() if k.startswith("per_") for r in e["rows"]
  ]
  at = lambda m, step: dt.mean_at(rows, m, step)
  says(
    page,
    f"equals averaging for 500 steps ({at('warmup_auto', 500):.1f}%, where"
    f" `AutoTau()` has {at('auto', 500):.1f}%)",
    f"dips to {at('warmup_auto', 1000):.1f}% at 1000 steps",
    f"8000 steps ({at('warmup_auto', 4000):.1f}% and"
    f" {at('warmup_auto', 8000):.1f}%) is as good as the best swept tau",
  )
  for step in (4000, 8000):
    assert at("warmup_auto", step) >= dt.best_swept(rows, step)[1] - 0.5
  for step in (500, 1000, 2000):
    assert dt.best_swept(rows, step)[0] == "tau=0.97"


# --- nothing without a source -----------------------------------------------

# Numbers that are not measurements (defaults, versions, citations, the
# paper's figure) and numbers recomputed by a test above.
NOT_MEASURED = {
  "0.97",  # gaf's default tau
  "0.05",  # the soft rule's default temperature
  "3.11",  # the Python version
  "2412.18052",  # arXiv ids
  "2411.03742",
}
CHECKED_ABOVE = {
  "docs/guides/streaming.md": {"0.083", "7", "0.2", "0.4"},
  "docs/guides/choosing_tau.md": {"18.7"},
}
# A decimal, or a whole number with a unit of time, size, work or speed-up.
NUMBER = re.compile(
  r"(?<![\w.])\d+\.\d+(?![\w]|\.\d)"
  r"|(?<![\w.])\d+(?= ?(?:x|ms|s|MiB|MFLOP|minutes|min)\b)"
)


def _result_numbers() -> set[str]:
  numbers = set()
  for path in RESULTS.rglob("*.md"):
    numbers.update(re.findall(r"(?<![\w.])\d+(?:\.\d+)?", path.read_text()))
  return numbers


@pytest.mark.parametrize(
  "path", doc_files(), ids=lambda p: str(p.relative_to(ROOT))
)
def test_every_decimal_has_a_source(path):
  page = str(path.relative_to(ROOT))
  known = _result_numbers() | NOT_MEASURED | CHECKED_ABOVE.get(page, set())
  # Inline code (`tau=0.8`, `gaf(0.97)`) is code, not a claim.
  text = re.sub(r"`[^`]*`", "", prose(page))
  unsourced = [n for n in NUMBER.findall(text) if n not in known]
  assert not unsourced, (
    f"{page}: {unsourced} appear in no file under benchmarks/results/; quote"
    " a result file (or add a script that writes one)"
  )
