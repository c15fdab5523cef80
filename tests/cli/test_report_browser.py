"""The bundled report in headless Chromium: clean page, no outside requests, every image loaded, no raw
Markdown in the visible text, working contents links, and the token explorer showing five class names."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from browser_utils import open_browser
from conftest import BUNDLED_REPORT

from captum_clsemb.demo import load_demo_config


@pytest.mark.xdist_group(BUNDLED_REPORT)
def test_bundled_report_in_chromium(bundled_report: dict, tmp_path: Path) -> None:
    # the report shared with the other report tests (tests/conftest.py)
    names = set(load_demo_config()["class_names"])
    with open_browser(1200, 900) as browser:
        page = browser.open(bundled_report["out"] / "report.html")
        # every image, the figures and the explorer's, decoded
        assert page.locator("figure img").count() == 11
        assert browser.broken_images() == []
        # what a reader sees holds no Markdown: no pipe tables, no emphasis stars, no heading hashes
        text = page.inner_text("body")
        assert "|---" not in text and "**" not in text
        assert not re.search(r"^\s*\|.*\|.*\|\s*$", text, flags=re.M)
        assert not re.search(r"^#{1,6} ", text, flags=re.M)
        # the table of contents reaches every section
        links = page.eval_on_selector_all("nav#contents a", "els => els.map(e => e.getAttribute('href'))")
        assert "#claims" in links and "#token_explorer" in links and len(links) >= 8
        for href in links:
            assert page.locator(href).count() == 1, href
        page.click('nav#contents a[href="#mechanisms"]')
        assert page.evaluate("location.hash") == "#mechanisms"
        # every figure has a caption under it
        assert page.locator("figure figcaption").count() == page.locator("figure").count()

        # the token explorer: hovering a patch shows that token's five classes
        explorer = page.locator("#token_explorer")
        explorer.scroll_into_view_if_needed()
        page.hover('.clsemb-ex-patch[data-token="28"]')  # row 4, column 4 of the 8 x 8 grid
        assert page.inner_text(".clsemb-ex-token-title").startswith("patch row 4, column 4")
        shown = page.eval_on_selector_all(
            ".clsemb-ex-top .clsemb-ex-name", "els => els.map(e => e.textContent)"
        )
        assert len(shown) == 5 and len(set(shown)) == 5 and set(shown) <= names
        page.hover('.clsemb-ex-patch[data-token="1"]')
        other = page.eval_on_selector_all(
            ".clsemb-ex-top .clsemb-ex-name", "els => els.map(e => e.textContent)"
        )
        assert len(other) == 5 and page.inner_text(".clsemb-ex-token-title").startswith(
            "patch row 1, column 1"
        )

        # one screenshot per section, as a reader sees it
        for sid in page.eval_on_selector_all("body > section", "els => els.map(e => e.id)"):
            page.locator(f"#{sid}").screenshot(path=str(tmp_path / f"{sid}.png"))
        browser.assert_clean()  # no console errors, page errors or outside requests
    assert len(list(tmp_path.glob("*.png"))) >= 8
