"""Sphinx configuration for raycache's documentation site.

Built in CI with warnings as errors (``sphinx-build -W``). Pages are Markdown (MyST); the API
reference comes from the numpydoc docstrings; the configuration reference is generated from
``raycache.config``'s key tables at build time (``_ext/config_keys.py``), so the two cannot drift.
"""

import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS / "_ext"))
sys.path.insert(0, str(DOCS.parent))

project = "raycache"
author = "the raycache developers"
copyright = "2026, the raycache developers"

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "numpydoc",
    "config_keys",
]

source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build", "_generated", "benchmarks-template.md"]
myst_enable_extensions = ["colon_fence"]
myst_heading_anchors = 3

numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
autodoc_member_order = "bysource"

html_theme = "alabaster"
html_static_path = ["_static"]
html_theme_options = {"description": "A training-data cache in Ray's shared object store"}
