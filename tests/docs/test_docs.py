"""Every Python block in the top-level *.md files and docs/**/*.md runs.

The blocks are found with markdown-it-py, the parser MyST itself builds on,
so what runs here is what the site shows. The blocks of one file run in
order in one namespace, like the cells of a notebook: a page may open with a
visible setup block (a toy model, ``params``, ``loss_fn``, ``batch``) that the
later blocks use.

A block runs when its fence says ``python`` (or ``py``). To show Python that
must not run, say so in the fence: ```` ```python notest ````. Other
languages (``bash``, ``text``) and MyST directives (``{code-block}``,
``{include}``) never run. New pages under docs/ are picked up by the glob.
"""

import os
import pathlib
import re
import traceback

import markdown_it
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
RUNNABLE = {"python", "py", "python3"}
# Directives whose body is Markdown (admonitions and the like) may hold code
# blocks; these ones hold something else.
NOT_MARKDOWN = {
  "{code-block}",
  "{code}",
  "{code-cell}",
  "{include}",
  "{literalinclude}",
  "{toctree}",
  "{eval-rst}",
  "{math}",
}


def doc_files() -> list[pathlib.Path]:
  """README.md and its siblings, and every page of the docs (not generated)."""
  docs = ROOT / "docs"
  pages = [
    p
    for p in sorted(docs.rglob("*.md"))
    if not any(part.startswith("_") for part in p.relative_to(docs).parts)
  ]
  return [*sorted(ROOT.glob("*.md")), *pages]


def python_blocks(text: str, first_line: int = 1):
  """(line, source, runnable) of every Python fence, in order.

  ``line`` is the 1-based line of the fence in the file.
  """
  parser = markdown_it.MarkdownIt("commonmark")
  for token in parser.parse(text):
    if token.type != "fence" or token.map is None:
      continue
    words = token.info.split()
    name = words[0] if words else ""
    line = first_line + token.map[0]
    if name.startswith("{") and name not in NOT_MARKDOWN:
      body = [
        "" if row.startswith(":") else row for row in token.content.split("\n")
      ]
      yield from python_blocks("\n".join(body), line + 1)
    elif name in RUNNABLE:
      yield line, token.content, "notest" not in words[1:]


def run_blocks(path: pathlib.Path) -> int:
  """Runs the file's runnable blocks in one namespace; returns how many ran."""
  namespace = {"__name__": f"docs:{path.name}"}
  ran = 0
  for line, source, runnable in python_blocks(path.read_text()):
    if not runnable:
      continue
    # Pad so that a traceback names the line in the Markdown file.
    code = compile("\n" * line + source, str(path), "exec")
    error = None
    try:
      exec(code, namespace)  # noqa: S102
    except Exception as e:  # reported below, with the block's file and line
      error = "".join(traceback.format_exception(e))
    if error is not None:
      rel = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
      pytest.fail(
        f"the Python block at {rel}:{line} failed:\n{error}", pytrace=False
      )
    ran += 1
  return ran


FILES = [
  p
  for p in doc_files()
  if any(runnable for _, _, runnable in python_blocks(p.read_text()))
]


@pytest.mark.parametrize(
  "path", FILES, ids=[str(p.relative_to(ROOT)) for p in FILES]
)
def test_python_blocks_run(path):
  assert run_blocks(path) > 0, f"{path} has Python blocks but none ran"


def test_collector_finds_the_pages_and_their_blocks():
  names = {str(p.relative_to(ROOT)) for p in doc_files()}
  assert {
    "README.md",
    "CONTRIBUTING.md",
    "docs/index.md",
    "docs/guides/streaming.md",
  } <= names
  assert not any("/_" in name for name in names)  # no generated pages
  total = sum(len(list(python_blocks(p.read_text()))) for p in doc_files())
  assert total >= 23  # the issue counted 23 when it was filed


def test_a_broken_block_fails_and_names_its_line(tmp_path):
  page = tmp_path / "page.md"
  page.write_text(
    "# A page\n\n```python\nx = 1\n```\n\n"
    "```python notest\nnot run\n```\n\n"
    "````{note}\n```python\ny = x + undefined_name\n```\n````\n"
  )
  blocks = list(python_blocks(page.read_text()))
  assert [(line, runnable) for line, _, runnable in blocks] == [
    (3, True),
    (7, False),
    (12, True),
  ]
  with pytest.raises(pytest.fail.Exception, match=r"page.md:12 failed"):
    run_blocks(page)


# Written by the docs build (gitignored): not there in the repository view.
GENERATED = [
  ROOT / "docs" / name
  for name in ("_build", "_notebooks", "_examples", "_autosummary", "api.rst")
]


def _links(text: str):
  """Relative link targets of a Markdown text (no URLs, no bare #anchors)."""
  tokens = markdown_it.MarkdownIt("commonmark").parse(text)
  for token in tokens:
    for child in token.children or ():
      href = child.attrGet("href") if child.type == "link_open" else None
      src = child.attrGet("src") if child.type == "image" else None
      target = href or src
      if target and not re.match(r"[a-z]+:|#", target):
        yield target.split("#")[0]


@pytest.mark.parametrize(
  "path", doc_files(), ids=lambda p: str(p.relative_to(ROOT))
)
def test_links_resolve_in_the_repository_view(path):
  """The pages read in the repository view: every relative link exists."""

  def found(target):
    full = pathlib.Path(os.path.normpath(path.parent / target))
    generated = any(full.is_relative_to(g) for g in GENERATED)
    return full.exists() and not generated  # the docs build makes those

  broken = [t for t in _links(path.read_text()) if not found(t)]
  assert not broken, f"{path.relative_to(ROOT)} links to missing {broken}"
