"""Tables for the templates: formatted cells with an optional background colour.

The templates only lay tables out (``_macros.html.j2: table``); choosing how a number is
written and how it is coloured happens here, once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import pandas as pd


@dataclass(frozen=True)
class Cell:
    text: str
    bg: str | None = None
    cls: str = ""
    title: str = ""


@dataclass
class Table:
    """``columns`` headers, ``rows`` of cells; ``groups`` optional (label, span) header row."""

    columns: list[str]
    rows: list[list[Cell]]
    groups: list[tuple[str, int]] = field(default_factory=list)
    cls: str = ""


def is_missing(v: Any) -> bool:
    if v is None or v is pd.NA:
        return True
    try:
        return math.isnan(float(v))
    except (TypeError, ValueError):
        return False


def fmt(v: Any, digits: int = 3) -> str:
    """A number for a table: fixed decimals, integers as integers, '–' when missing."""
    if is_missing(v):
        return "–"
    if isinstance(v, str):
        return v
    f = float(v)
    if f.is_integer() and abs(f) < 1e6 and not isinstance(v, float):
        return str(int(f))
    if abs(f) >= 1000:
        return f"{f:,.0f}"
    return f"{f:.{digits}f}"


def scale_bg(v: Any, lo: float, hi: float, reverse: bool = False) -> str | None:
    """Red (low) to amber to green (high) background; ``reverse`` for distances."""
    if is_missing(v):
        return None
    t = (float(v) - lo) / (hi - lo) if hi > lo else 0.5
    t = min(1.0, max(0.0, t))
    if reverse:
        t = 1.0 - t
    if t < 0.5:
        r, g = 220, int(60 + 240 * t)
    else:
        r, g = int(220 - 260 * (t - 0.5)), 180
    return f"rgba({r},{g},60,0.35)"


def num_cell(
    v: Any, lo: float | None = None, hi: float | None = None, reverse: bool = False, digits: int = 3
) -> Cell:
    """A number cell, coloured on the ``lo``..``hi`` scale when both are given."""
    if is_missing(v):
        return Cell("–", None, "num")
    bg = scale_bg(v, lo, hi, reverse) if lo is not None and hi is not None else None
    return Cell(fmt(v, digits), bg, "num")


def text_cell(v: Any, cls: str = "") -> Cell:
    return Cell("" if is_missing(v) else str(v), None, cls)


def frame_table(
    df: pd.DataFrame, color: dict[str, tuple[float, float, bool]] | None = None, digits: int = 3
) -> Table:
    """A DataFrame as a table: numbers formatted, ``color`` maps a column to (lo, hi, reverse)."""
    color = color or {}
    cols = [str(c) for c in df.columns]
    rows = []
    for rec in df.to_numpy(dtype=object):  # itertuples costs ~1 ms a frame; this far less
        row = []
        for col, v in zip(cols, rec, strict=True):
            if isinstance(v, str) or v is None:
                row.append(text_cell(v))
            elif col in color:
                lo, hi, rev = color[col]
                row.append(num_cell(v, lo, hi, rev, digits))
            else:
                row.append(num_cell(v, digits=digits))
        rows.append(row)
    return Table([str(c) for c in df.columns], rows)


def span(values: Any) -> tuple[float, float]:
    """(min, max) of the finite values, for a colour scale (:func:`scale_bg` gives equal
    bounds its middle colour); (0, 1) when there are none."""
    s = pd.Series(values, dtype="float64").dropna()
    if s.empty:
        return 0.0, 1.0
    return float(s.min()), float(s.max())
