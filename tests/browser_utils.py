"""Headless Chromium for browser tests: no network, every console error and outside request recorded.

Usage::

    from browser_utils import open_browser

    def test_page(tmp_path):
        html = tmp_path / "page.html"
        html.write_text(...)
        with open_browser() as browser:       # skips the test when Playwright or Chromium is missing
            page = browser.open(html)         # file:// URL; waits for the load event
            page.hover(".some-selector")
            ...
            browser.assert_clean()            # no console errors, page errors or outside requests

Chromium is ``/usr/bin/chromium`` (Debian package ``chromium``) or ``$CLSEMB_CHROMIUM``.
Requests whose URL is not ``file:`` or ``data:`` (or ``about:``, ``blob:``) are aborted and listed in
``browser.blocked_requests``; the browser runs with a new empty profile and background networking off.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

CHROMIUM = Path(os.environ.get("CLSEMB_CHROMIUM", "/usr/bin/chromium"))  # the Debian package
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
LOCAL_SCHEMES = ("file:", "data:", "about:", "blob:")


@dataclass
class BrowserSession:
    """One browser page with what it logged; see :func:`open_browser`."""

    page: object  # playwright.sync_api.Page
    console_errors: list[str] = field(default_factory=list)
    console_warnings: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    blocked_requests: list[str] = field(default_factory=list)
    failed_requests: list[str] = field(default_factory=list)

    def open(self, path: str | Path) -> object:
        """Load a local HTML file (or a URL string) and wait until it and its resources have loaded."""
        url = path if isinstance(path, str) and ":" in path.split("/")[0] else Path(path).resolve().as_uri()
        self.page.goto(url, wait_until="load")
        return self.page

    def broken_images(self) -> list[str]:
        """The ``src`` of every ``<img>`` on the page that did not load (or decoded to zero size)."""
        return self.page.evaluate(
            "() => Array.from(document.images)"
            ".filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.currentSrc || i.src)"
        )

    def problems(self) -> list[str]:
        """Everything that makes a page unclean, one line each."""
        return (
            [f"console error: {m}" for m in self.console_errors]
            + [f"page error: {m}" for m in self.page_errors]
            + [f"outside request (blocked): {u}" for u in self.blocked_requests]
            + [f"failed request: {u}" for u in self.failed_requests]
        )

    def assert_clean(self) -> None:
        """Fail with the full list when the page logged an error or asked for anything outside itself."""
        problems = self.problems()
        assert not problems, "\n".join(problems)


def chromium_available() -> str | None:
    """None when Playwright and Chromium are usable, else the reason they are not."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install playwright)"
    if not CHROMIUM.exists():
        return f"Chromium is not installed at {CHROMIUM} (Debian package chromium)"
    return None


@contextmanager
def open_browser(width: int = 1200, height: int = 900) -> Iterator[BrowserSession]:
    """Headless Chromium with a fresh profile and one page; skips the calling test when unavailable."""
    reason = chromium_available()
    if reason is not None:
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    profile = tempfile.mkdtemp(prefix="clsemb-browser-")
    try:
        with sync_playwright() as pw:
            context = pw.chromium.launch_persistent_context(
                profile,
                executable_path=str(CHROMIUM),
                headless=True,
                args=CHROMIUM_ARGS,
                viewport={"width": width, "height": height},
                service_workers="block",
            )
            try:
                page = context.pages[0] if context.pages else context.new_page()
                session = BrowserSession(page)

                def route(r) -> None:
                    url = r.request.url
                    if url.startswith(LOCAL_SCHEMES):
                        r.continue_()
                    else:
                        session.blocked_requests.append(url)
                        r.abort()

                context.route("**/*", route)

                def on_console(msg) -> None:
                    if msg.type == "error":
                        session.console_errors.append(f"{msg.text} ({msg.location})")
                    elif msg.type == "warning":
                        session.console_warnings.append(msg.text)

                page.on("console", on_console)
                page.on("pageerror", lambda err: session.page_errors.append(str(err)))

                def on_failed(request) -> None:
                    # the requests aborted by the route above are already listed as blocked
                    if request.url.startswith(LOCAL_SCHEMES):
                        session.failed_requests.append(f"{request.url} ({request.failure})")

                page.on("requestfailed", on_failed)
                yield session
            finally:
                context.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)
