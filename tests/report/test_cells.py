"""Table cells of the report: what a missing number shows, how numbers are written and
coloured, worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from actstore.report.cells import Cell, fmt, frame_table, num_cell, scale_bg, span, text_cell


@pytest.mark.parametrize("missing", [None, float("nan"), np.float32("nan"), pd.NA])
def test_a_missing_number_is_a_dash_without_colour(missing: object) -> None:
    assert num_cell(missing) == Cell("–", None, "num")
    assert num_cell(missing, 0.0, 1.0) == Cell("–", None, "num")  # no colour even on a scale
    assert text_cell(missing, "ref") == Cell("", None, "ref")
    assert fmt(missing) == "–"


def test_numbers_are_written_and_coloured_on_their_scale() -> None:
    assert num_cell(0.123456) == Cell("0.123", None, "num")
    assert num_cell(0.5, digits=1) == Cell("0.5", None, "num")
    assert num_cell(7) == Cell("7", None, "num") and num_cell(12345.6) == Cell("12,346", None, "num")
    # red at the low end, green at the high end, reversed for distances
    assert num_cell(0.0, 0.0, 1.0).bg == "rgba(220,60,60,0.35)" == scale_bg(1.0, 0.0, 1.0, reverse=True)
    assert num_cell(1.0, 0.0, 1.0).bg == "rgba(90,180,60,0.35)" == scale_bg(0.0, 0.0, 1.0, reverse=True)
    assert math.isclose(float(num_cell(0.25, 0.0, 1.0).text), 0.25)
    assert num_cell(0.25, 0.0, 1.0).bg == "rgba(220,120,60,0.35)"  # 60 + 240 * 0.25


@pytest.mark.parametrize("value", [1.0, 0.5, 0.31])
def test_a_column_of_equal_numbers_takes_the_middle_colour(value: float) -> None:
    # every cosine 1.0 (identical states) is common; amber, rgba(220,180,60), is the scale's
    # middle. Widening the bounds by 1e-9 put 1.0 a rounding error below it: rgba(220,179,60).
    lo, hi = span([value, value, float("nan")])
    assert (lo, hi) == (value, value)
    assert num_cell(value, lo, hi).bg == "rgba(220,180,60,0.35)"
    assert span([]) == (0.0, 1.0) and span([float("nan")]) == (0.0, 1.0)


def test_a_frame_becomes_a_table_of_text_and_numbers() -> None:
    df = pd.DataFrame({"source": ["a", "b"], "cos": [0.5, 0.25], "n": [3, None]})
    t = frame_table(df, {"cos": (0.0, 1.0, False)}, digits=2)
    assert t.columns == ["source", "cos", "n"]
    assert [[c.text for c in row] for row in t.rows] == [["a", "0.50", "3.00"], ["b", "0.25", "–"]]
    assert [row[1].bg for row in t.rows] == [scale_bg(0.5, 0.0, 1.0), scale_bg(0.25, 0.0, 1.0)]
    assert t.rows[0][2].bg is None  # an uncoloured column


@pytest.mark.parametrize("pairs", [False, True])
def test_overview_table_is_each_rows_mean_cosine_per_source(pairs: bool) -> None:
    """The first screen's table: a row per run (or pair of runs), the mean cosine of each
    source in order, then the mean, std and median over the sources (NumPy's)."""
    from actstore.report.overview_section import overview_table

    values = {"r1": [0.91, 0.52, 0.70], "r2": [0.33, 0.64, 0.25]}
    sources = ["hidden_out", "attn_out", "mlp_out"]
    rows = [(r, s, v) for r, vs in values.items() for s, v in zip(sources, vs, strict=True)][::-1]  # any order
    summary = pd.DataFrame(rows, columns=["run", "source", "mean_cosine"])
    if pairs:  # rows keyed by two columns (the inter-run table's pairs)
        pair_of = {"r1": ("ra", "rb"), "r2": ("ra", "rc")}
        summary["run_a"] = summary["run"].map(lambda r: pair_of[r][0])
        summary["run_b"] = summary["run"].map(lambda r: pair_of[r][1])
        keys: str | list[str] = ["run_a", "run_b"]
        labels = {pair_of["r1"]: [text_cell("P1")], pair_of["r2"]: [text_cell("P2")]}
    else:
        keys, labels = "run", {"r1": [text_cell("R1")], "r2": [text_cell("R2")]}
    table = overview_table(summary, keys, labels, ["row"])  # type: ignore[arg-type]
    assert table.columns == ["row", *sources[::-1], "mean", "std", "median"]
    for row, (rid, vs) in zip(table.rows, values.items(), strict=True):
        per_source = vs[::-1]
        stats = [np.mean(vs), np.std(vs), np.median(vs)]
        assert [c.text for c in row[1:]] == [f"{x:.3f}" for x in per_source + stats], rid


def test_aggregate_table_is_mean_and_spread_of_each_rows_statistic() -> None:
    """Per source and metric: the mean ± population std, across rows, of each row's mean,
    std and median (worked out with NumPy), written to 3 places, exact values in the title."""
    from actstore.report.overview_section import AGG_METRICS, aggregate_table

    rng = np.random.default_rng(0)
    summary = pd.DataFrame({"source": ["hidden_out"] * 3 + ["attn_out"] * 2})
    for metric, _ in AGG_METRICS:
        for stat in ("mean", "std", "median"):
            summary[f"{stat}_{metric}"] = rng.random(5)
    table = aggregate_table(summary)
    assert [row[0].text for row in table.rows] == ["hidden_out", "attn_out"]
    assert table.columns == ["source"] + ["mean", "std", "median"] * 3
    assert table.groups == [("", 1), ("Cosine similarity (mean ± std)", 3), ("MAE (mean ± std)", 3),
                            ("Top-1% overlap (mean ± std)", 3)]  # fmt: skip
    for row, idx in zip(table.rows, ([0, 1, 2], [3, 4]), strict=True):
        cells = iter(row[1:])
        for metric, _ in AGG_METRICS:
            for stat in ("mean", "std", "median"):
                col = summary[f"{stat}_{metric}"].to_numpy()[idx]
                m, s = float(np.mean(col)), float(np.std(col))
                cell = next(cells)
                assert cell.text == f"{m:.3f} ± {s:.3f}" and cell.cls == "num" and cell.bg is None
                a, b = (float(x) for x in cell.title.split(" ± "))
                assert a == pytest.approx(m, rel=1e-12) and b == pytest.approx(s, rel=1e-12)


def test_message_table_rows_label_each_message_by_index_and_role() -> None:
    """The per-message table: '<index>·<role abbreviation>' (the generated reply '·gen') in
    a label cell, the text in a preview cell, the closest and leaned-toward references in
    ref cells, and a dash with no number where a message leans toward nothing."""
    from actstore.report.narrative import message_table

    cr = pd.DataFrame({
        "message": [0, 1, 2, 3], "role": ["system", "user", "assistant", "assistant"],
        "generated": [False, False, False, True], "preview": ["Be kind.", "Hi", "Hello", "Bye"],
        "best": ["joy", "fear", "joy", "fear"], "best_cosine": [0.9, 0.5, 0.25, 0.125],
        "leans": ["joy", "fear", "fear", "joy"], "lean": [0.25, 0.0, -0.5, 0.125],
    })  # fmt: skip
    table = message_table(cr)
    assert table.columns == ["message", "text", "closest", "cosine", "leans toward", "Δ vs its mean"]
    assert [(r[0].text, r[0].cls) for r in table.rows] == [
        ("0·sys", "label"), ("1·usr", "label"), ("2·ast", "label"), ("3·gen", "label"),
    ]  # fmt: skip
    assert [(r[1].text, r[1].cls) for r in table.rows] == [(p, "preview") for p in ["Be kind.", "Hi", "Hello", "Bye"]]
    assert [(r[2].text, r[2].cls) for r in table.rows] == [(b, "ref") for b in ["joy", "fear", "joy", "fear"]]
    assert [(r[4].text, r[4].cls) for r in table.rows] == [("joy", "ref"), ("–", "ref"), ("–", "ref"), ("joy", "ref")]
    assert [r[5].text for r in table.rows] == ["0.250", "–", "–", "0.125"]


def test_overview_table_colours_each_source_cell_on_the_whole_tables_span() -> None:
    """Rows x sources of mean cosine: every source cell coloured on one scale from the
    table's smallest value (red end) to its largest (green end); the across-source mean,
    std and median (NumPy's) plain."""
    from actstore.report.overview_section import overview_table

    values = {("r1", "hidden_out"): 0.2, ("r1", "attn_out"): 0.6, ("r2", "hidden_out"): 0.9, ("r2", "attn_out"): 0.4}
    summary = pd.DataFrame([{"run": r, "source": s, "mean_cosine": v} for (r, s), v in values.items()])
    table = overview_table(summary, "run", {"r1": [text_cell("r1")], "r2": [text_cell("r2")]}, ["run"])
    sources = table.columns[1:3]
    assert sorted(sources) == ["attn_out", "hidden_out"] and table.columns[3:] == ["mean", "std", "median"]
    lo, hi = min(values.values()), max(values.values())
    for row, rid in zip(table.rows, ["r1", "r2"], strict=True):
        v = [values[(rid, s)] for s in sources]
        assert [c.text for c in row[1:3]] == [f"{x:.3f}" for x in v]
        assert [c.bg for c in row[1:3]] == [scale_bg(x, lo, hi) for x in v]
        assert [c.text for c in row[3:]] == [f"{x:.3f}" for x in (np.mean(v), np.std(v), np.median(v))]
        assert all(c.bg is None for c in row[3:])
    cells = {(rid, s): c for row, rid in zip(table.rows, ["r1", "r2"], strict=True) for s, c in zip(sources, row[1:3], strict=True)}
    assert cells[("r1", "hidden_out")].bg == scale_bg(0.0, 0.0, 1.0)  # the smallest: the red end
    assert cells[("r2", "hidden_out")].bg == scale_bg(1.0, 0.0, 1.0)  # the largest: the green end
