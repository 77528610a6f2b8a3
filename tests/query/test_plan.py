"""Plans, long frames and concatenation: the table layer under every comparison."""

from __future__ import annotations

from typing import Any

import dask
import dask.array as da
import numpy as np
import pandas as pd
import pytest

from actstore.query.plan import Plan, compute_plans, concat_frames, long_frame

METRIC_COLS = ["cosine", "mae", "jaccard"]


def test_compute_passes_its_options_to_dask() -> None:
    # compute(scheduler=...) reaches dask: the plan runs on the scheduler it was given.
    calls: list[int] = []

    def counting_get(dsk: Any, keys: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return dask.get(dsk, keys, **kwargs)

    plan = Plan({"s": da.arange(4, chunks=2).sum()}, lambda v: int(v["s"]))
    assert plan.compute(scheduler=counting_get) == 6
    assert len(calls) == 1
    other = Plan({"m": da.ones(3, chunks=1).max()}, lambda v: float(v["m"]))
    assert compute_plans(plan, other, scheduler=counting_get) == [6, 1.0]
    assert len(calls) == 2  # both plans in one call
    assert compute_plans(Plan({}, lambda v: v)) == [{}]


def test_long_frame_rows_follow_the_axes() -> None:
    values = np.arange(3 * 2 * 3, dtype=np.float64).reshape(3, 2, 3)
    df = long_frame(values, [("run", ["r1", "r2"]), ("layer", [0, 5, 7])], {"source": "q"})
    assert list(df.columns) == ["source", "run", "layer", *METRIC_COLS]
    assert df["run"].tolist() == ["r1"] * 3 + ["r2"] * 3
    assert df["layer"].tolist() == [0, 5, 7] * 2
    for i, m in enumerate(METRIC_COLS):
        assert df[m].tolist() == values[i].ravel().tolist()


def test_long_frame_with_one_axis_and_with_none() -> None:
    one = long_frame(np.array([[0.5, 0.25], [1.0, 2.0], [0.0, 1.0]]), [("layer", [3, 4])], {"run": "a"})
    assert one["layer"].tolist() == [3, 4] and one["mae"].tolist() == [1.0, 2.0]
    assert one["run"].tolist() == ["a", "a"]
    scalar = long_frame(np.array([0.5, 1.5, 1.0]), [], {"run": "a", "layer": 2})
    assert len(scalar) == 1
    assert scalar.iloc[0].to_dict() == {"run": "a", "layer": 2, "cosine": 0.5, "mae": 1.5, "jaccard": 1.0}


def test_long_frame_column_dtypes() -> None:
    # Constant columns are repeated as objects, then int and str go back to their own
    # dtype (None stays as it is); metric columns are float64 whatever the block's dtype.
    values = np.full((3, 2), 0.1, dtype=np.float32)
    df = long_frame(values, [("layer", [0, 1])], {"step": 3, "name": "x", "note": None})
    assert df["step"].dtype == np.int64 and df["step"].tolist() == [3, 3]
    assert df["name"].tolist() == ["x", "x"] and not pd.api.types.is_numeric_dtype(df["name"])
    assert df["note"].tolist() == [None, None]
    for m in METRIC_COLS:
        assert df[m].dtype == np.float64
        assert df[m].tolist() == [float(np.float32(0.1))] * 2


def test_concat_frames_renumbers_rows_and_orders_columns() -> None:
    a = long_frame(np.zeros((3, 2)), [("layer", [0, 1])], {"run": "a"})
    b = long_frame(np.ones((3, 3)), [("layer", [0, 1, 2])], {"run": "b"})
    df = concat_frames([a, b], ["layer", "run", *METRIC_COLS])
    assert list(df.columns) == ["layer", "run", *METRIC_COLS]
    assert df.index.equals(pd.RangeIndex(5))  # not 0, 1, 0, 1, 2
    assert df.loc[3, "run"] == "b" and df.loc[3, "layer"] == 1


@pytest.mark.parametrize("columns", [["run", "layer", *METRIC_COLS], ["cosine", "state"]])
def test_concat_frames_of_nothing_has_the_columns_and_dtypes(columns: list[str]) -> None:
    df = concat_frames([], columns)
    assert list(df.columns) == columns and len(df) == 0
    for c in columns:
        assert (df[c].dtype == np.float64) == (c in METRIC_COLS), c
