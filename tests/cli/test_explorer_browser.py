"""The token explorer in headless Chromium on the bundled model: what a reader sees equals the numbers
of an independent Python computation (forward hooks and the model's own head), with no console errors
and no request leaving the page."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
import torch
from browser_utils import open_browser
from test_explorer import hooked_lens_logits

from captum_clsemb.cli.explorer import explorer_data, render_explorer_page
from captum_clsemb.demo import load_demo_config, load_demo_images, load_demo_model

IMAGES = [0, 2, 3, 5, 7, 9]  # one bundled image each of six classes


@pytest.fixture(scope="module")
def bundled() -> dict:
    config = load_demo_config()
    x, labels, paths = load_demo_images(max_per_class=1)
    x, labels = x[IMAGES], labels[IMAGES]
    model = load_demo_model("timm")
    data = explorer_data(model, x, labels, config["class_names"], config["mean"], config["std"],
                         image_names=[paths[i].name for i in IMAGES])  # fmt: skip
    logits = hooked_lens_logits(model, x)  # (N, blocks, T, C), independent of the traced forward
    rank = (logits > logits.gather(-1, labels.view(-1, 1, 1, 1).expand(*logits.shape[:-1], 1))).sum(-1)
    return dict(
        data=data, probs=logits.softmax(-1), r=1 - rank / logits.shape[-1], names=config["class_names"]
    )


def expected(bundled: dict, image: int, block: int, token: int) -> tuple[list[str], list[float], float]:
    """Top-5 class names and probabilities and the target's r of one token (block 0-based)."""
    p = bundled["probs"][image, block, token]
    top = p.topk(5)
    return (
        [bundled["names"][c] for c in top.indices],
        top.values.tolist(),
        float(bundled["r"][image, block, token]),
    )


def shown(page) -> tuple[list[str], list[float], float, str]:
    names = page.eval_on_selector_all(".clsemb-ex-top .clsemb-ex-name", "els => els.map(e => e.textContent)")
    scores = page.eval_on_selector_all(
        ".clsemb-ex-top .clsemb-ex-score", "els => els.map(e => e.textContent)"
    )
    r_text = page.inner_text(".clsemb-ex-r")
    title = page.inner_text(".clsemb-ex-token-title")
    r = float(re.search(r"r = ([0-9.]+)", r_text).group(1))
    return names, [float(s.rstrip("%")) / 100 for s in scores], r, title


def check_token(page, bundled: dict, image: int, block: int, token: int) -> list[str]:
    names, scores, r, title = shown(page)
    want_names, want_scores, want_r = expected(bundled, image, block, token)
    assert len(names) == 5
    assert names == want_names, (image, block, token)
    # stored with 4 decimals, shown as a percentage with one decimal: two roundings
    assert scores == pytest.approx(want_scores, abs=0.0005 + 0.00005 + 1e-6)
    assert r == pytest.approx(want_r, abs=0.005 + 1e-6)
    assert title.endswith(f"block {block + 1}")
    return names


def test_explorer_in_chromium(bundled: dict, tmp_path: Path) -> None:
    start = time.perf_counter()
    data = bundled["data"]
    page_file = tmp_path / "explorer.html"
    page_file.write_text(render_explorer_page(data), encoding="utf-8")
    blocks = data["num_blocks"]
    with open_browser(1100, 800) as browser:
        page = browser.open(page_file)
        page.wait_for_selector(".clsemb-ex-patch")
        assert page.locator(".clsemb-ex-patch").count() == 64
        assert browser.broken_images() == []
        # the initial view: the class token of the first image after the last block
        assert page.inner_text(".clsemb-ex-token-title") == f"class token · block {blocks}"
        check_token(page, bundled, 0, blocks - 1, 0)

        # hover a patch: row 4, column 6 of the 8 x 8 grid is token 1 + 3 * 8 + 5
        token = 1 + 3 * 8 + 5
        page.hover(f'.clsemb-ex-patch[data-token="{token}"]')
        last = check_token(page, bundled, 0, blocks - 1, token)
        assert page.inner_text(".clsemb-ex-token-title").startswith("patch row 4, column 6")
        bars = page.eval_on_selector_all(
            ".clsemb-ex-spark rect.clsemb-ex-sbar",
            "els => els.map(e => e.querySelector('title').textContent)",
        )
        assert bars == [f"block {b + 1}: r = {float(bundled['r'][0, b, token]):.2f}" for b in range(blocks)]

        # pin it, then go to block 2 with the keyboard on the slider
        page.click(f'.clsemb-ex-patch[data-token="{token}"]')
        page.focus(".clsemb-ex-block")
        page.keyboard.press("Home")
        page.keyboard.press("ArrowRight")
        assert page.inner_text(".clsemb-ex-block-out") == f"block 2 of {blocks}"
        early = check_token(page, bundled, 0, 1, token)
        assert early != last  # this token's classes change between block 2 and the last block
        assert page.get_attribute(".clsemb-ex-current", "data-block") == "2"

        # the class token button, at block 2
        page.click('.clsemb-ex-token-btn[data-token="0"]')
        assert page.inner_text(".clsemb-ex-token-title") == "class token · block 2"
        check_token(page, bundled, 0, 1, 0)

        # another image: the class token after the last block is the model's prediction
        page.select_option(".clsemb-ex-image", index=3)
        page.fill(".clsemb-ex-block", str(blocks))
        names = check_token(page, bundled, 3, blocks - 1, 0)
        assert names[0] == data["class_names"][data["images"][3]["prediction"]]
        assert browser.broken_images() == []

        # arrow keys move between patches: from row 1, column 1 one step right and one down
        page.focus('.clsemb-ex-patch[data-token="1"]')
        page.keyboard.press("ArrowRight")
        page.keyboard.press("ArrowDown")
        assert page.evaluate("document.activeElement.getAttribute('data-token')") == str(1 + 8 + 1)
        check_token(page, bundled, 3, blocks - 1, 1 + 8 + 1)

        # patch colours follow r at the chosen block (viridis: r = 1 is yellow, low r is purple)
        colours = page.eval_on_selector_all(
            ".clsemb-ex-patch", "els => els.map(e => getComputedStyle(e).backgroundColor)"
        )
        r_block = bundled["r"][3, blocks - 1, 1:]
        rgb = torch.tensor([[int(v) for v in re.findall(r"\d+", c)[:3]] for c in colours]).float()
        top, low = r_block == 1, r_block <= 0.3
        assert top.any() and low.any()
        assert rgb[top, 2].max() < rgb[low, 2].min()  # less blue where the target is top-1
        page.screenshot(path=str(tmp_path / "explorer.png"), full_page=True)
        browser.assert_clean()
    assert time.perf_counter() - start < 30


def test_browser_helper_reports_outside_requests_and_errors(tmp_path: Path) -> None:
    """The checks above can fail: a page that fetches from outside and logs errors is caught."""
    page_file = tmp_path / "bad.html"
    page_file.write_text(
        "<!doctype html><html><body><img src='https://example.invalid/x.png'>"
        "<img src='missing.png'><script>console.error('boom'); undefinedFunction();</script></body></html>"
    )
    with open_browser() as browser:
        browser.open(page_file)
        assert browser.blocked_requests == ["https://example.invalid/x.png"]
        assert any("boom" in m for m in browser.console_errors)
        assert any("undefinedFunction" in m for m in browser.page_errors)
        assert len(browser.broken_images()) == 2
        with pytest.raises(AssertionError, match="outside request"):
            browser.assert_clean()
