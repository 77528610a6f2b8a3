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


def api_state_map(store: ActStore, item: str) -> dict[str, Any]:
    """What the side-by-side column of ``item`` should draw (the main controls: hidden_out, layer 0)."""
    from actstore.query import resolve
    from actstore.view import api

    (sel,) = resolve(store, [item])
    return api.state_map(sel, "hidden_out", 0)


def test_picking_states_shows_what_actstore_query_prints(two_run_store: ActStore, loaded: Any, tmp_path: Any) -> None:
    first, second = two_run_store.run_ids()[:2]
    a, b, c = f"{first}@snapshot:1", f"{second}@reference:joy", f"{first}@snapshot:generated"
    server = serve(two_run_store, first, port=0, model=loaded)  # the runs' tiny model, for the logit lens
    try:
        with open_page(server.url) as (page, log):
            _idle(page)
            assert page.is_hidden("#pair-view") and page.is_hidden("#group-view")

            # another run side by side, driven by the main controls
            page.select_option("#side-runs", [second])
            _idle(page)
            assert page.locator("#side-cols .col").count() == 1
            assert page.evaluate("document.querySelectorAll('#side-cols .heatmaplayer image').length") == 1
            page.select_option("#layer", "0")
            page.select_option("#cmap", "Greys")
            _idle(page)
            title = page.inner_text("#side-cols .col h3")
            assert title.startswith(second) and "layer 0" in title and "min" in title and "max" in title
            assert page.evaluate("document.querySelector('#side-cols .chart').data[0].colorscale") == "Greys"
            assert page.evaluate("document.getElementById('heatmap').data[0].colorscale") == "Greys"
            assert "min" in page.inner_text("#heatmap-title")

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

            # pin a curve: it is overlaid in the pinned chart
            assert page.is_hidden("#pinned-section")
            page.locator("#group-divergence").locator("xpath=preceding-sibling::button[1]").click()
            page.wait_for_timeout(200)
            assert page.is_visible("#pinned-section") and page.evaluate(DRAWN_JS, "pinned") > 0
            assert page.evaluate("window.actstoreView.keep.pinned.length") == 1

            # save the comparison as one page that opens offline, charts and numbers in it
            with page.expect_download() as download:
                page.click("#compare h2 button.save-html")
            saved = tmp_path / "compare.html"
            download.value.save_as(saved)
            assert f"{matrix['z'][0][1]}" in saved.read_text()  # the numbers travel with the page (opened below)

            # the address keeps the selection and the controls: reopening it shows the same view
            url = page.url
            assert url.count("cmp=") == 3 and "layer=0" in url and "cmap=Greys" in url and f"side={second}" in url
            page.goto(url)
            _idle(page)
            assert page.locator("#side-cols .col").count() == 1  # the run side by side comes back
            assert page.locator("#selection .chip").count() == 3 and page.is_visible("#group-view")
            assert page.input_value("#layer") == "0" and page.input_value("#cmap") == "Greys"

            # depth of a picked full pass: the CLI's convergence
            page.select_option("#depth-state", a)
            _idle(page)
            shown = _table_rows(page.evaluate("window.actstoreView.convergence.table"))
            printed = _query(two_run_store, "depth", a, "--what", "convergence")
            assert [r["layer"] for r in shown] == [r["layer"] for r in printed]
            for got, want in zip(shown, printed, strict=True):
                assert got["cos_mean"] == pytest.approx(want["cos_mean"], rel=1e-4)
                assert got["update_last"] == pytest.approx(want["update_last"], rel=1e-4)
            for chart in ("depth-convergence", "depth-entropy", "depth-heads", "depth-scores", "depth-cross",
                          "depth-qkv", "next-token"):  # fmt: skip
                assert page.evaluate(DRAWN_JS, chart) > 0, f"{chart} drew nothing"
            cross = page.evaluate("window.actstoreView.crossLayer")
            for want in _query(two_run_store, "cross-layer", "--run", first, "--state", "snapshot:1"):
                i, j = cross["layers"].index(want["layer_a"]), cross["layers"].index(want["layer_b"])
                assert cross["z"][i][j] == pytest.approx(want["cosine"], rel=1e-4, abs=1e-6)
            # every layer's scores in one picture: one band of rows per layer
            page.select_option("#depth-layer", "")
            _idle(page)
            stacked = page.evaluate("window.actstoreView.depthScores")
            assert stacked["layer"] is None and stacked["layers"] == ra.layers
            assert page.inner_text("#depth-scores-title").startswith("q·k / √d scores, every layer stacked")

            # the selection side by side: a column per picked state, with the main controls
            page.check("#side-selection")
            _idle(page)
            assert page.locator("#side-cols .col").count() == 1 + 3  # the other run, then the states
            assert "side_sel=1" in page.url and f"side={second}" in page.url
            titles = page.locator("#side-cols .col h3").all_inner_texts()
            assert any(t.startswith(a) and "layer 0" in t for t in titles), titles
            snap = next(i for i, t in enumerate(titles) if t.startswith(a))
            z = page.evaluate(f"document.querySelectorAll('#side-cols .chart')[{snap}].data[0].z")
            want = np.asarray(api_state_map(two_run_store, a)["maps"]["z"], dtype=np.float64)
            np.testing.assert_allclose(np.asarray(z, dtype=np.float64), want, rtol=1e-5, atol=1e-7)

            # removing a state goes back to the pair view
            page.locator("#selection .chip button").last.click()
            _idle(page)
            assert page.is_visible("#pair-view") and page.url.count("cmp=") == 2
            assert page.locator("#side-cols .col").count() == 1 + 2

            assert page.is_hidden("#error"), page.inner_text("#error")
            assert log.blocked == [], f"the page tried the network: {log.blocked[:5]}"
            assert log.errors == [], log.errors
    finally:
        server.shutdown()
    with open_page(saved) as (offline, offline_log):  # the saved page, with no server and no network
        offline.wait_for_function("document.querySelectorAll('.js-plotly-plot .main-svg').length >= 6")
        assert offline.inner_text("h1").startswith("Compare states")
        assert offline_log.errors == [] and offline_log.blocked == []


@pytest.mark.slow  # subprocesses, a browser or many captures: the full suite runs it
def test_scenario_builder_from_form_to_a_new_run(tmp_path: Any) -> None:
    """Build a scenario in the form (a mistake shows at its field, then goes), save it,
    launch it (a real SmolLM2 capture in the background), and open the new run."""
    import actstore
    from actstore.scenario import load_scenario, scenario_from_dict

    location = tmp_path / "store.zarr"
    start = scenario_from_dict({
        "name": "start", "model": {"id": "smollm2", "dtype": "float32", "device": "cpu"},
        "prompt": {"messages": [{"role": "user", "content": "Hi."}]}, "generation": {"max_new_tokens": 2},
        "capture": {"layers": [0], "attention_weights": False, "qkv": False, "mlp": False},
    })  # fmt: skip
    [first] = actstore.capture_scenario(start, str(location), progress=False)
    store = ActStore.open(location)
    folder = tmp_path / "scenarios"
    folder.mkdir()
    server = serve(store, first.run_id, port=0, scenarios=folder)  # each run's own model for the lens
    try:
        with open_page(server.url) as (page, log):
            _idle(page)
            bad: list[str] = []
            page.on("response", lambda r: bad.append(f"{r.status} {r.url}") if r.status >= 400 else None)
            page.click("#b-new")
            page.wait_for_function("window.actstoreView.builder.problems.length === 0 && "
                                   "document.getElementById('b-yaml').value.includes('my_scenario')")  # fmt: skip
            # the form writes the YAML
            page.fill('[data-field="name"]', "built_here")
            page.fill('[data-field="generation.max_new_tokens"]', "2")
            page.fill('[data-field="capture.layers"]', "0")
            page.fill('[data-field="prompt.messages[0].content"]', "Say hi.")
            page.wait_for_function("document.getElementById('b-yaml').value.includes('name: built_here')")
            # a mistake: shown at its field, and in the list
            page.check('[data-field="generation.do_sample"]')
            page.fill('[data-field="generation.temperature"]', "-1")
            page.wait_for_selector('.field-error[data-for="generation.temperature"]')
            assert page.locator('[data-field="generation.temperature"]').evaluate("e => e.classList.contains('invalid')")
            page.fill('[data-field="generation.temperature"]', "0.7")
            page.wait_for_function("window.actstoreView.builder.problems.length === 0")
            assert page.locator(".field-error").count() == 0
            # the YAML writes the form
            text = page.input_value("#b-yaml").replace("name: built_here", "name: built_in_yaml")
            page.fill("#b-yaml", text)
            page.wait_for_function("document.querySelector('[data-field=\"name\"]').value === 'built_in_yaml'")
            # save: a file capture accepts
            page.fill("#b-name", "built.yaml")
            page.click("#b-save")
            page.wait_for_function("document.getElementById('b-status').textContent.startsWith('saved built.yaml')")
            sc = load_scenario(folder / "built.yaml")
            assert sc.name == "built_in_yaml" and sc.generation.max_new_tokens == 2 and sc.generation.temperature == 0.7
            # launch, watch, open the new run
            page.click("#b-launch")
            page.wait_for_selector(".job.done .open-run", timeout=240_000)
            new = store.run_ids()[-1]
            assert new != first.run_id and new.startswith("built_in_yaml")
            page.click(".job.done .open-run")
            page.wait_for_function("(r) => document.getElementById('run-title').textContent.includes(r)", arg=new)
            _idle(page)
            assert page.is_hidden("#error"), page.inner_text("#error")
            assert log.blocked == [], f"the page tried the network: {log.blocked[:5]}"
            assert log.errors == [], (log.errors, bad)
    finally:
        server.shutdown()
