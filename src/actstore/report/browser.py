"""Open a report in headless Chromium with the network cut: check it, screenshot it.

Used by the browser test and ``scripts/make_screenshots.py``; needs the ``dev`` extra
(playwright) and a Chromium binary (Debian: ``apt-get install chromium``; playwright's
own browser download is not used). The network is cut three ways: a dead proxy, a host
resolver that resolves nothing, and a route that aborts (and records) every request
that is not for the report file itself. So a report that fetched anything from a CDN
would fail visibly instead of quietly working online.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CHROMIUM_CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "chrome")
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--proxy-server=127.0.0.1:9",
    "--host-resolver-rules=MAP * ~NOTFOUND",
]  # fmt: skip


def find_chromium() -> str | None:
    """A Chromium binary: ``$CHROMIUM`` or the first one on PATH."""
    env = os.environ.get("CHROMIUM")
    if env and Path(env).is_file():
        return env
    for name in CHROMIUM_CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


@dataclass
class PageLog:
    """What the page did: console errors, uncaught exceptions, blocked requests."""

    errors: list[str] = field(default_factory=list)
    blocked: list[str] = field(default_factory=list)


@contextmanager
def open_page(html: str | Path, width: int = 1400, height: int = 1000) -> Iterator[tuple[Any, PageLog]]:
    """``(page, log)`` for a local HTML file, offline; the browser closes on exit.

    ``html`` may also be an ``http://`` address on this machine (the run viewer): then
    requests to that origin go through and every other one is still cut."""
    from playwright.sync_api import sync_playwright

    exe = find_chromium()
    if exe is None:
        raise FileNotFoundError("no Chromium binary found (install chromium or set $CHROMIUM)")
    served = str(html).startswith("http://")
    url = str(html) if served else Path(html).resolve().as_uri()
    origin = url[: url.index("/", len("http://")) + 1] if served else None
    log = PageLog()
    with sync_playwright() as pw:
        args = CHROMIUM_ARGS
        if served:  # resolve and connect to this machine only; everything else stays cut
            args = [a for a in args if not a.startswith("--host-resolver-rules")]
            args += ["--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1, EXCLUDE localhost",
                     "--proxy-bypass-list=127.0.0.1;localhost"]  # fmt: skip
        browser = pw.chromium.launch(executable_path=exe, headless=True, args=args)
        try:
            context = browser.new_context(viewport={"width": width, "height": height}, offline=not served)
            page = context.new_page()

            def route(r: Any) -> None:
                if r.request.url == url or (origin and r.request.url.startswith(origin)):
                    r.continue_()
                else:
                    log.blocked.append(r.request.url)
                    r.abort()

            page.route("**/*", route)
            page.on(
                "console",
                lambda m: log.errors.append(f"console.{m.type}: {m.text}") if m.type == "error" else None,
            )
            page.on("pageerror", lambda e: log.errors.append(f"pageerror: {e}"))
            page.goto(url, wait_until="load")
            yield page, log
        finally:
            browser.close()


def wait_idle(page: Any, timeout_s: float = 120.0) -> None:
    """Wait until the report has drawn every visible chart."""
    deadline = time.monotonic() + timeout_s
    page.wait_for_function("window.actstoreReport !== undefined", timeout=timeout_s * 1000)
    while time.monotonic() < deadline:
        if page.evaluate("window.actstoreReport.idle()"):
            return
        page.wait_for_timeout(100)
    raise TimeoutError("the report's charts did not finish drawing")


CHART_STATE_JS = """
() => Array.from(document.querySelectorAll('.chart')).map(el => {
  const svg = el.querySelector('svg.main-svg');
  // What plotly drew: line paths with geometry, markers, heatmap images, bars.
  const marks = Array.from(el.querySelectorAll(
    '.scatterlayer path.js-line, .scatterlayer .points path, .heatmaplayer image, .barlayer .point path'
  )).filter(m => m.tagName === 'image' ? !!m.getAttribute('href') : (m.getAttribute('d') || '').length > 2);
  const r = el.getBoundingClientRect();
  return {fig: el.dataset.fig || (el.classList.contains('topk-chart') ? 'topk' : '?'),
          drawn: el.classList.contains('drawn'), svg: !!svg, marks: marks.length,
          width: r.width, height: r.height};
})
"""


def chart_states(page: Any) -> list[dict[str, Any]]:
    """For every chart container: whether plotly drew an SVG with marks in it, and its size."""
    return list(page.evaluate(CHART_STATE_JS))


def open_everything(page: Any, timeout_s: float = 300.0) -> None:
    """Open every collapsible block and wait until all charts are drawn."""
    page.evaluate("window.actstoreReport.openAll()")
    wait_idle(page, timeout_s)
