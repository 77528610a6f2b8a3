"""The report's chart specs against Plotly's own schema (``plotly.graph_objects.Figure``
validates every key and value, so a misspelt or misplaced property fails), and by value:
titles, heights, series names and values, cell text only where it stays readable."""

from __future__ import annotations

from typing import Any

import numpy as np
import plotly.graph_objects as go
import pytest

from actstore.report import figures as F


def _valid(spec: dict[str, Any]) -> go.Figure:
    return go.Figure(data=spec["data"], layout=spec["layout"])  # raises on any unknown property


def test_line_spec_is_valid_and_carries_each_series() -> None:
    y0, y1 = np.array([0.1, 0.25, np.nan]), np.array([1.0, -2.0, 3.5])
    spec = F.line([0, 1, 2], [("hidden_out", y0, "#111111"), ("attn_out", y1, "#222222")],
                  title="Drift per layer", ytitle="cosine", height=300, markers=True)  # fmt: skip
    fig = _valid(spec)
    assert fig.layout.title.text == "Drift per layer" and fig.layout.height == 300
    assert fig.layout.yaxis.title.text == "cosine" and fig.layout.xaxis.title.text == "layer"
    assert [t.name for t in fig.data] == ["hidden_out", "attn_out"]
    assert [t.line.color for t in fig.data] == ["#111111", "#222222"]
    assert fig.data[0].mode == "lines+markers"
    assert list(fig.data[0].y) == [0.1, 0.25, None]  # NaN as a gap, not a point
    assert list(fig.data[1].y) == [1.0, -2.0, 3.5] and list(fig.data[1].x) == [0, 1, 2]


@pytest.mark.parametrize(("shape", "text"), [((4, 5), True), ((3, 13), False), ((40, 11), False)])
def test_heatmap_spec_is_valid_and_writes_cell_text_only_when_readable(shape: tuple[int, int], text: bool) -> None:
    z = np.arange(np.prod(shape), dtype=float).reshape(shape) / 7
    spec = F.heatmap(z, list(range(shape[1])), [f"r{i}" for i in range(shape[0])], title="Cosine", zmin=0.0,
                     zmax=2.0, height=410)  # fmt: skip
    fig = _valid(spec)
    trace = fig.data[0]
    assert fig.layout.title.text == "Cosine" and fig.layout.height == 410
    np.testing.assert_allclose(np.array(trace.z, dtype=float), np.round(z, 4))
    assert (trace.zmin, trace.zmax) == (0.0, 2.0)
    assert list(trace.y) == [f"r{i}" for i in range(shape[0])] and list(trace.x) == [str(i) for i in range(shape[1])]
    assert fig.layout.yaxis.autorange == "reversed"  # first row at the top
    assert trace.texttemplate == ("%{z:.2f}" if text else None)


def test_heatmap_height_follows_rows_when_not_given() -> None:
    for rows, height in ((2, 220), (20, 510), (60, 900)):
        spec = F.heatmap(np.zeros((rows, 3)), ["a", "b", "c"], [str(i) for i in range(rows)], title="t")
        assert _valid(spec).layout.height == height


def test_signed_heatmap_and_bars_are_valid() -> None:
    spec = F.heatmap(np.array([[-1.0, 2.0]]), ["a", "b"], ["r"], title="signed", signed=True)
    trace = _valid(spec).data[0]
    assert trace.zmid == 0 and trace.reversescale is False
    fig = _valid(F.bars(["x", "y"], np.array([0.5, 0.25]), title="Bars", height=200))
    assert fig.layout.title.text == "Bars" and list(fig.data[0].x) == [0.5, 0.25] and list(fig.data[0].y) == ["x", "y"]


def test_inlined_script_cannot_end_its_element_in_any_case() -> None:
    """HTML ends a <script> element at ``</script`` in any letter case: each is defused."""
    from actstore.report.figures import script_safe

    code = 'a="</script>"; b="</SCRIPT >"; c="</ScRiPt"; d="<\\/script>"; e="</scrip"'
    out = script_safe(code)
    assert out == 'a="<\\/script>"; b="<\\/SCRIPT >"; c="<\\/ScRiPt"; d="<\\/script>"; e="</scrip"'
    assert "</script" not in out.lower()


def test_reference_charts_are_cosine_per_layer_one_line_per_reference() -> None:
    from actstore.report.run_section import layer_reference_charts

    cos = np.arange(2 * 3 * 4, dtype=float).reshape(2, 3, 4) / 24  # (reference, source, layer)
    figs = F.Figures()
    ids = layer_reference_charts(cos, ["joy", "fear"], ["#111111", "#222222"], ["hidden_out", "q", "v"],
                                 [0, 5, 6, 9], figs, "vs references")  # fmt: skip
    assert len(ids) == 3
    for si, (fid, source) in enumerate(zip(ids, ["hidden_out", "q", "v"], strict=True)):
        fig = _valid(figs.specs[fid])
        assert fig.layout.title.text == f"{source} — vs references" and fig.layout.yaxis.title.text == "cosine"
        assert [t.name for t in fig.data] == ["joy", "fear"] and list(fig.data[0].x) == [0, 5, 6, 9]
        assert list(fig.data[1].y) == pytest.approx(cos[1, si].tolist(), abs=5e-5)  # written to 4 places


@pytest.mark.parametrize("which", ["two_run_report", "one_run_report"])
def test_every_chart_a_report_embeds_is_valid_plotly(which: str, request: pytest.FixtureRequest) -> None:
    """Every spec in a built report's figures element, as the page hands it to Plotly:
    a misspelt property, mode or colour scale name in any section fails here."""
    import json
    import re

    html = request.getfixturevalue(which).read_text(encoding="utf-8")  # the report.html path
    m = re.search(r'<script type="application/json" id="figures">(.*?)</script>', html, re.S)
    assert m is not None
    specs = json.loads(m.group(1))
    assert len(specs) > 10  # every section's charts, not an empty element
    scales = []
    for fid, spec in specs.items():
        fig = _valid(spec)
        scales += [t.colorscale for t in fig.data if getattr(t, "colorscale", None) is not None]
        assert fig.layout.title.text, fid  # every chart says what it shows
    assert scales  # heatmaps were checked, named scales (e.g. the cross-layer Viridis) included
