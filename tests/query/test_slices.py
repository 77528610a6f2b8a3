"""query.slices: a heatmap slice read block by block and binned while read, against
NumPy block means of the arrays read straight from Zarr; memory bounded by the bins."""

from __future__ import annotations

import math
import tracemalloc
import warnings
from typing import Any

import numpy as np
import pytest

from actstore.errors import SelectionError
from actstore.query import slices
from actstore.store.store import ActStore

from .helpers import raw
from .synth import write_synthetic_run


def np_block_means(x: np.ndarray, fr: int, fc: int) -> np.ndarray:
    """Means of fr x fc blocks, NaN left out, by padding and reshaping (the last blocks
    hold what is left)."""
    r, c = x.shape
    padded = np.full((math.ceil(r / fr) * fr, math.ceil(c / fc) * fc), np.nan)
    padded[:r, :c] = x
    blocks = padded.reshape(padded.shape[0] // fr, fr, padded.shape[1] // fc, fc)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.asarray(np.nanmean(blocks, axis=(1, 3)))


def _raw_slice(run: Any, source: str, layer: int | None, step: int, head: int | None) -> np.ndarray:
    pos = run.step_positions(step)
    x = raw(run, source)
    if source == "attn_weights":
        li = run.layers.index(layer)
        att = x[li, :, pos.start : pos.stop, : pos.stop]
        return att[head] if head is not None else att.mean(axis=0)
    return x[run.layers.index(layer), pos.start : pos.stop] if x.ndim == 3 else x[pos.start : pos.stop]


CASES = [
    ("attn_weights", 1, 0, None, "signed"),
    ("attn_weights", 2, 0, 3, "signed"),
    ("attn_weights", 0, 3, None, "abs"),  # a decode step: one query row over every key
    ("hidden_out", 1, 0, None, "signed"),
    ("mlp_act", 2, 0, None, "abs"),
    ("logits", None, 0, None, "signed"),
]


@pytest.mark.parametrize("one_row_blocks", [False, True])
@pytest.mark.parametrize(("source", "layer", "step", "head", "reduce"), CASES)
def test_binned_slice_is_numpy_block_means(
    tiny: Any, monkeypatch: pytest.MonkeyPatch, one_row_blocks: bool,
    source: str, layer: int | None, step: int, head: int | None, reduce: str,
) -> None:  # fmt: skip
    """4 x 5 bins of every kind of slice, read whole or one row per block (bins then
    span blocks), equal NumPy's block means of the Zarr arrays."""
    run = tiny.run
    if one_row_blocks:
        monkeypatch.setattr(slices, "BLOCK_BYTES", 1)
    want = _raw_slice(run, source, layer, step, head)
    want = np.abs(want) if reduce == "abs" else want
    img = slices.read_slice(run, source, layer, step, head, reduce, max_rows=4, max_cols=5)
    fr, fc = -(-want.shape[0] // 4), -(-want.shape[1] // 5)
    assert img.block == (fr, fc) and img.shape == want.shape and not img.reshaped
    assert img.first_position == run.step_positions(step).start
    np.testing.assert_allclose(img.data, np_block_means(want, fr, fc), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("source", "layer", "head"), [("attn_weights", 1, None), ("attn_weights", 0, 2),
                                                       ("hidden_in", 0, None), ("mlp_down_in", 1, None)])  # fmt: skip
def test_a_slice_that_fits_is_the_slice_as_read(
    tiny: Any, monkeypatch: pytest.MonkeyPatch, source: str, layer: int, head: int | None
) -> None:
    """No bins needed: the values read, bit for bit, however many blocks it took."""
    monkeypatch.setattr(slices, "BLOCK_BYTES", 7 * 8 * 64 * 4)  # a few rows per block
    run = tiny.run
    img = slices.read_slice(run, source, layer, 0, head)
    assert img.block == (1, 1) and not img.binned
    want = _raw_slice(run, source, layer, 0, head)
    if source == "mlp_down_in":  # derived in float32 by the reader: compare as read
        np.testing.assert_allclose(img.data, want, rtol=1e-6)
    else:
        np.testing.assert_array_equal(img.data, want)


def test_one_position_is_a_grid_binned_without_its_padding(tiny: Any) -> None:
    run = tiny.run
    vec = _raw_slice(run, "hidden_out", 1, 2, None)[0]
    rows, cols = slices.grid_shape(vec.size)
    img = slices.read_slice(run, "hidden_out", 1, 2)
    assert img.reshaped and img.shape == (rows, cols) and img.block == (1, 1)
    np.testing.assert_array_equal(img.data.reshape(-1)[: vec.size], vec)
    small = slices.read_slice(run, "hidden_out", 1, 2, max_rows=3, max_cols=3)
    grid = np.full(rows * cols, np.nan)
    grid[: vec.size] = vec
    fr, fc = small.block
    np.testing.assert_allclose(small.data, np_block_means(grid.reshape(rows, cols), fr, fc), rtol=1e-12)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"source": "attn_weights", "layer": 0, "head": -1}, "heads 0.."),
        ({"source": "attn_weights", "layer": 0, "head": 99}, "heads 0.."),
        ({"source": "hidden_out", "layer": None}, "needs a layer"),
        ({"source": "hidden_out", "layer": 99}, "layer"),
        ({"source": "hidden_out", "layer": 0, "reduce": "mean"}, "reduce must be"),
        ({"source": "hidden_out", "layer": 0, "max_rows": 0}, "bins must be"),
        ({"source": "nope", "layer": 0}, "unknown source"),
    ],
)
def test_bad_slices_say_what_is_wrong(tiny: Any, kwargs: dict[str, Any], fragment: str) -> None:
    args = {"step": 0, **kwargs}
    with pytest.raises(SelectionError, match=fragment):
        slices.read_slice(tiny.run, **args)


def test_memory_follows_the_bins_not_the_slice(tmp_path: Any) -> None:
    """A 2048-token prefill's attention over 4 heads is 134 MB as float64; reading it
    into 512 x 512 bins allocates a bounded working set (tracemalloc counts NumPy's
    buffers), and the bins equal NumPy's block means."""
    store = ActStore.open(tmp_path / "long.zarr", create=True)
    run_id = write_synthetic_run(store, n_layers=1, prompt_len=2048, n_steps=2, width=64, sources=(),
                                 n_snapshots=1, labels=("joy",), attention_heads=4, step_chunk=512)  # fmt: skip
    run = store.run(run_id)
    tracemalloc.start()
    try:
        img = slices.read_slice(run, "attn_weights", 0, 0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert img.shape == (2048, 2048) and img.block == (4, 4) and img.data.shape == (512, 512)
    whole = 4 * 2048 * 2048 * 8
    print(f"read_slice peak {peak / 2**20:.1f} MiB (the slice as float64: {whole / 2**20:.0f} MiB)")
    assert peak < 56 * 2**20 < whole / 2, f"peak {peak / 2**20:.1f} MiB"
    want = np_block_means(raw(run, "attn_weights")[0, :, :2048, :2048].mean(axis=0), 4, 4)
    np.testing.assert_allclose(img.data, want, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize(("shape", "limits"), [((37, 90), (10, 10)), ((90, 37), (10, 10)), ((30, 8), (4, 50))])
def test_block_means_of_an_oblong_array(shape: tuple[int, int], limits: tuple[int, int]) -> None:
    """Rows and columns are binned each by their own factor: at most ``max_rows`` x
    ``max_cols`` bins, each the NaN-skipping mean of its block."""
    x = np.random.default_rng(1).normal(size=shape)
    x[3, 5] = np.nan
    bins, fr, fc = slices.block_means(x, *limits)
    assert bins.shape == (math.ceil(shape[0] / fr), math.ceil(shape[1] / fc))
    assert bins.shape[0] <= limits[0] and bins.shape[1] <= limits[1]
    assert (fr, fc) == (math.ceil(shape[0] / limits[0]), math.ceil(shape[1] / limits[1]))
    np.testing.assert_allclose(bins, np_block_means(x, fr, fc), rtol=1e-12, atol=1e-12)


def test_a_bin_with_no_defined_value_is_nan_without_a_warning() -> None:
    """Blocks of rows with NaN (a grid's padding, undefined values) in any order: each bin
    is the mean of its defined values, NumPy's nanmean of the block; a bin with none is
    NaN, quietly (no "invalid value" warning from its 0 / 0)."""
    x = np.arange(48, dtype=np.float64).reshape(6, 8)
    x[0:2, 0:4] = np.nan  # bin (0, 0): nothing defined
    x[4, 5] = np.nan  # bin (2, 1): partly defined
    b = slices.Binner(6, 8, 2, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        b.add(3, x[3:6])
        b.add(0, x[0:3])
        got = b.result()
    blocks = x.reshape(3, 2, 2, 4).transpose(0, 2, 1, 3).reshape(3, 2, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the oracle's own empty-slice warning
        want = np.nanmean(blocks, axis=-1)
    assert np.isnan(got[0, 0]) and np.isnan(want[0, 0])
    np.testing.assert_allclose(got, want, rtol=1e-12)
