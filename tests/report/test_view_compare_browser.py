"""The viewer's compare and depth panels in headless Chromium: states picked in the page
show the numbers ``actstore query`` prints for them (and plain NumPy on vectors read
straight from Zarr), the selection lives in the address, every chart draws, nothing
errors and nothing leaves the server's origin."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from actstore.cli import main
from actstore.report.browser import find_chromium, open_page
from actstore.store.store import ActStore
from actstore.view import serve

pytestmark = pytest.mark.skipif(find_chromium() is None, reason="no Chromium binary (apt-get install chromium)")

DRAWN_JS = """
(id) => document.getElementById(id).querySelectorAll(
  '.heatmaplayer image, .scatterlayer path.js-line, .scatterlayer .point').length
"""


def _idle(page: Any) -> None:
    page.wait_for_function("window.actstoreView && window.actstoreView.idle()", timeout=60_000)
    page.wait_for_timeout(150)  # plotly draws in the next frame
    page.wait_for_function("window.actstoreView.idle()", timeout=60_000)


def _query(store: ActStore, *args: str) -> list[dict[str, Any]]:
    res = CliRunner().invoke(main, ["query", *args, "--store", str(store.location), "--format", "json"],
                             catch_exceptions=False)  # fmt: skip
    assert res.exit_code == 0, res.output
    rows: list[dict[str, Any]] = json.loads(res.output)
    return rows


def _table_rows(table: dict[str, list[Any]]) -> list[dict[str, Any]]:
    names = list(table)
    return [dict(zip(names, values, strict=True)) for values in zip(*table.values(), strict=True)]


def _pick(page: Any, run: str, state: str) -> None:
    page.select_option("#pick-run", run)
    page.wait_for_function("(r) => document.getElementById('pick-state').dataset.run === r", arg=run)
    page.select_option("#pick-state", state)
    page.click("#pick-add")
    _idle(page)


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_picking_states_shows_what_actstore_query_prints(two_run_store: ActStore, loaded: Any) -> None:
    first, second = two_run_store.run_ids()[:2]
    a, b, c = f"{first}@snapshot:1", f"{second}@reference:joy", f"{first}@snapshot:generated"
    server = serve(two_run_store, first, port=0, model=loaded)  # the runs' tiny model, for the logit lens
    try:
        with open_page(server.url) as (page, log):
            _idle(page)
            assert page.is_hidden("#pair-view") and page.is_hidden("#group-view")
            _pick(page, first, "snapshot:1")
            _pick(page, second, "reference:joy")

            # two states: the pair view, with the numbers the CLI prints
            assert page.is_visible("#pair-view") and page.is_hidden("#group-view")
            shown = _table_rows(page.evaluate("window.actstoreView.pair.table"))
            printed = _query(two_run_store, "pair", a, b)
            assert len(shown) == len(printed) > 0
            for got, want in zip(shown, printed, strict=True):
                assert (got["source"], got["layer"]) == (want["source"], want["layer"])
                for metric in ("cosine", "mae", "std_diff", "jaccard"):
                    assert got[metric] == pytest.approx(want[metric], rel=1e-4, abs=1e-9), (metric, got)  # 5 digits
            # and with NumPy on the stored vectors: snapshot 1 of the first run, joy of the second
            ra, rb = two_run_store.run(first), two_run_store.run(second)
            layer_pos = ra.layers.index(1)
            va = np.asarray(ra.snapshots("hidden_out")[1, layer_pos])
            vb = np.asarray(rb.references("hidden_out")[rb.reference_labels.index("joy"), layer_pos])
            row = next(r for r in shown if r["source"] == "hidden_out" and r["layer"] == 1)
            assert row["cosine"] == pytest.approx(_cos(va, vb), rel=1e-4)
            for chart in ("pair-curves", "pair-passes", "pair-map"):
                assert page.evaluate(DRAWN_JS, chart) > 0, f"{chart} drew nothing"
            assert page.locator("#pair-summary tbody tr").count() == len({r["source"] for r in printed})
            # another map of the pair: a new read, the title says which and its shape
            page.select_option("#map-show", "abs_diff")
            page.select_option("#map-layer", "0")
            _idle(page)
            assert page.inner_text("#pair-map-title").startswith("Attention of layer 0")
            assert "min" in page.inner_text("#pair-map-title") and page.evaluate(DRAWN_JS, "pair-map") > 0

            # three states: the group view; its matrix is the CLI's layer-averaged pairwise cosine
            _pick(page, first, "snapshot:generated")
            assert page.is_hidden("#pair-view") and page.is_visible("#group-view")
            for chart in ("group-centroid", "group-divergence", "group-matrix", "group-dendrogram", "group-pca",
                          "group-spectrum"):  # fmt: skip
                assert page.evaluate(DRAWN_JS, chart) > 0, f"{chart} drew nothing"
            matrix = page.evaluate("window.actstoreView.groupMatrix")
            printed = _query(two_run_store, "group", a, b, c, "--what", "pairwise")
            for want in (r for r in printed if r["source"] == "hidden_out"):  # the source the group charts draw
                i, j = matrix["states"].index(want["state_a"]), matrix["states"].index(want["state_b"])
                assert matrix["z"][i][j] == pytest.approx(want["cosine"], rel=1e-4)

            # the address keeps the selection: reopening it shows the same group
            url = page.url
            assert url.count("cmp=") == 3
            page.goto(url)
            _idle(page)
            assert page.locator("#selection .chip").count() == 3 and page.is_visible("#group-view")

            # depth of a picked full pass: the CLI's convergence
            page.select_option("#depth-state", a)
            _idle(page)
            shown = _table_rows(page.evaluate("window.actstoreView.convergence.table"))
            printed = _query(two_run_store, "depth", a, "--what", "convergence")
            assert [r["layer"] for r in shown] == [r["layer"] for r in printed]
            for got, want in zip(shown, printed, strict=True):
                assert got["cos_mean"] == pytest.approx(want["cos_mean"], rel=1e-4)
                assert got["update_last"] == pytest.approx(want["update_last"], rel=1e-4)
            for chart in ("depth-convergence", "depth-entropy", "depth-heads", "depth-scores", "next-token"):
                assert page.evaluate(DRAWN_JS, chart) > 0, f"{chart} drew nothing"

            # removing a state goes back to the pair view
            page.locator("#selection .chip button").last.click()
            _idle(page)
            assert page.is_visible("#pair-view") and page.url.count("cmp=") == 2

            assert page.is_hidden("#error"), page.inner_text("#error")
            assert log.blocked == [], f"the page tried the network: {log.blocked[:5]}"
            assert log.errors == [], log.errors
    finally:
        server.shutdown()
