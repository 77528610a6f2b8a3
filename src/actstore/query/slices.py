"""One heatmap's worth of a run, read block by block and binned while read.

>>> img = read_slice(run, "attn_weights", layer=3, step=0)            # doctest: +SKIP
>>> img.data.shape, img.shape, img.block                              # doctest: +SKIP
((512, 512), (3900, 3900), (8, 8))

A *slice* is what one heatmap draws: the step's positions x the width of one layer of
a vector source (embeddings and logits have no layer), or the step's query rows x every
key up to its last position of one layer's attention weights (the mean over heads, or
one ``head``). A step with one position (a decode step) is one vector, drawn as a
near-square grid of its width (:func:`grid_shape`) instead of a 1-pixel strip.

Memory is bounded by the picture, not by the slice. Rows are read in blocks of about
:data:`BLOCK_BYTES` of float64 (a 3.9k-token prefill's attention over 9 heads is 1.1 GB
as float64), and each block is mean-pooled into the bins as it arrives: with
``fr = ceil(rows / max_rows)`` and ``fc = ceil(cols / max_cols)``, bin (i, j) is the mean
of rows ``i*fr .. i*fr+fr-1`` and columns ``j*fc .. j*fc+fc-1`` (the last bins hold what
is left); NaN values are left out of a mean, a bin with no value is NaN. A slice that
fits (``fr = fc = 1``) is returned exactly as read, widened to float64.

Reads go through the query layer: ``states.select`` for vector sources (derived sources
included, one orthogonal Zarr read per block) and ``states.read_region`` for attention
weights (Zarr fetches the inner chunks under the block concurrently).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from actstore import naming
from actstore.errors import SelectionError
from actstore.query.states import read_region, select, step_index

REDUCE = ("signed", "abs")
DEFAULT_BINS = 512  # bins per side unless asked: about what a chart on a screen shows
# float64 bytes per block read: the working set of one slice read is a few of these plus
# the bins (two float64 arrays of max_rows x max_cols)
BLOCK_BYTES = 16 * 2**20
_ALIGN = 64  # block rows are a multiple of this when a block holds that many: attention
# tiles are 64 x 64 and vector chunks hold 32 positions, so blocks start on chunk edges


@dataclass(frozen=True)
class SliceImage:
    """One slice, binned. ``data``: (rows, cols) float64 bin means (the slice itself when
    ``block == (1, 1)``); ``shape``: the slice's (rows, cols) before binning (for a
    reshaped vector, its grid); ``block``: slice rows and columns per bin;
    ``first_position``: the position of the slice's first row; ``reshaped``: one
    position drawn as a grid."""

    data: np.ndarray
    xlabel: str
    ylabel: str
    reshaped: bool
    shape: tuple[int, int]
    block: tuple[int, int]
    first_position: int

    @property
    def binned(self) -> bool:
        return self.block != (1, 1)


def grid_shape(width: int) -> tuple[int, int]:
    """(rows, cols) for drawing a ``width``-vector as a near-square grid.

    The largest divisor of ``width`` not above its square root when that is not too
    lopsided (576 -> 24 x 24, 1536 -> 32 x 48); otherwise a padded square.
    """
    root = int(math.isqrt(width))
    for rows in range(root, 0, -1):
        if width % rows == 0:
            if width // rows <= 4 * rows:
                return rows, width // rows
            break
    cols = math.ceil(math.sqrt(width))
    return math.ceil(width / cols), cols


def as_image(x: np.ndarray) -> tuple[np.ndarray, bool]:
    """A 2-D array to draw; a single row becomes a NaN-padded grid (second value True)."""
    if x.shape[0] != 1:
        return x, False
    rows, cols = grid_shape(x.shape[1])
    grid = np.full(rows * cols, np.nan, dtype=np.float64)
    grid[: x.shape[1]] = x[0]
    return grid.reshape(rows, cols), True


def check_slice(run: Any, source: str, reduce: str = "signed") -> None:
    """The source of a slice request (known, captured) and ``reduce``, or SelectionError."""
    naming.check_source(source)
    if source not in run.sources:
        raise SelectionError(f"run {run.id} did not capture {source!r}; it has: {', '.join(run.sources)}")
    if reduce not in REDUCE:
        raise SelectionError(f"reduce must be one of {', '.join(REDUCE)}, not {reduce!r}")


def bin_factors(rows: int, cols: int, max_rows: int, max_cols: int) -> tuple[int, int]:
    """(slice rows per bin, slice columns per bin) so ``rows x cols`` fits the bins."""
    if max_rows < 1 or max_cols < 1:
        raise SelectionError(f"bins must be 1 or more, not {max_rows} x {max_cols}")
    return max(1, math.ceil(rows / max_rows)), max(1, math.ceil(cols / max_cols))


class Binner:
    """Mean-pools a (rows, cols) slice that arrives as blocks of whole rows, in any
    order and of any size (a bin may span two blocks): sums and counts per bin, so the
    memory is two arrays of the bins' size. With ``fr = fc = 1`` it keeps the rows as
    given (no arithmetic: the result is the slice, bit for bit)."""

    def __init__(self, rows: int, cols: int, fr: int, fc: int):
        self.rows, self.cols, self.fr, self.fc = rows, cols, fr, fc
        self.exact = fr == fc == 1
        shape = (rows, cols) if self.exact else (math.ceil(rows / fr), math.ceil(cols / fc))
        self.sums = np.full(shape, np.nan) if self.exact else np.zeros(shape)
        self.counts = None if self.exact else np.zeros(shape)

    def add(self, first_row: int, x: np.ndarray) -> None:
        """Rows ``first_row .. first_row + len(x) - 1`` of the slice (float64)."""
        if self.exact:
            self.sums[first_row : first_row + x.shape[0]] = x
            return
        assert self.counts is not None
        rows = np.arange(first_row, first_row + x.shape[0])
        starts = np.flatnonzero(np.r_[True, rows[1:] % self.fr == 0])  # first row of each bin here
        bins = rows[starts] // self.fr
        valid = ~np.isnan(x)
        if valid.all():
            sums = np.add.reduceat(_sum_columns(x, self.fc), starts, axis=0)
            widths = np.diff(np.r_[np.arange(0, x.shape[1], self.fc), x.shape[1]])
            counts = np.outer(np.diff(np.r_[starts, x.shape[0]]), widths)
        else:
            sums = np.add.reduceat(_sum_columns(np.where(valid, x, 0.0), self.fc), starts, axis=0)
            counts = np.add.reduceat(_sum_columns(valid.astype(np.float64), self.fc), starts, axis=0)
        self.sums[bins] += sums
        self.counts[bins] += counts

    def result(self) -> np.ndarray:
        if self.exact:
            return self.sums
        assert self.counts is not None
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.counts > 0, self.sums / self.counts, np.nan)


def _sum_columns(x: np.ndarray, fc: int) -> np.ndarray:
    """Sums of each run of ``fc`` columns (the last run holds what is left): a reshape
    for the whole runs, contiguous and fast (``reduceat`` along columns is strided)."""
    if fc == 1:
        return x
    r, c = x.shape
    full = c // fc
    out = np.empty((r, -(-c // fc)))
    out[:, :full] = x[:, : full * fc].reshape(r, full, fc).sum(axis=2)
    if full * fc < c:
        out[:, full] = x[:, full * fc :].sum(axis=1)
    return out


def block_means(data: np.ndarray, max_rows: int, max_cols: int) -> tuple[np.ndarray, int, int]:
    """An in-memory 2-D array as bin means (see the module docstring): ``(bins, fr, fc)``;
    ``(data, 1, 1)`` when it already fits."""
    fr, fc = bin_factors(data.shape[0], data.shape[1], max_rows, max_cols)
    if fr == fc == 1:
        return data, 1, 1
    b = Binner(data.shape[0], data.shape[1], fr, fc)
    b.add(0, np.asarray(data, dtype=np.float64))
    return b.result(), fr, fc


def _block_rows(bytes_per_row: int) -> int:
    rows = max(1, BLOCK_BYTES // max(1, bytes_per_row))
    return rows - rows % _ALIGN if rows >= _ALIGN else rows


def read_slice(
    run: Any,
    source: str,
    layer: int | None,
    step: int,
    head: int | None = None,
    reduce: str = "signed",
    max_rows: int = DEFAULT_BINS,
    max_cols: int = DEFAULT_BINS,
) -> SliceImage:
    """One slice of ``run`` (see the module docstring), binned to at most ``max_rows x
    max_cols``. ``layer``: a real layer index (ignored, may be None, for embeddings and
    logits); ``step``: a step index (negative counts from the end); ``head``: one
    attention head (default: the mean over heads; attention weights only);
    ``reduce="abs"``: magnitudes (|x| before the mean)."""
    check_slice(run, source, reduce)
    step = step_index(run, step)
    positions = run.step_positions(step)
    start, stop = positions.start, positions.stop
    if source in naming.GLOBAL_SOURCES:
        layer = None
    elif layer is None:
        raise SelectionError(f"{source} needs a layer")
    else:
        run.layer_index([layer])  # validates, naming the run's layers
    if source == "attn_weights":
        return _attention(run, layer, start, stop, head, reduce, max_rows, max_cols)
    layers = None if layer is None else [layer]

    def stored(a: int, b: int) -> np.ndarray:  # rows a..b-1 as served (float16 stays float16)
        x = select(run, source, list(range(a, b)), layers).compute()
        return np.asarray(x[0] if x.ndim == 3 else x)

    def wide(x: np.ndarray) -> np.ndarray:
        data = x.astype(np.float64)
        return np.abs(data, out=data) if reduce == "abs" else data

    served = run.array(source)
    width = int(served.shape[-1])
    if stop - start == 1:  # one vector, drawn as a grid: small, binned in memory
        grid, _ = as_image(wide(stored(start, stop)))
        data, fr, fc = block_means(grid, max_rows, max_cols)
        return SliceImage(data, "channel (grid column)", "channel (grid row)", True, grid.shape, (fr, fc), start)
    fr, fc = bin_factors(stop - start, width, max_rows, max_cols)
    binner = Binner(stop - start, width, fr, fc)
    # Each read is about BLOCK_BYTES of values as served (four times the rows of a
    # float64 block for float16: fewer, larger reads, whose chunks Zarr decodes
    # concurrently; a 612 x 49,152 logits slice in 4 reads instead of 15), widened to
    # float64 a BLOCK_BYTES piece at a time.
    read_rows = _block_rows(width * served.dtype.itemsize)
    wide_rows = _block_rows(width * 8)
    for a in range(start, stop, read_rows):
        b = min(stop, a + read_rows)
        block = stored(a, b)
        for c in range(a, b, wide_rows):
            binner.add(c - start, wide(block[c - a : min(b, c + wide_rows) - a]))
        del block
    return SliceImage(binner.result(), "channel", "token position", False, (stop - start, width), (fr, fc), start)


def _attention(
    run: Any, layer: int | None, start: int, stop: int, head: int | None, reduce: str, max_rows: int, max_cols: int
) -> SliceImage:
    (li,) = run.layer_index([layer])
    n_heads = int(run.array("attn_weights").shape[1])
    if head is not None and not 0 <= head < n_heads:
        raise SelectionError(f"run {run.id} has attention heads 0..{n_heads - 1}, not {head}")
    heads = slice(None) if head is None else slice(head, head + 1)
    fr, fc = bin_factors(stop - start, stop, max_rows, max_cols)
    binner = Binner(stop - start, stop, fr, fc)
    step_rows = _block_rows(stop * 8 * (1 if head is not None else n_heads))
    for a in range(start, stop, step_rows):
        b = min(stop, a + step_rows)
        att = read_region(run, "attn_weights", (li, heads, slice(a, b), slice(0, stop)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # overflowing float16 stays inf
            data = att.astype(np.float64)[0] if head is not None else att.astype(np.float64).mean(axis=0)
        del att
        binner.add(a - start, np.abs(data) if reduce == "abs" else data)
    xy = ("key position", "query position")
    return SliceImage(binner.result(), *xy, False, (stop - start, stop), (fr, fc), start)
