"""Long query frames as dense NumPy cubes, for laying out many charts quickly.

The query layer answers in long format (one row per run/message/reference/source/
layer). Charts want slices such as "cosine per layer of every reference, for message 3
and hidden_out"; filtering the long frame once per chart costs milliseconds each, and a
run with 20 messages has hundreds of charts. :func:`dense` scatters the rows into one
array indexed by the given axes once; slices are then free. Missing combinations stay
NaN. :class:`SvrCube` is that cube for one run's snapshots-vs-references answer.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd


def dense(df: pd.DataFrame, axes: Sequence[tuple[str, Sequence[Any]]], values: Sequence[str]) -> np.ndarray:
    """``(len(values), len(axis1), len(axis2), ...)`` array of ``df[values]`` indexed by
    the labels of each ``(column, labels)`` axis; rows whose labels are not listed are
    dropped."""
    shape = tuple(len(labels) for _, labels in axes)
    out = np.full((len(values), *shape), np.nan)
    if df.empty:
        return out
    keep = np.ones(len(df), dtype=bool)
    codes = []
    for col, labels in axes:
        c = pd.Categorical(df[col], categories=list(labels)).codes
        keep &= c >= 0
        codes.append(c)
    idx = tuple(c[keep] for c in codes)
    for i, v in enumerate(values):
        out[(i, *idx)] = df[v].to_numpy(dtype=np.float64)[keep]
    return out


METRICS = ("cosine", "mae", "jaccard")


class SvrCube:
    """One run's snapshots-vs-references frame as ``values[metric, message, reference,
    source, layer]``, with the reductions the report shows. Each equals the matching
    query-layer table (``query.tables.reference_tables``, ``query.compare.role_averages``,
    the ``within`` of ``query.analyses.layer_discrimination``); tests/report check that."""

    def __init__(self, svr: pd.DataFrame, run: Any):
        self.messages = [int(s["index"]) for s in run.snapshot_index]
        self.roles = [str(s["role"]) for s in run.snapshot_index]
        self.previews = [str(s.get("content_preview", "")) for s in run.snapshot_index]
        self.labels = list(run.reference_labels)
        self.sources = [str(s) for s in pd.unique(svr["source"].to_numpy(dtype=object))]
        self.layers = sorted(int(v) for v in pd.unique(svr["layer"].to_numpy()))
        axes = [
            ("message", self.messages),
            ("reference", self.labels),
            ("source", self.sources),
            ("layer", self.layers),
        ]
        self.values = dense(svr, axes, METRICS)

    def message_reference(self) -> pd.DataFrame:
        """message, role, preview, one column per reference (cosine averaged over layers
        within each source, then over sources), best: as ``reference_tables``."""
        with warnings.catch_warnings():  # a reference with no direction: NaN, as intended
            warnings.simplefilter("ignore", RuntimeWarning)
            z = np.nanmean(np.nanmean(self.values[0], axis=-1), axis=-1)  # (M, R)
        df = pd.DataFrame({"message": self.messages, "role": self.roles, "preview": self.previews})
        for r, lab in enumerate(self.labels):
            df[lab] = z[:, r]
        df["best"] = [self.labels[i] for i in np.nanargmax(np.where(np.isnan(z), -np.inf, z), axis=1)]
        return df

    def role_mean(self, role: str) -> np.ndarray | None:
        """``(metric, reference, source, layer)`` mean over the role's snapshots, as
        ``role_averages``; None when the run has no message of that role."""
        rows = [i for i, r in enumerate(self.roles) if r == role]
        return np.nanmean(self.values[:, rows], axis=1) if rows else None

    def within(self) -> np.ndarray:
        """``(source, layer)``: mean over snapshots of the cosine distance to the closest
        reference (the ``within`` of layer discrimination)."""
        return np.nanmean(np.nanmin(1 - self.values[0], axis=1), axis=0)
