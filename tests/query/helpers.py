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
def _group(run: Any) -> Any:
    return zarr.open_group(store=run.group.store, path=run.group.path, mode="r")


def raw(run: Any, source: str, prefix: str = "") -> np.ndarray:
    """(L, T, W) float64 of a per-layer source (or (T, W) global), read with zarr only.
    ``prefix="passes/"``: the own rows of the run's full passes instead."""
    g = _group(run)
    meta = g.attrs["run"]
    if source in ("hidden_in", "hidden_out"):
        res = g[f"{prefix}acts/residual"]
        bounds = list(res.attrs["boundaries"])
        shift = 0 if source == "hidden_in" else 1
        data = np.stack([res[bounds.index(layer + shift)] for layer in meta["layers"]])
    elif source == "mlp_down_in" and f"{prefix}acts/mlp_down_in" not in g:
        act = g[f"{prefix}acts/mlp_act"][...]  # the product is served in the store dtype
        data = act * g[f"{prefix}acts/mlp_up"][...] if meta["gated_mlp"] else act
    else:
        data = g[f"{prefix}acts/{source}"][...]
    return np.asarray(data, dtype=np.float64)


def raw_pass(run: Any, kind: str, key: int | str, source: str) -> np.ndarray:
    """One full snapshot or reference pass, float64, rebuilt with zarr only from the
    layout store/passes.py documents: the base's first ``shared`` positions, then the
    pass's own rows (attention: the base's rows zero-padded on the right)."""
    meta = _group(run).attrs["run"]
    records = meta["passes"]
    if key == "generated":
        key = next(s["index"] for s in meta["snapshots"] if s.get("generated"))
    i = next(i for i, r in enumerate(records) if r["kind"] == kind and r["key"] == key)
    return _raw_record(run, records, i, source)


def _raw_record(run: Any, records: list[dict[str, Any]], i: int, source: str) -> np.ndarray:
    r = records[i]
    base = raw(run, source) if r["base"] is None else _raw_record(run, records, r["base"], source)
    n, length, s, e = r["shared"], r["length"], r["start"], r["start"] + r["rows"]
    own = raw(run, source, "passes/") if r["rows"] else None
    if source == "attn_weights":
        out = np.zeros((*base.shape[:2], length, length))
        out[:, :, :n, :n] = base[:, :, :n, :n]
        if own is not None:
            out[:, :, n:, :] = own[:, :, s:e, :length]
        return out
    if base.ndim == 3:
        return base[:, :n] if own is None else np.concatenate([base[:, :n], own[:, s:e]], axis=1)
    return base[:n] if own is None else np.concatenate([base[:n], own[s:e]], axis=0)


def raw_stack(run: Any, kind: str, source: str) -> np.ndarray:
    """(rows, L, H) float64 of snapshots or references, read with zarr only."""
    return np.asarray(_group(run)[f"{kind}/{source}"][...], dtype=np.float64)


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


# ---- lab expectations -------------------------------------------------------------------
def raw_state(run: Any, state: str, source: str) -> np.ndarray:
    """(L, W) float64 of a state (initial, final, snapshot:K, reference:LABEL) read with
    zarr only (positions from the run's metadata)."""
    kind, _, arg = state.partition(":")
    if kind in ("initial", "final"):
        meta = _group(run).attrs["run"]
        pos = meta["prompt_len"] - 1 if kind == "initial" else meta["n_positions"] - 1
        return raw(run, source)[:, pos]
    if kind == "snapshot":
        return raw_stack(run, "snapshots", source)[int(arg)]
    if kind == "reference":
        return raw_stack(run, "references", source)[list(_group(run).attrs["run"]["references"]).index(arg)]
    raise ValueError(state)


def np_std_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.std(a - b))


def np_scores(q: np.ndarray, k: np.ndarray, heads: int, kv_heads: int, dim: int) -> np.ndarray:
    """(heads, Tq, Tk) q_h . k_g / sqrt(dim), g = h // (heads / kv_heads), by a loop."""
    out = np.zeros((heads, len(q), len(k)))
    for h in range(heads):
        g = h // (heads // kv_heads)
        for i in range(len(q)):
            for j in range(len(k)):
                out[h, i, j] = np.dot(q[i, h * dim : (h + 1) * dim], k[j, g * dim : (g + 1) * dim]) / np.sqrt(dim)
    return out


def np_qkv_last(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Activation Lab's qkv_last rows from per-layer (L, W) q, k, v at one token."""
    rows = []
    for ql, kl, vl in zip(q.astype(np.float32), k.astype(np.float32), v.astype(np.float32), strict=True):
        m = min(ql.shape[0], kl.shape[0])
        rows.append(float(np.dot(ql[:m], kl[:m]) / np.sqrt(m)) * vl)
    return np.stack(rows)
