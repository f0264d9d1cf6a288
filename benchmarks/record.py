"""Runs a program and commits what it printed as a result file.

The docs quote numbers that example programs print (the Quickstart's table,
the data-parallel example's accuracy) or that a benchmark prints without
writing a file. This wraps such a run: it writes the command, the machine,
the load average before and after, the wall time and the program's output
into a Markdown file under ``benchmarks/results/``, where the docs (and
``tests/docs/test_doc_numbers.py``) read them.

Run from the repository root::

  python -m benchmarks.record benchmarks/results/quickstart.md \\
    python examples/noisy_labels.py --out runs/quickstart
"""

import os
import platform
import shlex
import subprocess
import sys
import time


def machine() -> str:
  return (
    f"{platform.machine()}, {os.cpu_count()} CPU cores,"
    f" Python {platform.python_version()}"
  )


def load() -> str:
  return f"{os.getloadavg()[0]:.1f}"


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  if len(argv) < 2:
    sys.exit("usage: python -m benchmarks.record OUT.md COMMAND [ARGS...]")
  out, command = argv[0], argv[1:]
  before = load()
  start = time.perf_counter()
  run = subprocess.run(command, capture_output=True, text=True, check=False)
  seconds = time.perf_counter() - start
  after = load()
  sys.stdout.write(run.stdout)
  sys.stderr.write(run.stderr)
  if run.returncode:
    sys.exit(f"{shlex.join(command)} failed ({run.returncode}): no file")
  text = (
    f"`{shlex.join(command)}`, recorded with `python -m benchmarks.record`.\n"
    f"Machine: {machine()}. Load average (1 min): {before} before,"
    f" {after} after. Wall time: {seconds:.0f} s.\n\n"
    f"```text\n{run.stdout.rstrip()}\n```\n"
  )
  os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
  with open(out, "w") as f:
    f.write(text)
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
