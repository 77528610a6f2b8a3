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


def quiet_nanmean(x: np.ndarray, axis: int) -> np.ndarray:
    """``np.nanmean`` without NumPy's "Mean of empty slice" warning: a cosine with a zero
    vector (a reference or snapshot with no direction) is NaN by design, left out of the
    means and drawn as a gap, and a slice of nothing but those is NaN."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(x, axis=axis)


def best_labels(z: np.ndarray, labels: Sequence[str]) -> list[str | None]:
    """Per row of ``z`` (rows, labels): the label of its highest value, None when the row
    has no defined (non-NaN) value: a message with no cosine to any reference has no
    closest one (``query.tables.reference_tables`` says the same)."""
    filled = np.where(np.isnan(z), -np.inf, z)
    if not len(labels):
        return [None] * len(filled)
    return [labels[i] if np.isfinite(row[i]) else None for row, i in zip(filled, filled.argmax(axis=1), strict=True)]


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
        z = quiet_nanmean(quiet_nanmean(self.values[0], axis=-1), axis=-1)  # (M, R)
        df = pd.DataFrame({"message": self.messages, "role": self.roles, "preview": self.previews})
        for r, lab in enumerate(self.labels):
            df[lab] = z[:, r]
        df["best"] = pd.Series(best_labels(z, self.labels), dtype=object)  # None stays None
        return df

    def role_mean(self, role: str) -> np.ndarray | None:
        """``(metric, reference, source, layer)`` mean over the role's snapshots, as
        ``role_averages``; None when the run has no message of that role."""
        rows = [i for i, r in enumerate(self.roles) if r == role]
        return quiet_nanmean(self.values[:, rows], axis=1) if rows else None

    def within(self) -> np.ndarray:
        """``(source, layer)``: mean over snapshots of the cosine distance to the closest
        reference (the ``within`` of layer discrimination). A snapshot with no cosine to
        any reference (a zero vector) is left out, as the query layer leaves it out."""
        with warnings.catch_warnings():  # its all-NaN row: NaN, then skipped by the mean
            warnings.simplefilter("ignore", RuntimeWarning)
            return np.nanmean(np.nanmin(1 - self.values[0], axis=1), axis=0)
