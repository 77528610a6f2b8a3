"""The run viewer in headless Chromium: only its own server reachable, no console
errors, every chart drawn, and the controls change what is read and shown."""

from __future__ import annotations

import time
from typing import Any

import pytest

from actstore.report.browser import find_chromium, open_page
from actstore.store.store import ActStore
from actstore.view import api, serve

pytestmark = pytest.mark.skipif(find_chromium() is None, reason="no Chromium binary (apt-get install chromium)")

MARKS_JS = """
(id) => {
  const el = document.getElementById(id);
  return el.querySelectorAll('.heatmaplayer image, .scatterlayer path.js-line, .barlayer .point path').length;
}
"""


def _idle(page: Any, timeout_s: float = 60.0) -> None:
    page.wait_for_function("window.actstoreView && window.actstoreView.idle()", timeout=timeout_s * 1000)
    page.wait_for_timeout(150)  # let plotly finish the frame it was handed
    page.wait_for_function("window.actstoreView.idle()", timeout=timeout_s * 1000)


def _rgb(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text[text.index("(") + 1 : text.index(")")].split(","))


def _requests(page: Any) -> int:
    return int(page.evaluate("window.actstoreView.requests.length"))


def test_viewer_draws_and_follows_the_controls(
    two_run_store: ActStore, loaded: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = two_run_store.run_ids()[0]
    server = serve(two_run_store, first, port=0, model=loaded)  # the runs' tiny model, for the logit lens
    try:
        with open_page(server.url) as (page, log):
            _idle(page)
            for chart in ("heatmap", "topk", "trajectory", "decomposition"):
                assert page.evaluate(MARKS_JS, chart) > 0, f"{chart} drew nothing"
            assert page.locator("#tokens .tok.gen").count() >= 1
            assert first in page.inner_text("#run-title")
            n_layers = len(two_run_store.run(first).layers)
            assert page.locator("#lens table.lens tbody tr").count() == n_layers
            assert page.locator("#lens tbody tr").last.locator("td").nth(3).inner_text() == "0"  # last layer: KL 0
            assert page.evaluate(MARKS_JS, "lens-kl") > 0
            # the lens at another position of the step, with more candidates
            step = int(page.input_value("#step"))
            if page.locator("#lens-position option").count() > 1:
                page.select_option("#lens-position", "0")
                _idle(page)
                assert page.evaluate("window.actstoreView.lens.position") == page.evaluate(
                    f"window.actstoreView.lib.state.S.steps[{step}].positions[0]")
            page.select_option("#lens-topk", "10")
            _idle(page)
            assert page.evaluate("window.actstoreView.lens.top[0].length") == 10
            assert page.inner_text("#lens th:last-child") == "top 10"
            # the signed scale as drawn: the max is red, the min blue (Activation Lab's RdBu_r)
            trace = page.evaluate("(({colorscale, reversescale}) => ({colorscale, reversescale}))"
                                  "(document.getElementById('heatmap')._fullData[0])")  # fmt: skip
            scale = trace["colorscale"][::-1] if trace["reversescale"] else trace["colorscale"]
            top, bottom = _rgb(scale[-1][1]), _rgb(scale[0][1])
            assert top[0] > top[2] + 60 and bottom[2] > bottom[0] + 60, trace

            # another layer: a new read, different numbers
            z_before = page.evaluate("JSON.stringify(window.actstoreView.heatmap.z)")
            n = _requests(page)
            page.select_option("#layer", "0")
            _idle(page)
            assert _requests(page) > n and page.evaluate("window.actstoreView.heatmap.layer") == 0
            assert page.evaluate("JSON.stringify(window.actstoreView.heatmap.z)") != z_before

            # a generated token picks its step; the step label and top-k follow
            page.locator("#tokens .tok.gen").nth(1).click()
            _idle(page)
            assert page.input_value("#step") == "2" and page.inner_text("#step-label").startswith("2 (decode")
            assert page.evaluate("window.actstoreView.heatmap.step") == 2

            # a channel in the table: its trajectory
            row = page.locator("#neurons tr.pick").nth(2)
            channel = row.get_attribute("data-neuron")
            row.click()
            _idle(page)
            assert page.inner_text("#trajectory-title").endswith(f"channel {channel}")

            # attention: the head control appears, heads are separate reads
            page.select_option("#source", "attn_weights")
            _idle(page)
            assert page.is_visible("#head") and page.evaluate(MARKS_JS, "heatmap") > 0
            page.select_option("#head", "1")
            _idle(page)
            assert page.evaluate("window.actstoreView.heatmap.head") == 1

            # a slice too large to draw cell by cell arrives as block means, and draws
            monkeypatch.setattr(api, "MAX_ROWS", 3)
            page.locator("#tokens .tok.prefill").first.click()  # step 0: the whole prompt
            _idle(page)
            assert "means of" in page.inner_text("#heatmap-title") and page.evaluate(MARKS_JS, "heatmap") > 0

            # the other run, from the run list
            other = two_run_store.run_ids()[1]
            page.select_option("#run-select", other)
            _idle(page)
            assert other in page.inner_text("#run-title") and page.evaluate(MARKS_JS, "heatmap") > 0

            assert page.is_hidden("#error"), page.inner_text("#error")
            assert log.blocked == [], f"the page tried the network: {log.blocked[:5]}"
            assert log.errors == [], log.errors
    finally:
        started = time.monotonic()
        server.shutdown()
        assert time.monotonic() - started < 10


def test_viewer_on_a_sparse_run(tmp_path: Any, loaded: Any) -> None:
    """A run with a layer subset, bfloat16 storage and only hidden states + logits: the
    panels that need missing sources say so, the rest draw, nothing errors."""
    from actstore.capture.runner import capture_run
    from actstore.scenario import scenario_from_dict

    from .conftest import MESSAGES_A

    sc = scenario_from_dict({
        "name": "sparse", "model": {"id": "tiny", "dtype": "float32", "device": "cpu"},
        "prompt": {"messages": MESSAGES_A}, "generation": {"max_new_tokens": 4},
        "capture": {"store_dtype": "bfloat16", "layers": [0, 2], "attention_weights": False, "qkv": False,
                    "mlp": False},
    })  # fmt: skip
    store = ActStore.open(tmp_path / "sparse.zarr", create=True)
    run_id = capture_run(sc, store, loaded, progress=False).run_id
    server = serve(store, run_id, port=0, model=loaded)
    try:
        with open_page(server.url) as (page, log):
            _idle(page)
            assert page.evaluate(MARKS_JS, "heatmap") > 0 and page.evaluate(MARKS_JS, "trajectory") > 0
            assert [o for o in page.eval_on_selector_all("#layer option", "els => els.map(e => e.value)")] == ["0", "2"]
            assert "Needs hidden states" in page.inner_text("#decomposition")
            assert page.locator("#lens tbody tr").count() == 2
            page.select_option("#source", "logits")
            _idle(page)
            assert page.is_disabled("#layer") and page.evaluate(MARKS_JS, "heatmap") > 0
            assert page.is_hidden("#error"), page.inner_text("#error")
            assert log.errors == [] and log.blocked == []
    finally:
        server.shutdown()
