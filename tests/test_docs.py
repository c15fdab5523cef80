"""The Sphinx documentation builds with warnings as errors (skipped without the docs extras)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

for _module in ("sphinx", "furo", "myst_nb", "sphinx_autodoc_typehints"):
    pytest.importorskip(_module)

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("docs")
    html = out / "html"
    cmd = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
           "-d", str(out / "doctrees"), str(DOCS), str(html)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"sphinx-build failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    return html


def test_build_has_every_page_of_the_toctrees(built: Path) -> None:
    # Every document listed in a toctree of index.rst was written.
    index = (DOCS / "index.rst").read_text()
    entries = re.findall(r"^   (\S+)$", index, flags=re.M)
    assert "api/index" in entries and "concepts" in entries
    for entry in entries:
        assert (built / f"{entry}.html").is_file(), entry


def test_api_reference_is_autodoc_generated(built: Path) -> None:
    attr = (built / "api" / "attr.html").read_text()
    # autodoc rendered the class signature and the docstring's own text
    assert 'id="captum_clsemb.attr.blockwise_identifiability.BlockwiseIdentifiability"' in attr
    assert "Class identifiability of every token" in attr
    trace = (built / "api" / "trace.html").read_text()
    assert 'id="captum_clsemb.trace.trace"' in trace


def test_tutorials_render_their_stored_outputs(built: Path) -> None:
    notebooks = sorted((ROOT / "tutorials").glob("*.ipynb"))
    assert notebooks
    for nb in notebooks:
        page = built / "tutorials" / f"{nb.stem}.html"
        assert page.is_file(), page
        # figures stored in the notebook appear as images (outputs rendered, not executed)
        assert re.search(r"<img[^>]+\.png", page.read_text()), nb.name


def test_comparison_page_keeps_the_results_section(built: Path) -> None:
    page = (built / "comparison.html").read_text()
    assert 'id="comparison-results"' in page
    assert "benchmarks/compare_cifar10.py" in page
