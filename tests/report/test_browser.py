"""The report in headless Chromium with the network cut: no console errors, every chart
drawn, and the top-k explorer's slider changes its table.

Skipped only when no Chromium binary exists (``apt-get install chromium``, or set
``$CHROMIUM``); playwright drives it (``pip install -e '.[dev]'``), using that binary.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from actstore.report.browser import chart_states, find_chromium, open_everything, open_page, wait_idle

pytestmark = pytest.mark.skipif(
    find_chromium() is None, reason="no Chromium binary (apt-get install chromium)"
)


def _check_all_charts_drawn(page: object) -> int:
    states = chart_states(page)
    assert states, "no chart containers"
    blank = [s for s in states if not (s["drawn"] and s["svg"] and s["marks"] > 0)]
    assert not blank, f"{len(blank)} of {len(states)} charts drew nothing, e.g. {blank[:3]}"
    assert all(s["width"] > 100 and s["height"] > 100 for s in states)
    return len(states)


def _topk_table(page: object) -> str:
    return str(page.inner_text(".topk .topk-table"))  # type: ignore[attr-defined]


def test_report_works_offline(two_run_report: Path) -> None:
    with open_page(two_run_report) as (page, log):
        assert page.evaluate("typeof Plotly") == "object"  # the inlined library, not a CDN
        wait_idle(page)
        initial = chart_states(page)
        assert any(s["drawn"] for s in initial)
        open_everything(page)
        n = _check_all_charts_drawn(page)
        assert n == page.evaluate("window.actstoreReport.figureCount") + page.locator(".topk-chart").count()
        assert log.blocked == [], f"the page tried the network: {log.blocked[:5]}"
        assert log.errors == [], log.errors


def test_slider_changes_the_topk_table(one_run_report: Path) -> None:
    with open_page(one_run_report) as (page, log):
        wait_idle(page)
        label = page.locator(".topk .topk-step-label")
        before_table, before_label = _topk_table(page), label.inner_text()
        assert "step 0" in before_label
        slider = page.locator(".topk .topk-slider").first
        slider.focus()
        page.keyboard.press("ArrowRight")
        page.keyboard.press("ArrowRight")
        wait_idle(page)
        assert slider.input_value() == "2"
        assert "step 2" in label.inner_text()
        after_table = _topk_table(page)
        assert after_table != before_table
        assert "step 2" in page.locator(".topk .topk-table th.sel").inner_text()
        assert page.locator(".topk .topk-table thead th").nth(1).inner_text().startswith("step 2")
        page.keyboard.press("End")
        assert _topk_table(page) != after_table
        assert log.errors == [] and log.blocked == []


def test_wait_idle_gives_up_with_a_timeout_that_says_why(tmp_path: Path) -> None:
    """A page whose charts never finish: wait_idle stops at its deadline and says so."""
    page_file = tmp_path / "never.html"
    page_file.write_text("<html><body><script>window.actstoreReport = {idle: () => false};</script></body></html>")
    with open_page(page_file) as (page, log):
        with pytest.raises(TimeoutError) as info:
            wait_idle(page, timeout_s=0.5)
        assert str(info.value) == "the report's charts did not finish drawing"
        assert log.errors == []
