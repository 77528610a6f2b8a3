"""The token-major *train layout*: one (source, layer) site over many tokens, for probes
and SAEs that read a site's rows in shuffled order.

A run is stored position-major, every layer of a position in one chunk (store/layout.py),
which serves "this position at every layer" and starves "this layer at many positions".
A train layout stores chosen sites again, rows = tokens::

    <store>/layouts/<name>/segments/<segment>.<attempt>/zarr.json  a Zarr group
        sites/<source>.<layer>        (n, d) store dtype, chunks of CHUNK_ROWS rows
        rows/token_ids                (n,) int32     \
        rows/sequence_index           (n,) int64      | row-aligned (store/rows.py)
        rows/position                 (n,) int32      |
        rows/labels/<column>          (n,)           /
    <store>/layouts/<name>/committed/<segment>.json                the commit marker

A layout is a set of independent *segments* (one per source run, or per corpus work
unit). Each attempt at a segment is written under its own folder (the segment id plus a
random attempt token) and made visible by the segment's marker, written last in one
atomic put, like a run's catalog entry, naming the folder: readers list ``committed/``
only, so a killed writer leaves an orphan folder no reader sees (``actstore gc`` removes
it), a rerun skips committed segments, and two attempts at one segment (a task retried
while the first still runs) never write into each other: the last marker wins, the
other folder is an orphan. The marker carries everything a reader needs
(row count, sites, widths, dtype, chunking, label columns, and per-site sums for the
normalisation statistics), so opening a layout is one LIST and one GET per segment.

Every chunk of every array is stored (an all-zero chunk too), so a missing chunk object
is damage, never zeros.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from actstore import naming
from actstore.errors import SelectionError, StoreError
from actstore.store import layout
from actstore.store.integrity import checksummed

LAYOUTS_PREFIX = "layouts"
SEGMENTS = "segments"
COMMITTED = "committed"
SITES_GROUP = "sites"
MARKER_FORMAT = 1

# Rows per chunk. A chunk is the unit a shuffled reader fetches: big enough that per-object
# overhead (a GET, a zarr call) is small against its bytes, small enough that a buffer of
# 64 chunks stays in memory. Measured on SmolLM2 hidden_out (d=576, float16), see
# benchmarks/results/train_reads.md.
CHUNK_ROWS = 2048
# Chunk codecs: the crc32c checksum alone, no compression. Measured on SmolLM2 bfloat16
# hidden_out (benchmarks/results/train_reads.md): zstd-1 saves 21% of the bytes (1.26x)
# but its decoding caps a shuffled epoch near 0.7 M tokens/s on one core, while
# uncompressed chunks are read straight into the shuffle buffer at memory-map speed.
# A writer can still choose zstd (SegmentWriter codecs=layout.CHUNK_CODECS); readers
# decode either.
CHUNK_CODECS = checksummed()

Site = tuple[str, int]  # (source, layer)


# ---- names and keys -----------------------------------------------------------------------
def site_name(site: Site) -> str:
    return f"{site[0]}.{site[1]}"


def parse_site(text: str) -> Site:
    source, _, layer = text.rpartition(".")
    return source, int(layer)


def layout_prefix(name: str) -> str:
    return f"{LAYOUTS_PREFIX}/{name}"


def segment_path(name: str, folder: str) -> str:
    """The prefix of a segment folder (``<segment>.<attempt>``, see SegmentInfo.folder)."""
    return f"{LAYOUTS_PREFIX}/{name}/{SEGMENTS}/{folder}"


def marker_key(name: str, segment: str) -> str:
    return f"{LAYOUTS_PREFIX}/{name}/{COMMITTED}/{segment}.json"


def check_layout_name(name: str) -> str:
    return naming.check_name(name, "layout name", "--name")


def check_sites(sites: list[Site]) -> list[Site]:
    """Per-layer vector sources only: attention weights are not rows of vectors, and
    embeddings / logits have no layer."""
    if not sites:
        raise SelectionError("a train layout needs at least one site (--source and --layers)")
    for source, layer in sites:
        naming.check_source(source)
        if source not in naming.LAYER_SOURCES or source == "attn_weights":
            raise SelectionError(
                f"--source {source}: a train layout holds per-layer vector sources "
                f"(one of {', '.join(s for s in naming.LAYER_SOURCES if s != 'attn_weights')})"
            )
        if not isinstance(layer, int) or layer < 0:
            raise SelectionError(f"--layers: layer {layer!r} must be a whole number >= 0")
    if len(set(sites)) != len(sites):
        raise SelectionError("the same site (source, layer) is given twice")
    return list(sites)


# ---- statistics ---------------------------------------------------------------------------
@dataclass
class SiteStats:
    """Running sums of one site's rows, computed while writing, merged across segments.

    ``mean`` and ``std`` are per dimension; ``mean_norm`` is the average L2 norm of a row
    and ``rms_norm`` the root of the mean squared norm (what "scale inputs to unit norm"
    recipes divide by)."""

    count: int
    sum: np.ndarray  # (d,) float64
    sum_sq: np.ndarray  # (d,) float64
    sum_norm: float

    @classmethod
    def empty(cls, width: int) -> SiteStats:
        return cls(0, np.zeros(width, np.float64), np.zeros(width, np.float64), 0.0)

    def add(self, values: np.ndarray) -> None:
        x = values.astype(np.float64)
        self.count += len(x)
        self.sum += x.sum(axis=0)
        sq = x * x
        self.sum_sq += sq.sum(axis=0)
        self.sum_norm += float(np.sqrt(sq.sum(axis=1)).sum())

    def merge(self, other: SiteStats) -> SiteStats:
        return SiteStats(self.count + other.count, self.sum + other.sum, self.sum_sq + other.sum_sq,
                         self.sum_norm + other.sum_norm)  # fmt: skip

    @property
    def mean(self) -> np.ndarray:
        return self.sum / max(1, self.count)

    @property
    def std(self) -> np.ndarray:
        var = self.sum_sq / max(1, self.count) - self.mean**2
        return np.sqrt(np.maximum(var, 0.0))

    @property
    def mean_norm(self) -> float:
        return self.sum_norm / max(1, self.count)

    @property
    def rms_norm(self) -> float:
        return math.sqrt(float(self.sum_sq.sum()) / max(1, self.count))

    def to_json(self) -> dict[str, Any]:
        return {"count": self.count, "sum": self.sum.tolist(), "sum_sq": self.sum_sq.tolist(),
                "sum_norm": self.sum_norm}  # fmt: skip

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> SiteStats:
        return cls(int(doc["count"]), np.asarray(doc["sum"], np.float64),
                   np.asarray(doc["sum_sq"], np.float64), float(doc["sum_norm"]))  # fmt: skip


def widen(values: np.ndarray, store_dtype: str) -> np.ndarray:
    """Stored values as float32 (bfloat16 bits widened exactly)."""
    if store_dtype == "bfloat16":
        return layout.bfloat16_to_float32(values)
    return values.astype(np.float32, copy=False)


# ---- the commit marker --------------------------------------------------------------------
@dataclass(frozen=True)
class SegmentInfo:
    """What a segment's commit marker records."""

    layout: str
    segment: str
    n_rows: int
    chunk_rows: int
    sites: tuple[Site, ...]
    widths: dict[Site, int]
    store_dtype: str
    labels: dict[str, str]  # label column -> dtype
    stats: dict[Site, SiteStats]
    folder: str  # the attempt's folder under segments/
    source_run: str | None = None

    @property
    def n_chunks(self) -> int:
        return -(-self.n_rows // self.chunk_rows)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": MARKER_FORMAT,
            "layout": self.layout,
            "segment": self.segment,
            "folder": self.folder,
            "n_rows": self.n_rows,
            "chunk_rows": self.chunk_rows,
            "sites": [site_name(s) for s in self.sites],
            "widths": {site_name(s): w for s, w in self.widths.items()},
            "store_dtype": self.store_dtype,
            "labels": self.labels,
            "stats": {site_name(s): st.to_json() for s, st in self.stats.items()},
            "source_run": self.source_run,
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> SegmentInfo:
        sites = tuple(parse_site(s) for s in doc["sites"])
        return cls(
            layout=doc["layout"],
            segment=doc["segment"],
            n_rows=int(doc["n_rows"]),
            chunk_rows=int(doc["chunk_rows"]),
            sites=sites,
            widths={parse_site(k): int(v) for k, v in doc["widths"].items()},
            store_dtype=doc["store_dtype"],
            labels=dict(doc.get("labels", {})),
            stats={parse_site(k): SiteStats.from_json(v) for k, v in doc["stats"].items()},
            folder=str(doc["folder"]),
            source_run=doc.get("source_run"),
        )


def put_marker(zstore: Any, key: str, data: bytes) -> None:
    """One atomic put: a rename on local disk, one PUT on object storage."""
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync
    from zarr.storage import LocalStore

    if isinstance(zstore, LocalStore):
        from actstore.store.remote import _local_put_atomic

        _local_put_atomic(Path(zstore.root) / key, data)
    else:
        sync(zstore.set(key, default_buffer_prototype().buffer.from_bytes(data)))


def list_markers(zstore: Any, name: str) -> list[str]:
    """Segment ids with a commit marker in layout ``name``, sorted."""
    from zarr.core.sync import sync

    prefix = f"{layout_prefix(name)}/{COMMITTED}/"

    async def keys() -> list[str]:
        return [k async for k in zstore.list_prefix(prefix)]

    out = []
    for key in sync(keys()):
        leaf = key[len(prefix) :] if key.startswith(prefix) else key.rsplit("/", 1)[-1]
        if "/" not in leaf and leaf.endswith(".json") and not leaf.startswith(".tmp-"):
            out.append(leaf[: -len(".json")])
    return sorted(out)


def read_marker(zstore: Any, name: str, segment: str) -> SegmentInfo:
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    key = marker_key(name, segment)
    buf = sync(zstore.get(key, prototype=default_buffer_prototype()))
    if buf is None:
        raise StoreError(f"layout {name}: segment {segment} has no commit marker ({key})")
    try:
        return SegmentInfo.from_json(json.loads(buf.to_bytes()))
    except (ValueError, KeyError, TypeError) as e:
        raise StoreError(f"layout {name}: commit marker {key} does not parse ({e}); "
                         "see `actstore check`") from e  # fmt: skip


def list_layouts(zstore: Any) -> list[str]:
    """Names of every layout folder in the store (committed segments or not)."""
    from zarr.core.sync import sync

    async def dirs() -> list[str]:
        return [k.rstrip("/") async for k in zstore.list_dir(LAYOUTS_PREFIX)]

    try:
        names = {d.rsplit("/", 1)[-1] for d in sync(dirs())}
    except FileNotFoundError:
        return []
    # list_dir gives objects and prefixes alike: layouts/zarr.json is the group's metadata
    return sorted(names - {"zarr.json"})
