"""The HTML report: files, self-containment, sections, and numbers equal to NumPy."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from .conftest import N_TOKENS, TOP_K
from .helpers import SOURCES, cosine, report_figures, run_group, stacked, vectors_at

FIG_ATOL = 5.1e-5  # chart data carry 4 decimals


def _html(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def _figure(figs: dict[str, Any], title_part: str, nth: int = 0) -> dict[str, Any]:
    found = [f for f in figs.values() if title_part in f["layout"]["title"]["text"]]
    assert len(found) > nth, f"no figure titled like {title_part!r}"
    return found[nth]


def test_files_written(two_run_report: Path) -> None:
    out = two_run_report.parent
    assert two_run_report.name == "report.html"
    stamped = list(out.glob("report_*.html"))
    assert len(stamped) == 1 and stamped[0].read_bytes() == two_run_report.read_bytes()
    for name in (
        "comparison_report.csv",
        "comparison_cosines.csv",
        "intra_run_report.csv",
        "intra_run_cosines.csv",
    ):
        assert (out / name).is_file()


def test_self_contained(two_run_report: Path) -> None:
    html = _html(two_run_report)
    assert not re.search(r"<script[^>]*\bsrc\s*=", html), "external script"
    assert not re.search(r"<link\b", html), "external stylesheet or resource"
    # Markup and CSS outside the inlined scripts (plotly.js holds URL strings it never
    # fetches here; the browser test proves no request leaves the page).
    markup = re.sub(r"(<script[^>]*>).*?</script>", r"\1</script>", html, flags=re.S)
    assert not re.search(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//""", markup), "network URL in an attribute"
    assert not re.search(r"@import|url\(\s*['\"]?https?:", markup), "network URL in CSS"
    assert "plotly.js v" in html  # the library itself is inlined


def test_sections(two_run_report: Path, one_run_report: Path) -> None:
    two, one = _html(two_run_report), _html(one_run_report)
    for section in ("summary", "intra", "runs", "about"):
        assert f'id="{section}"' in two and f'id="{section}"' in one
    assert 'id="inter"' in two and 'id="inter"' not in one
    # the page is named after the scenarios it reports on (conftest's), in order
    assert "<title>actstore report — mood_a, mood_b</title>" in two and "<h1>Activation report — mood_a, mood_b</h1>" in two
    assert "<title>actstore report — mood_a</title>" in one
    for text in (
        "Reference states",
        "Message × reference",
        "User messages, average",
        "Assistant messages, average",
        "Layer discrimination",
        "Cross-layer similarity",
        "Generation explorer",
        "Which reference each message",
    ):
        assert text in one, text
    assert "Run × run" in two and "Pairs (1)" in two
    # every chart container names a figure that exists
    figs = report_figures(two_run_report)
    ids = re.findall(r'data-fig="(f\d+)"', two)
    assert ids and set(ids) <= set(figs) and len(set(ids)) == len(ids)


def test_first_screen_in_plain_words(one_run_report: Path) -> None:
    html = _html(one_run_report)
    summary = html[html.index('id="summary"') : html.index('id="intra"')]
    assert "The most discriminative layer is" in summary
    assert "messages are closest to" in summary
    assert "changes most at layer" in summary


def test_message_reference_heatmap_matches_numpy(two_run_store: Any, one_run_report: Path) -> None:
    run_id = two_run_store.run_ids()[0]
    group = run_group(two_run_store, run_id)
    labels = group.attrs["run"]["references"]
    # mean over layers per source, then over sources (as the report says)
    per_source = [cosine(stacked(group, "snapshots", s)[:, None], stacked(group, "references", s)[None, :]).mean(-1)
                  for s in SOURCES]  # fmt: skip
    expected = np.mean(per_source, axis=0)  # (messages, references)
    fig = _figure(report_figures(one_run_report), "Message × reference")
    trace = fig["data"][0]
    assert trace["x"] == labels
    np.testing.assert_allclose(np.asarray(trace["z"], dtype=float), expected, atol=FIG_ATOL)


def test_cross_layer_and_discrimination_match_numpy(two_run_store: Any, one_run_report: Path) -> None:
    run_id = two_run_store.run_ids()[0]
    group = run_group(two_run_store, run_id)
    figs = report_figures(one_run_report)
    h = vectors_at(group, "hidden_out", group.attrs["run"]["n_positions"] - 1)
    cross = _figure(figs, "Cross-layer cosine")["data"][0]
    np.testing.assert_allclose(
        np.asarray(cross["z"], dtype=float), cosine(h[:, None], h[None, :]), atol=FIG_ATOL
    )
    disc = _figure(figs, "How far apart the references are")
    for trace in disc["data"]:
        r = stacked(group, "references", trace["name"])
        d = 1 - cosine(r[:, None], r[None, :])
        iu, ju = np.triu_indices(len(r), 1)
        np.testing.assert_allclose(trace["y"], d[iu, ju].mean(0), atol=FIG_ATOL)


def test_topk_explorer_data(two_run_store: Any, one_run_report: Path) -> None:
    import json

    html = _html(one_run_report)
    blob = re.search(r'<script type="application/json" class="topk-data">(.*?)</script>', html, re.S)
    assert blob
    data = json.loads(blob.group(1))
    run = two_run_store.run(two_run_store.run_ids()[0])
    assert len(data["steps"]) == run.n_steps <= N_TOKENS and data["k"] == TOP_K
    for got, step in zip(data["steps"], run.steps, strict=True):
        np.testing.assert_allclose(
            [p for _, p in got["top"]], [np.exp(t["logprob"]) for t in step["top_k"]], atol=1e-5
        )


@pytest.mark.parametrize("magnitude", [True, False])
def test_overlap_ranking_option(two_run_store: Any, tmp_path: Path, magnitude: bool) -> None:
    from actstore.report import build_report

    path = build_report(
        two_run_store, [two_run_store.run_ids()[0]], tmp_path, progress=False, magnitude=magnitude
    )
    assert ("by magnitude" in _html(path)) is magnitude


def test_minimal_run_still_reports(tmp_path: Path, loaded: Any) -> None:
    """No references, no top-k, hidden states only: the report says so instead of failing."""
    from actstore.capture.runner import capture_run
    from actstore.report import build_report
    from actstore.scenario import scenario_from_dict
    from actstore.store.store import ActStore

    from .conftest import MESSAGES_A

    store = ActStore.open(tmp_path / "s.zarr", create=True)
    sc = scenario_from_dict({
        "name": "bare", "model": {"id": "tiny", "dtype": "float32", "device": "cpu"},
        "prompt": {"messages": MESSAGES_A[:2]}, "generation": {"max_new_tokens": 2},
        "capture": {"qkv": False, "mlp": False, "attention_weights": False, "logits": False, "top_k_probs": 0},
    })  # fmt: skip
    capture_run(sc, store, loaded, progress=False)
    path = build_report(store, None, tmp_path / "out", progress=False)
    html = _html(path)
    assert "no reference states" in html and "No top-k predictions were captured" in html
    assert "Reference states:" not in html and "Layer discrimination:" not in html
    import pandas as pd

    df = pd.read_csv(tmp_path / "out" / "intra_run_report.csv")
    assert list(df["source"]) == ["hidden_in", "hidden_out"]


def test_generated_reply_row_is_labelled(two_run_store: Any, one_run_report: Path) -> None:
    """The last snapshot is the conversation with the generated reply: its heatmap row
    says ``gen`` and its message entry carries a generated badge and the whole reply."""
    import html as html_lib

    meta = run_group(two_run_store, two_run_store.run_ids()[0]).attrs["run"]
    snaps = meta["snapshots"]
    assert [s["generated"] for s in snaps] == [False] * (len(snaps) - 1) + [True]
    short = {"system": "sys", "user": "usr", "assistant": "ast"}
    expected = [f"{s['index']}·{short[s['role']]}" for s in snaps[:-1]] + [f"{snaps[-1]['index']}·gen"]
    trace = _figure(report_figures(one_run_report), "Message × reference")["data"][0]
    assert trace["y"] == expected
    html = _html(one_run_report)
    block = html[html.index('<details class="msg-detail">') :]
    entries = block.split('<details class="msg-detail">')[1:]
    assert len(entries) == len(snaps)
    assert '<span class="badge generated">' in entries[-1]
    assert not any('<span class="badge generated">' in e for e in entries[:-1])
    reply = meta["generated_text"].strip()
    assert reply and html_lib.escape(reply[:40]) in entries[-1]


def test_the_stamped_copy_is_named_in_utc_whatever_the_local_zone(
    two_run_store: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """report_<stamp>.html ends in Z: the stamp is UTC even where the clock's zone is not."""
    import time
    from datetime import UTC, datetime

    from actstore.report import build_report

    monkeypatch.setenv("TZ", "Etc/GMT+5")  # five hours behind UTC, no daylight saving
    time.tzset()
    try:
        before = datetime.now(UTC).replace(microsecond=0)
        build_report(two_run_store, [two_run_store.run_ids()[0]], tmp_path / "out", progress=False)
        after = datetime.now(UTC)
    finally:
        monkeypatch.undo()
        time.tzset()
    (stamped,) = (tmp_path / "out").glob("report_*.html")
    when = datetime.strptime(stamped.name, "report_%Y-%m-%dT%H-%M-%SZ.html").replace(tzinfo=UTC)
    assert before <= when <= after, (stamped.name, before, after)
