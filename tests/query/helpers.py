"""Helpers for query tests: independent Zarr reads, plain-NumPy metrics, a counting store.

``raw`` reads vectors straight from the Zarr arrays, independently of actstore's reader
and query code, for the plain-NumPy expectations the tests compare against.
``CountingStore`` wraps a store and records every data read (key, bytes).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.abc.store import ByteRequest
from zarr.core.buffer import Buffer, BufferPrototype
from zarr.storage import LocalStore, WrapperStore

from actstore.store.store import ActStore

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


# ---- a store that counts reads ---------------------------------------------------------
class CountingStore(WrapperStore[Any]):
    """Records (key, bytes) of every get / get_partial_values."""

    def __init__(self, store: Any, log: list[tuple[str, int]] | None = None) -> None:
        super().__init__(store)
        self.log: list[tuple[str, int]] = [] if log is None else log

    def _with_store(self, store: Any) -> CountingStore:
        return type(self)(store, self.log)

    async def get(
        self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None
    ) -> Buffer | None:
        buf = await self._store.get(key, prototype, byte_range)
        self.log.append((key, 0 if buf is None else len(buf)))
        return buf

    async def get_partial_values(self, prototype: BufferPrototype, key_ranges: Any) -> list[Buffer | None]:
        key_ranges = list(key_ranges)
        bufs = await self._store.get_partial_values(prototype, key_ranges)
        for (key, _), buf in zip(key_ranges, bufs, strict=True):
            self.log.append((key, 0 if buf is None else len(buf)))
        return bufs

    def data_reads(self) -> list[tuple[str, int]]:
        """Reads of array data (not metadata, not the catalog)."""
        return [(k, n) for k, n in self.log if not k.endswith("zarr.json") and not k.startswith("catalog/")]

    def reset(self) -> None:
        self.log.clear()


def counting_store(location: str | Path) -> tuple[ActStore, CountingStore]:
    cs = CountingStore(LocalStore(str(location), read_only=True))
    return ActStore(cs, str(location), zarr.open_group(store=cs, mode="r")), cs
