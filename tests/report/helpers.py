"""Independent reference values: vectors read straight from the Zarr arrays (no actstore
reader or query code) and the seed's metrics written out in plain NumPy."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import zarr

SOURCES = ("hidden_in", "hidden_out", "attn_out", "mlp_down_out")


def run_group(store: Any, run_id: str) -> zarr.Group:
    root = zarr.open_group(store=str(store.location), mode="r")
    group = root[f"runs/{run_id}"]
    assert isinstance(group, zarr.Group)
    return group


def vectors_at(group: zarr.Group, source: str, position: int) -> np.ndarray:
    """(L, W) float64 vectors of one source at one position, from the raw arrays."""
    meta = group.attrs["run"]
    layers = meta["layers"]
    if source in ("hidden_in", "hidden_out"):
        res = np.asarray(group["acts/residual"][:, position])
        bounds = meta["residual_boundaries"]
        shift = 1 if source == "hidden_out" else 0
        return np.stack([res[bounds.index(layer + shift)] for layer in layers]).astype(np.float64)
    return np.asarray(group[f"acts/{source}"][:, position]).astype(np.float64)


def stacked(group: zarr.Group, kind: str, source: str) -> np.ndarray:
    """(rows, L, W) snapshots or references of a source."""
    return np.asarray(group[f"{kind}/{source}"][...]).astype(np.float64)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def mae(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs(a - b).mean(-1)


def overlap(a: np.ndarray, b: np.ndarray, frac: float = 0.01) -> np.ndarray:
    """The seed's top-1% Jaccard: dimensions ranked by |x|, per row."""
    k = max(1, int(a.shape[-1] * frac))
    out = []
    for x, y in zip(a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1]), strict=True):
        sa, sb = set(np.argsort(np.abs(x))[-k:].tolist()), set(np.argsort(np.abs(y))[-k:].tolist())
        out.append(len(sa & sb) / len(sa | sb))
    return np.asarray(out).reshape(a.shape[:-1])


def report_figures(html_path: Path) -> dict[str, Any]:
    """The figure specs embedded in a report page."""
    html = Path(html_path).read_text(encoding="utf-8")
    m = re.search(r'<script type="application/json" id="figures">(.*?)</script>', html, re.S)
    assert m, "no figures blob in the report"
    return json.loads(m.group(1))
