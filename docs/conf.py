"""Sphinx configuration of the optax_gaf docs.

Build (offline, warnings are errors)::

  pip install -e ".[docs]"
  sphinx-build -W -b html docs docs/_build/html

``docs/_ext/gaf_docs.py`` generates ``api.rst`` from ``optax_gaf.__all__``
and copies ``notebooks/*.ipynb`` into ``_notebooks/`` at the start of every
build; autosummary writes the per-name pages into ``_autosummary/``. All
three are gitignored. The notebooks render from their stored outputs (the
test suite executes them).
"""

import pathlib
import sys

DOCS = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS.parent))  # optax_gaf from this checkout
sys.path.insert(0, str(DOCS / "_ext"))

import optax_gaf  # noqa: E402

project = "optax_gaf"
author = "the optax_gaf authors"
copyright = "2024-2026, the optax_gaf authors"
release = version = optax_gaf.__version__

extensions = [
  "sphinx.ext.autodoc",
  "sphinx.ext.autosummary",
  "sphinx.ext.napoleon",
  "sphinx.ext.mathjax",
  # MathJax 3 shipped in the package and copied into _static/: math renders
  # with no network.
  "sphinx-mathjax-offline",
  "sphinx.ext.viewcode",
  "myst_nb",
  "gaf_docs",
]

exclude_patterns = [
  "_build",
  "_templates",
  "_ext",
  "_examples/gallery.md",  # included by examples.md, not a page of its own
  "**/.ipynb_checkpoints",
  "Thumbs.db",
  ".DS_Store",
]
templates_path = ["_templates"]

# -- API pages: autodoc + autosummary + napoleon (Google style) ------------
autosummary_generate = True
autosummary_imported_members = True
autodoc_member_order = "bysource"
# The docstrings give shapes and dtypes in words; the annotations (jax.Array,
# optax.ScalarOrSchedule unions) would only clutter the signatures.
autodoc_typehints = "none"
autodoc_preserve_defaults = True
add_module_names = False
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = False  # Attributes: -> .. attribute:: (linkable fields)
napoleon_use_rtype = False
napoleon_attr_annotations = False

# -- MyST and notebooks ------------------------------------------------------
myst_enable_extensions = ["dollarmath", "colon_fence", "deflist"]
myst_heading_anchors = 3
nb_execution_mode = "off"  # render the stored outputs
nb_merge_streams = True
# Markdown outputs (e.g. a results table shown with IPython.display.Markdown)
# are parsed as MyST, which has tables; the default, commonmark, has none.
nb_render_markdown_format = "myst"

# -- HTML ----------------------------------------------------------------------
html_theme = "sphinx_book_theme"
html_title = f"optax_gaf {release}"
html_theme_options = {
  "home_page_in_toc": True,
  "show_navbar_depth": 1,
  "show_toc_level": 2,
  # No GitHub, download or launch buttons: they need the network.
  "use_download_button": False,
  "use_fullscreen_button": True,
}
# One search box: the header's (the sidebar's default field would be a second).
html_sidebars = {"**": ["navbar-logo.html", "sbt-sidebar-nav.html"]}
html_static_path = ["_static"]
html_css_files = ["gaf.css"]
html_js_files = ["gaf.js"]
# No intersphinx: the build must work offline.
