"""Table cells of the report: what a missing number shows, how numbers are written and
coloured, worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from actstore.report.cells import Cell, fmt, num_cell, scale_bg, text_cell


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
