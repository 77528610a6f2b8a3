"""Helpers for query tests: independent Zarr reads, plain-NumPy metrics, a counting store.

``raw`` reads vectors straight from the Zarr arrays, independently of actstore's reader
and query code, for the plain-NumPy expectations the tests compare against.
``CountingStore`` wraps a store and records every data read (key, bytes).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import zarr

RESIDUAL = ("hidden_in", "hidden_out", "attn_out", "mlp_down_out")


# ---- independent reads ------------------------------------------------------------------
def raw(run: Any, source: str) -> np.ndarray:
    """(L, T, W) float64 of a per-layer source (or (T, W) global), read with zarr only."""
    g = zarr.open_group(store=run.group.store, path=run.group.path, mode="r")
    meta = g.attrs["run"]
    if source in ("hidden_in", "hidden_out"):
        res = g["acts/residual"]
        bounds = list(res.attrs["boundaries"])
        shift = 0 if source == "hidden_in" else 1
        data = np.stack([res[bounds.index(layer + shift)] for layer in meta["layers"]])
    elif source == "mlp_down_in" and "acts/mlp_down_in" not in g:
        act = g["acts/mlp_act"][...]  # the product is served in the store dtype
        data = act * g["acts/mlp_up"][...] if meta["gated_mlp"] else act
    else:
        data = g[f"acts/{source}"][...]
    return np.asarray(data, dtype=np.float64)


def raw_stack(run: Any, kind: str, source: str) -> np.ndarray:
    """(rows, L, H) float64 of snapshots or references, read with zarr only."""
    g = zarr.open_group(store=run.group.store, path=run.group.path, mode="r")
    return np.asarray(g[f"{kind}/{source}"][...], dtype=np.float64)


def np_cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def np_mae(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(np.abs(a - b)))


def np_jaccard(a: np.ndarray, b: np.ndarray, frac: float = 0.01, magnitude: bool = False) -> float:
    k = max(1, int(len(a) * frac))
    va, vb = (np.abs(a), np.abs(b)) if magnitude else (a, b)
    sa, sb = set(np.argsort(-va, kind="stable")[:k]), set(np.argsort(-vb, kind="stable")[:k])
    return len(sa & sb) / len(sa | sb)


# The read-counting store lives in actstore.testing (the query benchmark uses it too).
from actstore.testing import CountingStore, counting_store  # noqa: E402,F401
