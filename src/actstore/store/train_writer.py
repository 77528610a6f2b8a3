"""Write one segment of a train layout (store/train_layout.py), row block by row block.

>>> w = SegmentWriter(store, "probes", "unit-0007", [("hidden_out", 8)], {("hidden_out", 8): 576},
...                   "bfloat16")                                           # doctest: +SKIP
>>> w.append({("hidden_out", 8): block}, rows)   # block: (m, 576), rows: Rows of m positions
>>> w.commit()                                   # the marker goes last: now readers see it

Memory stays flat: each site keeps one chunk-sized buffer, and a full chunk is written
as soon as it fills (never read back or rewritten). Values are written exactly as given
in the store dtype's physical form: float16 / float32 arrays, or bfloat16 as its uint16
bit patterns (torch ``x.view(torch.int16)`` or the run's stored array).
"""

from __future__ import annotations

import secrets
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.core.sync import sync
from zarr.storage import LocalStore

from actstore.errors import SelectionError, StoreError
from actstore.store import layout
from actstore.store import rows as row_facts
from actstore.store import train_layout as tl

# The row facts of store/rows.py, stored under the same names and dtypes.
_ROW_COLUMNS: dict[str, np.dtype] = {
    "token_ids": np.dtype("int32"),
    "sequence_index": np.dtype("int64"),
    "position": np.dtype("int32"),
}


class SegmentWriter:
    """Writes segment ``segment_id`` of layout ``layout_name``.

    ``sites``: the (source, layer) pairs; ``widths``: each site's vector width (or one
    int for all); ``store_dtype``: float16, bfloat16 or float32; ``labels``: label column
    -> NumPy dtype (numbers, or text: ``str`` / object), when rows carry labels. Call :meth:`append` any number of times, then
    :meth:`commit`; :meth:`abort` (or leaving a ``with`` block by an exception) removes
    what was written. Each writer writes its own folder, so a segment left half-written
    by a kill is an orphan readers never see, and writing the same segment id again (or
    twice at once) starts a new folder.
    """

    def __init__(
        self,
        store: Any,
        layout_name: str,
        segment_id: str,
        sites: list[tl.Site],
        widths: dict[tl.Site, int] | int,
        store_dtype: str,
        *,
        labels: dict[str, Any] | None = None,
        chunk_rows: int = tl.CHUNK_ROWS,
        source_run: str | None = None,
        codecs: list[Any] | None = None,
        replace: bool = False,
    ) -> None:
        self.store = store
        self.zstore = store.zstore
        self.name = tl.check_layout_name(layout_name)
        self.segment = segment_id
        tl.check_layout_name(segment_id)
        self.sites = tl.check_sites(list(sites))
        self.widths = {s: int(widths if isinstance(widths, int) else widths[s]) for s in self.sites}
        self.store_dtype = store_dtype
        self.dtype = layout.physical_dtype(store_dtype)
        self.chunk_rows = int(chunk_rows)
        if self.chunk_rows < 1:
            raise SelectionError(f"chunk_rows must be >= 1, not {chunk_rows}")
        self.label_dtypes = {k: np.dtype(v) for k, v in (labels or {}).items()}
        self.source_run = source_run
        self.codecs = tl.CHUNK_CODECS if codecs is None else codecs  # benchmarks compare others
        self.n_rows = 0  # rows written to the arrays (whole chunks)
        self._fill = 0  # rows waiting in the buffers
        self.stats = {s: tl.SiteStats.empty(self.widths[s]) for s in self.sites}
        self._done = False
        # ``replace``: a committed segment is written again in a new folder and its marker
        # replaced at commit (the old folder becomes an orphan): a corpus unit redone after
        # a kill between its segment's commit and its own.
        if not replace and self.committed(store, self.name, segment_id):
            raise StoreError(f"layout {self.name}: segment {segment_id} is already committed")
        self.folder = f"{segment_id}.{secrets.token_hex(4)}"  # this attempt's own folder
        path = tl.segment_path(self.name, self.folder)
        self.group = zarr.open_group(store=self.zstore, path=path, mode="w", zarr_format=3,
                                     attributes={"actstore_train_segment": {"layout": self.name}})  # fmt: skip
        self.arrays: dict[str, Any] = {}
        self.buffers: dict[str, np.ndarray] = {}
        for site in self.sites:
            key = f"{tl.SITES_GROUP}/{tl.site_name(site)}"
            self._create(key, (self.widths[site],), self.dtype, {"actstore_dtype": store_dtype})
        for col, dt in _ROW_COLUMNS.items():
            self._create(f"{row_facts.ROWS_GROUP}/{col}", (), dt, {})
        for col, dt in self.label_dtypes.items():
            self._create(f"{row_facts.LABELS_GROUP}/{col}", (), dt, {})

    @staticmethod
    def committed(store: Any, layout_name: str, segment_id: str) -> bool:
        return bool(sync(store.zstore.exists(tl.marker_key(layout_name, segment_id))))

    def _create(self, path: str, tail: tuple[int, ...], dtype: np.dtype, attrs: dict[str, Any]) -> None:
        text = dtype.kind in "OUT"  # a text label column: zarr's variable-length strings
        self.arrays[path] = self.group.create_array(
            path,
            shape=(0, *tail),
            chunks=(self.chunk_rows, *tail),
            dtype=str if text else dtype,
            compressors=self.codecs,
            fill_value="" if text else 0,
            attributes=attrs,
            config={"write_empty_chunks": True},  # every chunk stored: a missing one is damage
        )
        self.buffers[path] = np.empty(self.chunk_rows, dtype=object) if text else np.zeros(
            (self.chunk_rows, *tail), dtype=dtype)  # fmt: skip

    # ---- writing --------------------------------------------------------------------------
    def append(self, site_rows: dict[tl.Site, np.ndarray], rows: row_facts.Rows) -> None:
        """Add ``len(rows)`` rows: every site's (m, d) values and their row facts."""
        if self._done:
            raise StoreError(f"layout {self.name}: segment {self.segment} is already committed or aborted")
        m = len(rows)
        if set(site_rows) != set(self.sites):
            raise SelectionError(
                f"append needs values of exactly the sites {self.sites}, got {sorted(site_rows)}"
            )
        if set(rows.labels) != set(self.label_dtypes):
            raise SelectionError(
                f"rows carry labels {sorted(rows.labels)}, the segment {sorted(self.label_dtypes)}"
            )
        columns: dict[str, np.ndarray] = {}
        for site, values in site_rows.items():
            values = np.asarray(values)
            if values.shape != (m, self.widths[site]):
                raise SelectionError(f"site {tl.site_name(site)}: values of shape {values.shape}, "
                                     f"expected ({m}, {self.widths[site]})")  # fmt: skip
            if values.dtype != self.dtype:
                raise SelectionError(f"site {tl.site_name(site)}: values of dtype {values.dtype}, expected "
                                     f"{self.dtype} (the physical form of {self.store_dtype})")  # fmt: skip
            columns[f"{tl.SITES_GROUP}/{tl.site_name(site)}"] = values
            self.stats[site].add(tl.widen(values, self.store_dtype))
        columns[f"{row_facts.ROWS_GROUP}/token_ids"] = rows.token_ids
        columns[f"{row_facts.ROWS_GROUP}/sequence_index"] = rows.sequence_index
        columns[f"{row_facts.ROWS_GROUP}/position"] = rows.position
        for col, values in rows.labels.items():
            columns[f"{row_facts.LABELS_GROUP}/{col}"] = values
        done = 0
        while done < m:
            take = min(m - done, self.chunk_rows - self._fill)
            for path, values in columns.items():
                self.buffers[path][self._fill : self._fill + take] = values[done : done + take]
            self._fill += take
            done += take
            if self._fill == self.chunk_rows:
                self._flush()

    def _flush(self) -> None:
        """Write the buffered rows as the next chunk of every array."""
        if not self._fill:
            return
        start, stop = self.n_rows, self.n_rows + self._fill
        for path, arr in self.arrays.items():
            arr.resize((stop, *arr.shape[1:]))
            arr[start:stop] = self.buffers[path][: self._fill]
        self.n_rows = stop
        self._fill = 0

    def commit(self) -> tl.SegmentInfo:
        """Write the last partial chunk, then the commit marker (the segment becomes
        visible to readers at this moment, whole)."""
        if self._done:
            raise StoreError(f"layout {self.name}: segment {self.segment} is already committed or aborted")
        self._flush()
        info = tl.SegmentInfo(
            layout=self.name, segment=self.segment, n_rows=self.n_rows, chunk_rows=self.chunk_rows,
            sites=tuple(self.sites), widths=dict(self.widths), store_dtype=self.store_dtype,
            labels={k: "str" if v.kind in "OUT" else v.str for k, v in self.label_dtypes.items()},
            stats=dict(self.stats), folder=self.folder,
            source_run=self.source_run,
        )  # fmt: skip
        import json

        tl.put_marker(self.zstore, tl.marker_key(self.name, self.segment),
                      json.dumps(info.to_json(), sort_keys=True).encode())  # fmt: skip
        self._done = True
        self.buffers.clear()
        return info

    def abort(self) -> None:
        """Best effort: remove what this writer wrote (never a committed segment)."""
        if self._done:
            return
        self._done = True
        self.buffers.clear()
        try:
            self._remove_prefix(tl.segment_path(self.name, self.folder))  # never committed: ours alone
        except Exception:  # noqa: BLE001 - cleanup must not hide the original error
            pass

    def _remove_prefix(self, path: str) -> None:
        sync(self.zstore.delete_dir(path))
        if isinstance(self.zstore, LocalStore):  # delete_dir leaves the emptied folders
            shutil.rmtree(Path(self.zstore.root) / path, ignore_errors=True)

    def __enter__(self) -> SegmentWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            self.abort()
