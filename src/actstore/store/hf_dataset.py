"""Runs as a Hugging Face dataset in the layout SAELens reads cached activations from.

SAELens's ``CacheActivationsRunner`` writes, and its ``ActivationsStore`` loads with
``datasets.load_from_disk``, one row per window of ``context`` tokens:

    <hook name>  Array2D((context, d), dtype)   e.g. blocks.16.hook_resid_post
    token_ids    Sequence(int32, length=context)

so a dataset written here trains an SAE with ``cached_activations_path=DIR``. Each column
is named by its TransformerLens hook (:mod:`actstore.tl_names`). Three more columns say
where a window comes from (SAELens reads only the columns it asks for): ``run`` (run
id), ``sequence_index`` (the sequence in the run's dataset; 0 for a scenario run) and
``position`` (the window's first position in that sequence).

Windows: each sequence of a run (``store.rows.run_rows``: a scenario run is one
sequence, a corpus unit many) is cut into consecutive windows of ``context`` tokens;
the last ``len % context`` tokens of each sequence, too few for a window, are left out
(SAELens needs every row the same length). Values are the store's bits: float16 stays
float16, float32 stays float32, bfloat16 is widened to float32 exactly (Arrow has no
bfloat16); runs whose dtypes differ are written as float32 (exact for both).

The dataset is written into a temporary sibling of ``out`` and renamed into place, so
an export killed or failing half-way leaves no folder at ``out``.
"""

from __future__ import annotations

import functools
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from actstore import tl_names
from actstore.errors import SelectionError, StoreError
from actstore.paths import output_folder
from actstore.store.npz_export import _write_via_temp
from actstore.store.reader import RunReader
from actstore.store.rows import Rows, run_rows

BATCH_BYTES = 64 << 20  # activation bytes read and written per batch of windows
EXTRA_COLUMNS = ("run", "sequence_index", "position")


@dataclass(frozen=True)
class Column:
    """One hook of one run: where its (T, d) values are."""

    hook: str
    source: str
    layer: int | None
    width: int
    dtype: np.dtype


def windows(sequence_index: np.ndarray, position: np.ndarray, context: int) -> np.ndarray:
    """Start rows of every full window of ``context`` consecutive positions of one sequence.

    A sequence is a maximal stretch of rows with the same ``sequence_index`` whose
    positions count up by one; each is cut from its start, its remainder dropped.
    """
    n = len(sequence_index)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    breaks = np.flatnonzero((np.diff(sequence_index) != 0) | (np.diff(position) != 1)) + 1
    starts = np.concatenate([[0], breaks])
    ends = np.concatenate([breaks, [n]])
    out = [
        np.arange(s, s + ((e - s) // context) * context, context) for s, e in zip(starts, ends, strict=True)
    ]
    return np.concatenate(out).astype(np.int64)


def _columns(run: RunReader, hooks: Sequence[str]) -> list[Column]:
    cols = []
    for hook in hooks:
        source, layer = tl_names.for_run(hook, run)
        if source == "attn_weights":
            raise SelectionError(
                f"{hook}: attention patterns have no (context, d) form; export a (T, d) hook"
            )
        if source not in run.sources:
            raise SelectionError(
                f"{hook}: run {run.id} did not capture {source!r}; it has: {', '.join(run.sources)}"
            )
        if layer is not None and layer not in run.layers:
            raise SelectionError(f"{hook}: run {run.id} did not capture layer {layer}")
        x = run.array(source)
        cols.append(Column(hook, source, layer, int(x.shape[-1]), np.dtype(x.dtype)))
    return cols


def _features(hooks: Sequence[str], widths: dict[str, int], dtypes: dict[str, np.dtype], context: int) -> Any:
    from datasets import Array2D, Features, Sequence, Value

    feats: dict[str, Any] = {h: Array2D(shape=(context, widths[h]), dtype=dtypes[h].name) for h in hooks}
    feats["token_ids"] = Sequence(Value("int32"), length=context)
    feats["run"] = Value("string")
    feats["sequence_index"] = Value("int64")
    feats["position"] = Value("int32")
    return Features(feats)


def plan(runs: Sequence[RunReader], hooks: Sequence[str], context: int) -> tuple[list[list[Column]], Any]:
    """Every run's columns, checked to agree, and the dataset's features."""
    if not runs:
        raise SelectionError("no runs to export")
    if not hooks:
        raise SelectionError("give at least one --hook (e.g. blocks.0.hook_resid_post)")
    if len(set(hooks)) != len(hooks):
        raise SelectionError(f"--hook repeats a name: {', '.join(hooks)}")
    if context < 1:
        raise SelectionError(f"--context must be at least 1, not {context}")
    per_run = [_columns(run, hooks) for run in runs]
    widths: dict[str, int] = {}
    dtypes: dict[str, np.dtype] = {}
    for run, cols in zip(runs, per_run, strict=True):
        for c in cols:
            if widths.setdefault(c.hook, c.width) != c.width:
                raise SelectionError(f"{c.hook} is {c.width} wide in run {run.id} but {widths[c.hook]} in "
                                     f"{runs[0].id}: export runs of one model together")  # fmt: skip
            dtypes[c.hook] = np.promote_types(dtypes.get(c.hook, c.dtype), c.dtype)
    return per_run, _features(hooks, widths, dtypes, context)


def _span(run: RunReader, col: Column, lo: int, hi: int) -> np.ndarray:
    """(hi - lo, d) values of one column: one Zarr read (query.states.select), where the
    reader's Dask array would run a task per inner chunk (~4x slower here)."""
    from actstore.query.states import select

    layers = None if col.layer is None else [col.layer]
    x = np.asarray(select(run, col.source, list(range(lo, hi)), layers).compute())
    return x if col.layer is None else x[0]


@dataclass(frozen=True)
class RunWindows:
    """One run to export: its columns, its rows and the start row of every window."""

    run: RunReader
    cols: list[Column]
    rows: Rows
    starts: np.ndarray


def _batches(part: RunWindows, context: int, dtypes: dict[str, np.dtype]) -> Iterator[dict[str, Any]]:
    run, cols, rows, starts = part.run, part.cols, part.rows, part.starts
    per_window = context * sum(c.width * dtypes[c.hook].itemsize for c in cols)
    step = max(1, BATCH_BYTES // max(per_window, 1))
    for b in range(0, len(starts), step):
        chunk = starts[b : b + step]
        idx = (chunk[:, None] + np.arange(context)[None, :]).reshape(-1)
        lo, hi = int(idx[0]), int(idx[-1]) + 1  # one contiguous read covers the batch
        batch: dict[str, Any] = {}
        for c in cols:
            values = _span(run, c, lo, hi)[idx - lo].astype(dtypes[c.hook], copy=False)
            batch[c.hook] = values.reshape(len(chunk), context, c.width)
        batch["token_ids"] = rows.token_ids[idx].astype(np.int32).reshape(len(chunk), context)
        batch["run"] = [run.id] * len(chunk)
        batch["sequence_index"] = rows.sequence_index[chunk].astype(np.int64)
        batch["position"] = rows.position[chunk].astype(np.int32)
        yield batch


def _write(
    parts: list[RunWindows], features: Any, context: int, quiet: bool, target: Path, out: Path
) -> None:
    """Fill the Arrow file beside ``target`` (``.<name>.arrow-*``), then ``save_to_disk``
    it into ``out``, the temporary folder renamed to ``target`` afterwards."""
    from datasets import Dataset
    from datasets.arrow_writer import ArrowWriter

    dtypes = {h: np.dtype(features[h].dtype) for h in features if h not in ("token_ids", *EXTRA_COLUMNS)}
    total = sum(len(p.starts) for p in parts)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.arrow-"))
    try:
        arrow = staging / "windows.arrow"
        writer = ArrowWriter(features=features, path=str(arrow))
        with tqdm(
            total=total,
            unit="window",
            desc="export hf-dataset",
            disable=quiet or not sys.stderr.isatty(),
            file=sys.stderr,
        ) as bar:
            for part in parts:
                for batch in _batches(part, context, dtypes):
                    writer.write_batch(batch)
                    bar.update(len(batch["token_ids"]))
        writer.finalize()
        writer.close()
        with _no_datasets_bars():  # our bar above is the progress; save_to_disk would add its own
            Dataset.from_file(str(arrow)).save_to_disk(str(out))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextmanager
def _no_datasets_bars() -> Iterator[None]:
    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_off = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        yield
    finally:
        if not was_off:
            enable_progress_bars()


def export_hf_dataset(
    runs: RunReader | Sequence[RunReader],
    out_dir: str | Path,
    hooks: Sequence[str],
    context: int,
    *,
    quiet: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write ``runs`` as a ``datasets`` dataset at ``out_dir`` (``save_to_disk``), one
    column per TransformerLens hook name, windows of ``context`` tokens; returns the path.
    SAELens trains on it with ``cached_activations_path=out_dir`` (see the module doc)."""
    runs = [runs] if isinstance(runs, RunReader) else list(runs)
    hooks = list(hooks)
    per_run, features = plan(runs, hooks, context)  # every check before anything is written
    parts = []
    for run, cols in zip(runs, per_run, strict=True):
        rows = run_rows(run)
        parts.append(RunWindows(run, cols, rows, windows(rows.sequence_index, rows.position, context)))
    if not any(len(p.starts) for p in parts):
        raise SelectionError(f"no sequence of these runs has {context} tokens: lower --context")
    target = Path(out_dir)
    if target.exists() and not overwrite:
        raise StoreError(f"{target}: already exists (remove it, choose another --out, or --overwrite)")
    with output_folder(target.parent) as parent:
        write = functools.partial(_write, parts, features, context, quiet, parent / target.name)
        _write_via_temp(write, target, parent)  # save_to_disk fills the empty temporary folder
    return target
