"""Sphinx configuration for captum-clsemb.

Build (warnings are errors)::

    sphinx-build -W --keep-going -b html docs docs/_build/html

The build works offline and the pages it writes load nothing from the network: MathJax is
shipped in ``_static/mathjax`` (``sphinx-mathjax-offline``).

The tutorials are rendered from ``tutorials/*.ipynb`` with their stored outputs: the
notebooks are copied into ``docs/tutorials/`` (ignored by git) when the build starts, and
myst-nb never executes them (``nb_execution_mode = "off"``). Re-execute them from their
Jupytext sources with ``python tutorials/execute.py``.

The figures of the attribution, metric and analysis pages are computed during the build on
the bundled model and images, by the ``plot`` directive (``matplotlib.sphinxext.plot_directive``)
calling the functions of ``docs/_figures.py``.
"""

from __future__ import annotations

import shutil
import sys
import warnings
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(DOCS))  # _figures, for the plot directives

import captum_clsemb  # noqa: E402

# sphinx-autodoc-typehints 3.6 calls an API that Sphinx 9 deprecates; not our concern here.
warnings.filterwarnings("ignore", message=r".*set_application.* is deprecated", category=Warning)

project = "captum-clsemb"
author = "captum-clsemb contributors"
copyright = "2025, captum-clsemb contributors"
release = captum_clsemb.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx_autodoc_typehints",
    "sphinx.ext.viewcode",
    "sphinx.ext.mathjax",
    "sphinx-mathjax-offline",  # MathJax shipped in _static/mathjax: formulas render offline
    "matplotlib.sphinxext.plot_directive",
    "myst_nb",
]

source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "**.ipynb_checkpoints"]

# -- autodoc --------------------------------------------------------------------------------
# Our classes document their constructor arguments in the class docstring; "both" would
# append the __init__ docstring inherited from Captum's Attribution.
autoclass_content = "class"
autodoc_inherit_docstrings = False
autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "show-inheritance": False}
autodoc_typehints = "description"
autodoc_preserve_defaults = True
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_custom_sections = [
    # ModelAdapter documents the attributes its subclasses set under this heading.
    ("Attributes set by subclasses", "params_style"),
    # Our Returns sections are prose in Captum's style ("*Tensor* (N, 1, h, w): ...");
    # napoleon's "type: description" parsing would split them at the first colon.
    "Returns",  # rendered as a generic section: the text as written
]
typehints_use_signature = False
typehints_document_rtype = True
always_document_param_types = False
# torch / timm / captum types are shown by name; we do not fetch other projects' inventories
# (the build must work offline).
nitpicky = False

# Docstrings write the number of classes as |C| (the paper's notation): keep it literal.
rst_prolog = r"""
.. |C| replace:: \|C\|
"""

# -- notebooks ------------------------------------------------------------------------------
nb_execution_mode = "off"  # render the stored outputs; never execute during the docs build
nb_merge_streams = True
myst_enable_extensions = ["dollarmath", "amsmath"]
suppress_warnings = ["mystnb.unknown_mime_type"]

# -- figures (plot directive) -----------------------------------------------------------------
# One PNG per figure, no source code or download links under it: the pages show their own
# code examples, and docs/_figures.py says how each figure is made.
plot_formats = [("png", 100)]
plot_include_source = False
plot_html_show_formats = False
plot_html_show_source_link = False
plot_pre_code = ""

# -- HTML -----------------------------------------------------------------------------------
html_theme = "furo"
html_title = f"captum-clsemb {release}"
html_static_path = ["_static"]
html_css_files = ["custom.css"]
pygments_style = "sphinx"


def _copy_tutorials() -> None:
    """Mirror ``tutorials/*.ipynb`` into ``docs/tutorials/`` (only files that changed)."""
    src, dst = ROOT / "tutorials", DOCS / "tutorials"
    dst.mkdir(exist_ok=True)
    wanted = {p.name for p in src.glob("*.ipynb")}
    for stale in dst.glob("*.ipynb"):
        if stale.name not in wanted:
            stale.unlink()
    for nb in src.glob("*.ipynb"):
        target = dst / nb.name
        if not target.exists() or target.read_bytes() != nb.read_bytes():
            shutil.copyfile(nb, target)


def _write_toplevel_table() -> None:
    """``api/_toplevel.inc``: every name of ``captum_clsemb.__all__`` with a link to its definition."""
    rows = []
    for name in captum_clsemb.__all__:
        if name.startswith("__"):
            continue
        obj = getattr(captum_clsemb, name)
        # Documented where the API pages put it: attribution classes under their own module
        # (api/attr.rst), everything else under the package that exports it.
        package = captum_clsemb._LAZY.get(name, obj.__module__)
        module = obj.__module__ if package == "captum_clsemb.attr" else package
        target = f"{module}.{obj.__qualname__}"
        if isinstance(obj, type):
            role = "exc" if issubclass(obj, BaseException) else "class"
        else:
            role = "func"
        rows.append(f"   * - :py:{role}:`~{target}`\n     - ``{module}``")
    table = [
        ".. list-table::",
        "   :header-rows: 1",
        "   :widths: 40 60",
        "",
        "   * - name",
        "     - documented in",
    ]
    text = "\n".join(table + rows) + "\n"
    out = DOCS / "api" / "_toplevel.inc"
    if not out.exists() or out.read_text() != text:
        out.write_text(text)


_copy_tutorials()
_write_toplevel_table()


# Pages whose figures are computed by docs/_figures.py (plot directives with ``:context:``,
# which always re-run): re-read on every build, since the figures depend on the package and
# the bundled model, not only on the page's text.
FIGURE_SECTIONS = ("attributions", "metrics", "analyses")


def _redraw_figures(app, env, added, changed, removed) -> list[str]:
    return sorted(doc for doc in env.found_docs if doc.split("/")[0] in FIGURE_SECTIONS)


def setup(app) -> None:
    app.connect("env-get-outdated", _redraw_figures)
