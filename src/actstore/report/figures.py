"""Plotly figure specs for the report, as plain dicts.

Each builder returns a plotly.js figure (``{"data": [...], "layout": {...}}``) made of
lists and numbers only, so thousands of them serialise fast (``plotly.graph_objects``
validation would cost milliseconds per figure). :class:`Figures` collects them under
short ids; the page embeds them as one JSON blob and ``static/report.js`` draws each
one with ``Plotly.newPlot`` when its container becomes visible.

Numbers are rounded to 4 decimals and NaN becomes ``null`` (a gap in plotly).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from actstore import colours

SOURCE_COLORS = {
    "hidden_in": "#3b82f6",
    "hidden_out": "#10b981",
    "attn_out": "#f59e0b",
    "mlp_down_out": "#ef4444",
}
PALETTE = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
    "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
)  # fmt: skip
# Similarity scales: red = divergent, green = similar (reversed for MAE, where high = far).
SIMILARITY_SCALE = [[0.0, "#b91c1c"], [0.5, "#fde68a"], [1.0, "#15803d"]]
# Signed values: negative blue, 0 white, positive red (actstore.colours)
DIVERGING_SCALE = colours.DIVERGING_SCALE
_MAX_CELL_TEXT = 400  # write values into heatmap cells only when they stay readable
_MAX_TEXT_COLS = 12


def color(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


def num(values: Any, decimals: int = 4) -> list[Any]:
    """A JSON-ready (nested) list: rounded floats, ``None`` for NaN / inf."""
    a = np.round(np.asarray(values, dtype=np.float64), decimals)
    finite = np.isfinite(a)
    if finite.all():
        return a.tolist()  # type: ignore[no-any-return]
    out = a.astype(object)
    out[~finite] = None
    return out.tolist()  # type: ignore[no-any-return]


def _layout(title: str, xtitle: str, ytitle: str, height: int, **extra: Any) -> dict[str, Any]:
    layout: dict[str, Any] = {
        "title": {"text": title, "font": {"size": 13}, "x": 0.02, "xanchor": "left"},
        "height": height,
        "margin": {"l": 56, "r": 16, "t": 36, "b": 44},
        "font": {"size": 11, "family": "system-ui, sans-serif"},
        "xaxis": {"title": {"text": xtitle}, "automargin": True},
        "yaxis": {"title": {"text": ytitle}, "automargin": True},
        "paper_bgcolor": "rgba(0,0,0,0)",
        "plot_bgcolor": "#fbfbfd",
    }
    layout.update(extra)
    return layout


def line(
    x: Sequence[Any],
    series: Sequence[tuple[str, Any, str]],
    *,
    title: str,
    xtitle: str = "layer",
    ytitle: str = "",
    yrange: tuple[float, float] | None = None,
    height: int = 280,
    markers: bool = False,
    xlabels: Sequence[str] | None = None,
) -> dict[str, Any]:
    """One line per ``(name, y, color)`` over a shared x axis."""
    data = [
        {
            "type": "scatter",
            "mode": "lines+markers" if markers else "lines",
            "name": name,
            "x": list(x),
            "y": num(y),
            "line": {"color": col, "width": 2},
            "marker": {"size": 5},
            "hovertemplate": f"{name}<br>%{{x}}: %{{y:.4f}}<extra></extra>",
        }
        for name, y, col in series
    ]
    legend = {
        "x": 1.02,
        "xanchor": "left",
        "y": 1,
        "yanchor": "top",
        "font": {"size": 10},
        "tracegroupgap": 2,
    }
    # Tall enough that the legend beside the plot never needs a scrollbar.
    layout = _layout(title, xtitle, ytitle, max(height, 120 + 19 * len(series)), legend=legend)
    if yrange is not None:
        layout["yaxis"]["range"] = list(yrange)
    if xlabels is not None:
        layout["xaxis"].update({"tickmode": "array", "tickvals": list(x), "ticktext": list(xlabels)})
    return {"data": data, "layout": layout}


def heatmap(
    z: Any,
    x: Sequence[Any],
    y: Sequence[Any],
    *,
    title: str,
    xtitle: str = "",
    ytitle: str = "",
    zmin: float | None = None,
    zmax: float | None = None,
    colorscale: Any = SIMILARITY_SCALE,
    reverse: bool = False,
    height: int | None = None,
    zlabel: str = "cosine",
    signed: bool = False,
) -> dict[str, Any]:
    """A heatmap of ``z`` (rows ``y``, columns ``x``), first row at the top. ``signed``:
    :data:`DIVERGING_SCALE` centred on 0 (positive red, negative blue)."""
    z = np.asarray(z, dtype=np.float64)
    rows, cols = z.shape
    trace: dict[str, Any] = {
        "type": "heatmap",
        "z": num(z),
        "x": [str(v) for v in x],
        "y": [str(v) for v in y],
        "colorscale": colorscale,
        "reversescale": reverse,
        "xgap": 1 if cols <= 60 else 0,
        "ygap": 1 if rows <= 60 else 0,
        "colorbar": {"thickness": 10, "title": {"text": zlabel, "side": "right"}},
        "hovertemplate": f"%{{y}} · %{{x}}<br>{zlabel}: %{{z:.4f}}<extra></extra>",
    }
    if signed:
        trace.update(colorscale=DIVERGING_SCALE, reversescale=False, zmid=0)
    if zmin is not None:
        trace["zmin"] = zmin
    if zmax is not None:
        trace["zmax"] = zmax
    if rows * cols <= _MAX_CELL_TEXT and cols <= _MAX_TEXT_COLS:
        trace["texttemplate"] = "%{z:.2f}"
        trace["textfont"] = {"size": 9}
    h = height or int(min(900, max(220, 70 + 22 * rows)))
    layout = _layout(title, xtitle, ytitle, h)
    layout["yaxis"].update({"autorange": "reversed", "type": "category"})
    layout["xaxis"].update({"type": "category"})
    return {"data": [trace], "layout": layout}


def bars(
    labels: Sequence[str], values: Any, *, title: str, xtitle: str = "", ytitle: str = "", height: int = 280
) -> dict[str, Any]:
    """Horizontal bars, first label at the top."""
    trace = {
        "type": "bar",
        "orientation": "h",
        "x": num(values),
        "y": list(labels),
        "marker": {"color": PALETTE[0]},
        "hovertemplate": "%{y}: %{x:.4f}<extra></extra>",
    }
    layout = _layout(title, xtitle, ytitle, height)
    layout["yaxis"].update({"autorange": "reversed", "type": "category"})
    return {"data": [trace], "layout": layout}


class Figures:
    """Figure specs by id; ``add`` returns the id a template puts on a chart container."""

    def __init__(self) -> None:
        self.specs: dict[str, dict[str, Any]] = {}

    def add(self, spec: dict[str, Any]) -> str:
        fid = f"f{len(self.specs)}"
        self.specs[fid] = spec
        return fid

    def __len__(self) -> int:
        return len(self.specs)

    def to_json(self) -> str:
        """The specs as JSON that is safe inside ``<script type="application/json">``."""
        text = json.dumps(self.specs, separators=(",", ":"), allow_nan=False, ensure_ascii=False)
        return json_for_script(text)


def json_for_script(text: str) -> str:
    """JSON with ``<``, ``>`` and ``&`` escaped (still valid JSON), so nothing in it can
    end or confuse the ``<script>`` element it is inlined in (as Jinja's ``tojson``)."""
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def script_safe(code: str) -> str:
    """JavaScript source with every ``</script`` defused, for inlining."""
    return re.sub(r"</(script)", r"<\/\1", code, flags=re.IGNORECASE)
