"""A query plan: lazy pieces plus the function that turns their values into a table.

>>> import dask.array as da
>>> plan = Plan({"x": da.arange(3).sum()}, lambda v: {"x": int(v["x"])})
>>> plan.compute()
{'x': 3}

Every comparison and analysis first *builds* a plan (selecting states and reducing them
into small lazy arrays: no bytes read), then computes it. ``compute_plans`` hands the
pieces of several plans to ONE ``dask.compute`` call, so Dask reads each chunk once and
runs independent reads concurrently, instead of one compute per layer or per table.
``long_frame`` then lays a computed ``(3, n1, n2, ...)`` metric block out as long rows.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import dask
import numpy as np
import pandas as pd

from actstore.query.metrics import METRICS


@dataclass
class Plan:
    """``pieces``: name -> lazy array (or any Dask collection); ``finish`` gets the
    same names mapped to NumPy values and returns the result (usually a DataFrame)."""

    pieces: dict[Hashable, Any]
    finish: Callable[[dict[Hashable, Any]], Any]

    def compute(self, **compute_kwargs: Any) -> Any:
        return compute_plans(self, **compute_kwargs)[0]


def compute_plans(*plans: Plan, **compute_kwargs: Any) -> list[Any]:
    """Compute every plan's pieces in one Dask graph and finish each plan."""
    keyed = {(i, k): v for i, p in enumerate(plans) for k, v in p.pieces.items()}
    (values,) = dask.compute(keyed, **compute_kwargs) if keyed else ({},)
    return [p.finish({k: values[(i, k)] for k in p.pieces}) for i, p in enumerate(plans)]


def long_frame(values: np.ndarray, axes: Sequence[tuple[str, Any]], const: dict[str, Any]) -> pd.DataFrame:
    """Rows of a ``(3, n1, n2, ...)`` metric block: constant columns, one column per
    labelled axis, then cosine, mae, jaccard."""
    grids = np.meshgrid(*[np.arange(len(labels)) for _, labels in axes], indexing="ij")
    n = grids[0].size if grids else 1
    data: dict[str, Any] = {k: np.repeat(np.asarray([v], dtype=object), n) for k, v in const.items()}
    for (name, labels), g in zip(axes, grids, strict=True):
        data[name] = np.asarray(labels)[g.ravel()]
    for i, m in enumerate(METRICS):
        data[m] = np.asarray(values[i], dtype=np.float64).ravel()
    df = pd.DataFrame(data)
    for k, v in const.items():  # object columns back to their natural dtype
        df[k] = df[k].astype(type(v)) if isinstance(v, (int, str)) else df[k]
    return df


def concat_frames(frames: list[pd.DataFrame], columns: list[str]) -> pd.DataFrame:
    """Frames concatenated in ``columns`` order; an empty frame of those columns if none."""
    if not frames:
        return pd.DataFrame({c: pd.Series(dtype=np.float64 if c in METRICS else object) for c in columns})
    return pd.concat(frames, ignore_index=True)[columns]
