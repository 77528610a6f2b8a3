"""Train-layout test stores: synthetic runs (tests/query/synth.py) and layouts written
straight through the segment writer, whose row values say which row they are."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from actstore.store.rows import Rows
from actstore.store.store import ActStore
from actstore.store.train_writer import SegmentWriter

SITE = ("hidden_out", 3)


def id_layout(location: Path, sizes: list[int], *, chunk_rows: int, width: int = 4, name: str = "ids",
              labels: bool = False) -> ActStore:  # fmt: skip
    """Layout ``name`` of segments of ``sizes`` rows (float32). Row r of segment s holds
    [s, r, s * 1_000_000 + r, ...] in its vector, token id s * 1_000_000 + r, and with
    ``labels`` a label column 'cls' = r % 3."""
    store = ActStore.open(location, create=True)
    for s, n in enumerate(sizes):
        rows = np.arange(n)
        values = np.zeros((n, width), np.float32)
        values[:, 0], values[:, 1], values[:, 2] = s, rows, s * 1_000_000 + rows
        facts = Rows(
            token_ids=(s * 1_000_000 + rows).astype(np.int32),
            sequence_index=np.full(n, s, np.int64),
            position=rows.astype(np.int32),
            labels={"cls": (rows % 3).astype(np.int16)} if labels else {},
        )
        w = SegmentWriter(store, name, f"seg{s:03d}", [SITE], width, "float32",
                          labels={"cls": np.int16} if labels else None, chunk_rows=chunk_rows)  # fmt: skip
        half = n // 2  # two appends: blocks that do not line up with chunks
        w.append({SITE: values[:half]}, _slice(facts, 0, half))
        w.append({SITE: values[half:]}, _slice(facts, half, n))
        w.commit()
    return store


def _slice(rows: Rows, a: int, b: int) -> Rows:
    return Rows(rows.token_ids[a:b], rows.sequence_index[a:b], rows.position[a:b],
                {k: v[a:b] for k, v in rows.labels.items()})  # fmt: skip


def folder(location: Path, layout: str, segment: str) -> Path:
    """The folder a segment's commit marker names (read here as plain JSON)."""
    import json

    marker = json.loads((location / "layouts" / layout / "committed" / f"{segment}.json").read_text())
    return location / "layouts" / layout / "segments" / marker["folder"]


def attempts(location: Path, layout: str, segment: str) -> list[Path]:
    """Every folder written for ``segment`` (committed or not)."""
    return sorted((location / "layouts" / layout / "segments").glob(f"{segment}.*"))
