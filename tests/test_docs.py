"""The Sphinx documentation builds with warnings as errors (skipped without the docs extras).

The built pages must work offline: no script, stylesheet, image or frame from the network,
MathJax shipped with them, and a figure computed during the build on every attribution,
metric and analysis page. When Playwright and a Chromium are installed, a headless browser
opens the pages with the network cut off and checks that the formulas are typeset and the
figures load.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

for _module in ("sphinx", "furo", "myst_nb", "sphinx_autodoc_typehints", "sphinx-mathjax-offline"):
    pytest.importorskip(_module)

# one worker builds the docs once for all the tests of this file (pytest-xdist, --dist loadgroup)
pytestmark = pytest.mark.xdist_group("docs")
ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
# Every page of these sections shows a figure computed during the build.
METHOD_PAGES = sorted(
    p.relative_to(DOCS).with_suffix("").as_posix()
    for section in ("attributions", "metrics", "analyses")
    for p in (DOCS / section).glob("*.rst")
)
MATHJAX = "_static/mathjax/tex-chtml.js"
# An element that makes the browser fetch something, pointing at another host.
EXTERNAL = re.compile(
    r"<(script|link|img|iframe|source|embed|video|audio)\b[^>]*\b(src|href|srcset)\s*=\s*[\"']?\s*(https?:)?//",
    re.IGNORECASE,
)


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


def _html_pages(built: Path) -> list[Path]:
    return sorted(p for p in built.rglob("*.html") if "_static" not in p.parts)


def test_pages_load_nothing_from_the_network(built: Path) -> None:
    pages = _html_pages(built)
    assert len(pages) > 30
    offending = {
        str(p.relative_to(built)): m.group(0)[:120]
        for p in pages
        for m in [EXTERNAL.search(p.read_text())]
        if m
    }
    assert not offending, offending
    # stylesheets shipped with the pages import nothing from the network either
    for css in built.glob("_static/**/*.css"):
        assert not re.search(r"(@import|url\()\s*[\"']?\s*(https?:)?//", css.read_text()), css.name


def test_external_pattern_matches_what_it_must() -> None:
    # the pattern the test above relies on, on the tags a CDN set-up writes
    assert EXTERNAL.search(
        '<script defer="defer" src="https://cdn.jsdelivr.net/npm/mathjax@4/tex-mml-chtml.js">'
    )
    assert EXTERNAL.search('<link rel="stylesheet" href="//fonts.example.org/a.css" />')
    assert not EXTERNAL.search('<a href="https://arxiv.org/abs/2310.18969">')  # a link, not a fetch
    assert not EXTERNAL.search('<script src="_static/mathjax/tex-chtml.js">')


def test_mathjax_is_shipped_with_the_pages(built: Path) -> None:
    js = built / MATHJAX
    assert js.is_file() and js.stat().st_size > 10_000
    # MathJax 3's CommonHTML output loads its fonts relative to the script
    assert list((built / "_static" / "mathjax" / "output" / "chtml" / "fonts" / "woff-v2").glob("*.woff"))
    with_math = [p for p in _html_pages(built) if 'class="math' in p.read_text()]
    assert any(p.name == "concepts.html" for p in with_math)
    for page in with_math:
        srcs = re.findall(r'<script[^>]*src="([^"]*mathjax[^"]*)"', page.read_text())
        assert srcs, f"{page.name} has formulas but no MathJax script"
        for src in srcs:
            assert (page.parent / src.split("?")[0]).resolve() == js.resolve(), (page.name, src)


def test_method_pages_show_a_figure_made_during_the_build(built: Path) -> None:
    from PIL import Image

    assert len(METHOD_PAGES) == 14 and "attributions/class_embedding_gradient" in METHOD_PAGES
    for name in METHOD_PAGES:
        html = (built / f"{name}.html").read_text()
        # images written by the plot directive: computed by docs/_figures.py at build time
        srcs = re.findall(r'<img[^>]*class="plot-directive"[^>]*src="([^"]+\.png)"', html)
        assert srcs, f"{name} shows no figure"
        for src in srcs:
            png = (built / name).parent / src
            assert png.is_file(), f"{name}: {src} was not written"
            with Image.open(png) as im:
                assert min(im.size) >= 300, (name, src, im.size)
                darkest, lightest = im.convert("L").getextrema()
                assert lightest - darkest > 100, (name, src)  # not a blank canvas
        assert "<figcaption>" in html and "bundled" in html.split("<figcaption>")[1], name


def _chromium() -> str | None:
    return os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


def test_formulas_typeset_and_figures_load_offline_in_a_browser(built: Path) -> None:
    playwright = pytest.importorskip("playwright.sync_api")
    executable = _chromium()
    if executable is None:
        pytest.skip("no chromium executable (set CHROMIUM or install the chromium package)")
    pages = ["concepts", "attributions/blockwise_identifiability", *METHOD_PAGES]
    requests, errors, failures = [], [], []
    with playwright.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        page = browser.new_page()
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)

        def offline(route) -> None:
            if route.request.url.startswith("file://"):
                route.continue_()
            else:  # the network is cut off: record the attempt
                requests.append(route.request.url)
                route.abort()

        page.route("**/*", offline)
        for name in dict.fromkeys(pages):
            page.goto((built / f"{name}.html").as_uri())
            page.wait_for_load_state("load")
            state = page.evaluate(
                r"""async () => {
                    const math = document.querySelectorAll('.math').length;
                    // without MathJax (not shipped, or not loaded) nothing gets typeset
                    if (math && window.MathJax && window.MathJax.startup) { await window.MathJax.startup.promise; }
                    const images = [...document.images];
                    return {
                        math,
                        typeset: document.querySelectorAll('mjx-container').length,
                        raw: /\\(frac|mathbf|operatorname)\b/.test(document.body.innerText),
                        broken: images.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src),
                        figures: images.filter(i => i.classList.contains('plot-directive')).length,
                    };
                }"""
            )
            if state["typeset"] < state["math"] or state["raw"] or state["broken"]:
                failures.append((name, state))
            if name in METHOD_PAGES and not state["figures"]:
                failures.append((name, "no figure"))
        browser.close()
    assert not requests, requests
    assert not errors, errors
    assert not failures, failures
