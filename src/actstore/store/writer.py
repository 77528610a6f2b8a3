"""The run writer: takes step tensors off the forward path and writes whole shards.

Data flow: the capture loop hands each forward pass's tensors (still on the model's
device, already cast to the store dtype) to :meth:`RunWriter.submit`, which only puts
them on a bounded queue. A writer thread moves them to host memory, stacks layers, and
fills one position block per array; each block that fills up is written as whole shards
(compression happens inside zarr, in this thread, with the GIL released by blosc). The
bounded queue is the back-pressure that keeps host memory flat on long runs.

Nothing here makes a run visible: :meth:`finish` writes the last blocks and metadata,
then the caller commits the catalog entry.
"""

from __future__ import annotations

import json
import queue
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr

from actstore import naming
from actstore.store import layout
from actstore.store.integrity import INTEGRITY

if TYPE_CHECKING:
    import torch

_STOP = object()
# Every chunk of the written region is stored, zeros included, so a missing object is
# damage (store/integrity.py); tiles above the causal diagonal are outside every written
# region and stay unstored. Compressed zero chunks cost a few bytes each.
WRITE_EMPTY_CHUNKS = True


def to_numpy(t: torch.Tensor | np.ndarray) -> np.ndarray:
    """Host copy of a tensor already in its store dtype (bfloat16 kept as uint16 bits)."""
    if isinstance(t, np.ndarray):
        return t
    import torch  # only a capture hands tensors: an import writes NumPy and never loads torch

    t = t.detach()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).cpu().numpy().view(np.uint16)
    return t.cpu().numpy()


@dataclass
class ArrayPlan:
    """What the writer needs to know about one step array before data arrives."""

    source: str  # a naming source, or naming.RESIDUAL_ARRAY
    spec: layout.ArraySpec
    keys: tuple[Any, ...]  # the step-buffer keys stacked along the layer axis, in order
    attrs: dict[str, Any]


class _VectorBlocks:
    """Fills position blocks of a (L, T, W) or (T, W) array and writes full ones."""

    def __init__(self, arr: zarr.Array, plan: ArrayPlan):
        self.arr, self.plan = arr, plan
        self.layered = len(plan.spec.shape) == 3
        self.block = plan.spec.block
        self.start = 0  # first position of the current block
        shape = list(plan.spec.shape)
        shape[plan.spec.position_axes[0]] = self.block
        self.buf = np.zeros(shape, dtype=plan.spec.dtype)

    def add(self, pos: int, data: np.ndarray) -> None:
        n = data.shape[-2]
        done = 0
        while done < n:
            offset = pos + done - self.start
            take = min(n - done, self.block - offset)
            if self.layered:
                self.buf[:, offset : offset + take] = data[:, done : done + take]
            else:
                self.buf[offset : offset + take] = data[done : done + take]
            done += take
            if offset + take == self.block:
                self._flush(self.block)

    def _flush(self, count: int) -> None:
        s, e = self.start, self.start + count
        if self.layered:
            self.arr[:, s:e] = self.buf[:, :count]
        else:
            self.arr[s:e] = self.buf[:count]
        self.start = e
        self.buf[...] = 0

    def finish(self, n_positions: int) -> None:
        if n_positions > self.start:
            self._flush(n_positions - self.start)


class _AttentionBlocks:
    """Fills row blocks of an attention array. A run's (L, heads, T, T) array is square:
    only columns up to the block's last row are written, so tiles above the causal
    diagonal stay unstored. A pass array (L, heads, rows, W) holds rows of several
    passes of different lengths: every column is written, zeros compress to nothing."""

    def __init__(self, arr: zarr.Array, plan: ArrayPlan):
        self.arr, self.plan = arr, plan
        L, H, _, t_max = plan.spec.shape
        self.square = len(plan.spec.position_axes) == 2
        self.block = plan.spec.block
        self.start = 0
        self.buf = np.zeros((L, H, self.block, t_max), dtype=plan.spec.dtype)

    def add(self, pos: int, data: np.ndarray) -> None:
        # data: (L, heads, n, kv) with kv = pos + n (causal: row p sees columns 0..p)
        n, kv = data.shape[2], data.shape[3]
        done = 0
        while done < n:
            offset = pos + done - self.start
            take = min(n - done, self.block - offset)
            self.buf[:, :, offset : offset + take, :kv] = data[:, :, done : done + take]
            done += take
            if offset + take == self.block:
                self._flush(self.block)

    def _flush(self, count: int) -> None:
        s, e = self.start, self.start + count
        cols = e if self.square else self.buf.shape[-1]
        self.arr[:, :, s:e, :cols] = self.buf[:, :, :count, :cols]
        self.start = e
        self.buf[...] = 0

    def finish(self, n_positions: int) -> None:
        if n_positions > self.start:
            self._flush(n_positions - self.start)


def entropy_plan(attn: ArrayPlan) -> ArrayPlan:
    """The (L, rows, heads) float32 plan of the row entropies of an attention plan's
    (L, heads, rows, cols) weights (naming.ATTN_ENTROPY_ARRAY)."""
    n_layers, heads, rows = attn.spec.shape[:3]
    spec = layout.vector_spec(naming.ATTN_ENTROPY_ARRAY, n_layers, rows, heads, np.dtype("float32"))
    attrs = {**attn.attrs, "actstore_dtype": "float32", "weights_dtype": attn.attrs["actstore_dtype"]}
    return ArrayPlan(naming.ATTN_ENTROPY_ARRAY, spec, attn.keys, attrs)


ABORT_WAIT_S = 30.0


class RunWriter:
    """Writes the step arrays of one run group from a background thread."""

    def __init__(self, group: zarr.Group, plans: list[ArrayPlan], max_pending: int = 4, prefix: str = ""):
        self.group = group
        # Attention weights bring their rows' entropies (computed here, off the capture thread).
        self.plans = plans + [entropy_plan(p) for p in plans if p.source == "attn_weights"]
        self._blocks: dict[str, _VectorBlocks | _AttentionBlocks] = {}
        for plan in self.plans:
            arr = _create(group, prefix + naming.ACTS_GROUP + "/" + plan.spec.name, plan.spec, plan.attrs)
            cls = _AttentionBlocks if plan.source == "attn_weights" else _VectorBlocks
            self._blocks[plan.source] = cls(arr, plan)
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max_pending)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="actstore-writer", daemon=True)
        self._thread.start()

    def submit(self, position: int, tensors: dict[Any, Any], kv_end: int | None = None) -> None:
        """Queue one forward pass's tensors (torch, or NumPy already on the host);
        ``position`` is its first row. ``kv_end``: attention columns the pass saw
        (default: its rows are positions, ``position + rows``)."""
        self._raise_if_failed()
        self._queue.put((position, tensors, kv_end))

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            if self._error is not None:
                continue  # drain so submit() never blocks forever after a failure
            try:
                position, tensors, kv_end = item
                for plan in self.plans:
                    parts = [to_numpy(tensors[k]) for k in plan.keys]
                    if plan.source == naming.ATTN_ENTROPY_ARRAY:
                        parts = [layout.row_entropy(p, plan.attrs["weights_dtype"]) for p in parts]
                    if plan.source == "attn_weights":
                        parts = [_right_align(p, kv_end or position + p.shape[-2]) for p in parts]
                    data = np.stack(parts) if len(plan.spec.shape) >= 3 else parts[0]
                    self._blocks[plan.source].add(position, data)
            except BaseException as e:  # noqa: BLE001 - re-raised in the capture thread
                self._error = e

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"activation writer failed: {self._error!r}") from self._error

    def finish(self, n_positions: int) -> None:
        """Wait for queued steps, shrink arrays to the real length, write the last blocks."""
        self._queue.put(_STOP)
        self._thread.join()
        self._raise_if_failed()
        for plan in self.plans:
            blocks = self._blocks[plan.source]
            shape = list(plan.spec.shape)
            for ax in plan.spec.position_axes:
                shape[ax] = n_positions
            blocks.arr.resize(tuple(shape))
            blocks.finish(n_positions)

    def abort(self) -> None:
        """Stop the thread without writing more (the run stays uncommitted). Waits at most
        ABORT_WAIT_S for the block it is writing: a write stuck on storage must not hold
        the failing capture's error back forever (the thread is a daemon)."""
        self._error = self._error or RuntimeError("aborted")
        self._queue.put(_STOP)
        self._thread.join(timeout=ABORT_WAIT_S)


def _right_align(weights: np.ndarray, kv: int) -> np.ndarray:
    """Pad (heads, n, k) weights on the left to ``kv`` columns. A sliding-window layer's
    cache holds only the last k positions, so its columns are the last k of the row."""
    k = weights.shape[-1]
    if k == kv:
        return weights
    out = np.zeros((*weights.shape[:-1], kv), dtype=weights.dtype)
    out[..., kv - k :] = weights
    return out


def _create(group: zarr.Group, path: str, spec: layout.ArraySpec, attrs: dict[str, Any]) -> zarr.Array:
    return group.create_array(
        path,
        shape=spec.shape,
        chunks=spec.chunks,
        shards=spec.shards,
        dtype=spec.dtype,
        compressors=layout.CHUNK_CODECS,
        fill_value=0,
        attributes=attrs,
        config={"write_empty_chunks": WRITE_EMPTY_CHUNKS},
    )


def write_small_array(
    group: zarr.Group, path: str, data: np.ndarray, attrs: dict[str, Any] | None = None
) -> zarr.Array:
    """Write a small array (tokens, snapshots, references) in one chunk."""
    arr = group.create_array(
        path,
        shape=data.shape,
        chunks=data.shape if data.size else (1,) * data.ndim,
        dtype=data.dtype,
        compressors=layout.CHUNK_CODECS,
        fill_value=0,
        attributes=attrs or {},
        config={"write_empty_chunks": WRITE_EMPTY_CHUNKS},  # an all-zero array is still stored
    )
    if data.size:
        arr[...] = data
    return arr


def write_run_meta(group: zarr.Group, meta: dict[str, Any]) -> dict[str, Any]:
    """Write a run's metadata; return what the group attributes now hold.

    The per-step records (fed and generated tokens, top-k log-probs: about 90 KB for 50
    steps, most of a run's metadata) go to their own one-chunk array as a JSON document,
    read only by what shows steps. The group attributes, which every query that opens
    the run parses, keep the rest and ``n_steps``.
    """
    steps = meta["steps"]
    blob = np.frombuffer(json.dumps(steps, separators=(",", ":")).encode(), dtype=np.uint8)
    write_small_array(group, naming.STEPS_ARRAY, blob, {"actstore_content": "application/json"})
    slim = {k: v for k, v in meta.items() if k != "steps"} | {"n_steps": len(steps), "integrity": INTEGRITY}
    group.attrs["run"] = slim
    return slim


def write_rows(
    group: zarr.Group, path: str, data: np.ndarray, store_dtype: str, layers: list[int]
) -> zarr.Array:
    """Write a (rows, L, H) snapshot or reference stack as one chunk: the stacks are
    small (rows x L x H) and nearly always read whole (8 stacks: 48 ms with a chunk per
    row, 8.8 ms with one chunk, measured on the emotions run)."""
    arr = group.create_array(
        path,
        shape=data.shape,
        chunks=data.shape,
        dtype=data.dtype,
        compressors=layout.CHUNK_CODECS,
        fill_value=0,
        attributes={"actstore_dtype": store_dtype, "layers": layers},
    )
    arr[...] = data
    return arr
