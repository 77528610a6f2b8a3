"""Read a train layout (store/train_layout.py): its committed segments, chunk by chunk.

:class:`TrainLayout` opens a layout with one LIST and one GET per committed segment
marker, numbers every chunk of every segment (the unit a shuffled reader fetches) and
reads one chunk of the chosen sites and row columns at a time. The normalisation
statistics are the merged sums of the markers: no array is read for them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import google_crc32c
import numcodecs
import numpy as np
import zarr
from zarr.abc.store import Store
from zarr.codecs import BytesCodec, Crc32cCodec, ZstdCodec
from zarr.core.buffer import Buffer, default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import LocalStore

from actstore.errors import DamagedRunError, SelectionError, StoreError
from actstore.store import integrity, layout
from actstore.store import rows as row_facts
from actstore.store import train_layout as tl


def _codec_of(arr: Any) -> str | None:
    """``raw`` or ``zstd`` when ``arr``'s codec chain is one segments are written with
    (bytes, optionally zstd, then crc32c): such chunks are decoded here, without zarr's
    generic path (~0.5 ms of Python per chunk and array, as much as reading 2,048
    uncompressed rows), checksum verified all the same. None: read through zarr."""
    codecs = arr.metadata.codecs
    if len(codecs) not in (2, 3) or not isinstance(codecs[0], BytesCodec) or not isinstance(codecs[-1], Crc32cCodec):
        return None
    if len(codecs) == 2:
        return "raw"
    return "zstd" if isinstance(codecs[1], ZstdCodec) and not codecs[1].checksum else None


_ZSTD = numcodecs.Zstd()


class _StrictChunks(integrity.CheckedReads):
    """A missing chunk object of a committed segment is damage (every chunk is stored),
    not zeros."""

    def _with_store(self, store: Store) -> _StrictChunks:
        return type(self)(store)

    def _check(self, key: str, value: Buffer | None) -> Buffer | None:
        if value is None and "/c/" in key:
            raise integrity.MissingObjectError(key)
        return value


@dataclass(frozen=True)
class Chunk:
    """One chunk: rows ``start:stop`` of segment ``segment`` (an index into segments)."""

    segment: int
    index: int
    start: int
    stop: int

    @property
    def n_rows(self) -> int:
        return self.stop - self.start


class TrainLayout:
    """The committed segments of one train layout.

    >>> lay = TrainLayout.open(store, "probes")                     # doctest: +SKIP
    >>> lay.n_rows, lay.sites, lay.stats(("hidden_out", 8)).mean    # doctest: +SKIP
    >>> block = lay.read_chunk(lay.chunks[0], [("hidden_out", 8)])  # doctest: +SKIP
    """

    def __init__(self, store: Any, name: str, segments: list[tl.SegmentInfo]):
        self.store = store
        self.name = name
        self.segments = segments
        if not segments:
            raise StoreError(f"{store.location}: layout {name!r} has no committed segments "
                             "(make one with `actstore materialize`)")  # fmt: skip
        first = segments[0]
        self.store_dtype = first.store_dtype
        self.widths = dict(first.widths)
        for seg in segments[1:]:
            if seg.store_dtype != self.store_dtype:
                raise StoreError(f"layout {name}: segment {seg.segment} is {seg.store_dtype}, "
                                 f"segment {first.segment} {self.store_dtype}")  # fmt: skip
        # The sites (and label columns) every segment holds.
        self.sites = [s for s in first.sites if all(s in seg.widths for seg in segments)]
        self.labels = [c for c in first.labels if all(c in seg.labels for seg in segments)]
        for seg in segments:
            for s in self.sites:
                if seg.widths[s] != self.widths[s]:
                    raise StoreError(f"layout {name}: site {tl.site_name(s)} is {seg.widths[s]} wide in "
                                     f"segment {seg.segment}, {self.widths[s]} in {first.segment}")  # fmt: skip
        self.chunks: list[Chunk] = []
        for i, seg in enumerate(segments):
            for c in range(seg.n_chunks):
                start = c * seg.chunk_rows
                self.chunks.append(Chunk(i, c, start, min(seg.n_rows, start + seg.chunk_rows)))
        self.n_rows = sum(seg.n_rows for seg in segments)
        self._zstore = _StrictChunks(store.zstore)
        self._local_root = Path(store.zstore.root) if isinstance(store.zstore, LocalStore) else None
        self._arrays: dict[tuple[int, str], Any] = {}

    @classmethod
    def open(cls, store: Any, name: str) -> TrainLayout:
        tl.check_layout_name(name)
        ids = tl.list_markers(store.zstore, name)
        if not ids:
            known = tl.list_layouts(store.zstore)
            hint = f"layouts here: {', '.join(known)}" if known else "the store has no layouts"
            raise StoreError(f"{store.location}: no committed layout {name!r} ({hint}; make one with "
                             "`actstore materialize`)")  # fmt: skip
        return cls(store, name, [tl.read_marker(store.zstore, name, i) for i in ids])

    def check_sites(self, sites: list[tl.Site] | None) -> list[tl.Site]:
        """The chosen sites (None: every site), each one the layout holds."""
        if sites is None:
            return list(self.sites)
        sites = [(str(s), int(la)) for s, la in sites]
        missing = [s for s in sites if s not in self.sites]
        if missing:
            raise SelectionError(f"layout {self.name} has no site {', '.join(map(tl.site_name, missing))}; "
                                 f"it has {', '.join(map(tl.site_name, self.sites))}")  # fmt: skip
        return sites

    def stats(self, site: tl.Site) -> tl.SiteStats:
        """Mean, std and norms of a site over every committed row (merged marker sums)."""
        site = self.check_sites([site])[0]
        total = tl.SiteStats.empty(self.widths[site])
        for seg in self.segments:
            total = total.merge(seg.stats[site])
        return total

    def _array(self, segment: int, path: str) -> Any:
        key = (segment, path)
        arr = self._arrays.get(key)
        if arr is None:
            base = tl.segment_path(self.name, self.segments[segment].folder)
            arr = zarr.open_array(store=self._zstore, path=f"{base}/{path}", mode="r", zarr_format=3)
            self._arrays[key] = arr
        return arr

    @property
    def local(self) -> bool:
        """Whether the store is a local folder (chunks read as files, one by one)."""
        return self._local_root is not None

    def columns(self, sites: list[tl.Site], rows: bool = True) -> list[tuple[str, str]]:
        """(batch key, array path) of each column a read returns: the sites, then with
        ``rows`` token_ids, sequence_index, position and the label columns."""
        cols = [(tl.site_name(s), f"{tl.SITES_GROUP}/{tl.site_name(s)}") for s in sites]
        if rows:
            cols += [(c, f"{row_facts.ROWS_GROUP}/{c}") for c in ("token_ids", "sequence_index", "position")]
            cols += [(c, f"{row_facts.LABELS_GROUP}/{c}") for c in self.labels]
        return cols

    def empty(self, sites: list[tl.Site], n_rows: int, rows: bool = True) -> dict[str, np.ndarray]:
        """Uninitialised buffers of ``n_rows`` rows for :meth:`read_into`."""
        out = {name: np.empty((n_rows, *self._array(0, path).shape[1:]), dtype=self._array(0, path).dtype)
               for name, path in self.columns(sites, rows)}  # fmt: skip
        if rows:
            out["segment"] = np.empty(n_rows, dtype=np.int32)
        return out

    def read_chunk(self, chunk: Chunk, sites: list[tl.Site], *, rows: bool = True) -> dict[str, np.ndarray]:
        """One chunk's values (physical dtype: bfloat16 as uint16 bits) keyed by site name,
        and with ``rows`` its token_ids, sequence_index, position, label columns and
        ``segment`` (the row's segment, an index into :attr:`segments`)."""
        out = self.empty(sites, chunk.n_rows, rows)
        self.read_into(chunk, sites, out, 0, rows=rows)
        return out

    def read_into(self, chunk: Chunk, sites: list[tl.Site], out: dict[str, np.ndarray], offset: int, *,
                  rows: bool = True) -> None:  # fmt: skip
        """Read one chunk into rows ``offset:offset + chunk.n_rows`` of the buffers ``out``
        (see :meth:`empty`): a shuffle buffer is filled without a copy per chunk."""
        segment = self.segments[chunk.segment].segment
        stop = offset + chunk.n_rows
        if rows:
            out["segment"][offset:stop] = chunk.segment
        try:
            for name, path in self.columns(sites, rows):
                self._read_column(chunk, path, out[name][offset:stop])
        except integrity.DAMAGE_ERRORS as e:
            integrity.raise_if_out_of_memory(e, f"layout {self.name}/{segment}")
            raise DamagedRunError(f"{self.name}/{segment}", integrity.describe_damage(e)) from e

    def _read_column(self, chunk: Chunk, path: str, dest: np.ndarray) -> None:
        arr = self._array(chunk.segment, path)
        codec = _codec_of(arr)
        if codec is None:  # not the chain segments are written with: zarr decodes it
            dest[...] = arr[chunk.start : chunk.stop]
            return
        base = tl.segment_path(self.name, self.segments[chunk.segment].folder)
        key = f"{base}/{path}/{arr.metadata.encode_chunk_key((chunk.index,) + (0,) * (arr.ndim - 1))}"
        whole = chunk.n_rows == arr.chunks[0]
        if self._local_root is not None and codec == "raw" and whole and dest.flags.c_contiguous:
            # straight from the file into the buffer: no allocation, no copy
            flat = dest.reshape(-1).view(np.uint8)
            target = memoryview(flat)  # type: ignore[arg-type]
            try:
                with open(self._local_root / key, "rb") as f:
                    got = f.readinto(target)
                    crc = f.read(5)
            except FileNotFoundError:
                raise integrity.MissingObjectError(key) from None
            if got != len(target) or len(crc) != 4 or np.uint32(google_crc32c.value(flat)).tobytes() != crc:
                raise ValueError("Stored and computed checksum do not match")
            return
        data = self._get(key)
        inner = data[:-4]
        if np.uint32(google_crc32c.value(inner)).tobytes() != bytes(data[-4:]):
            raise ValueError("Stored and computed checksum do not match")
        if codec == "zstd":
            inner = np.frombuffer(_ZSTD.decode(inner), dtype=np.uint8)
        dtype = arr.dtype.newbyteorder("<") if arr.dtype.itemsize > 1 else arr.dtype
        dest[...] = inner.view(dtype).reshape(arr.chunks)[: chunk.n_rows]

    def _get(self, key: str) -> np.ndarray:
        """One object's bytes (missing: MissingObjectError), read here from a local store
        (zarr's event loop costs ~0.1 ms per object)."""
        if self._local_root is not None:
            try:
                return np.frombuffer((self._local_root / key).read_bytes(), dtype=np.uint8)
            except FileNotFoundError:
                raise integrity.MissingObjectError(key) from None
        buf = sync(self._zstore.get(key, prototype=default_buffer_prototype()))
        assert buf is not None  # _StrictChunks raised for a missing chunk
        return buf.as_numpy_array()

    def read_site(self, site: tl.Site, *, widen: bool = False) -> np.ndarray:
        """Every row of one site, segments in order (for tests and small layouts)."""
        site = self.check_sites([site])[0]
        parts = [self.read_chunk(c, [site], rows=False)[tl.site_name(site)] for c in self.chunks]
        width = self.widths[site]
        values = (
            np.concatenate(parts) if parts else np.zeros((0, width), layout.physical_dtype(self.store_dtype))
        )
        return tl.widen(values, self.store_dtype) if widen else values

    def read_rows(self) -> dict[str, np.ndarray]:
        """Every row's token_ids, sequence_index, position and labels, segments in order."""
        parts = [self.read_chunk(c, [], rows=True) for c in self.chunks]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]} if parts else {}
