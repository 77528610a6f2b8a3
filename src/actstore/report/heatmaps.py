"""Activation heatmaps as PNG files, one per layer x step (x head), read lazily.

>>> run = ActStore.open("stores/actstore.zarr").run("latest")          # doctest: +SKIP
>>> write_heatmaps(run, "hidden_out", layers=[0, 10], steps=[0, 1])     # doctest: +SKIP
[PosixPath('heatmaps/<run_id>/hidden_out/layer_00_step_000.png'), ...]

Data flow: for each (layer, step), only that slice is read, in one orthogonal Zarr read:
the step's positions x width of one layer of a vector source (``query.states.select``,
which serves derived sources too), or the step's query rows x the keys up to its last
position of one layer's attention weights (``query.states.read_region``). Zarr fetches
just the inner chunks under the slice, concurrently (slicing the reader's Dask arrays
instead ran one task per inner chunk: 262 -> 76 ms for a 612-token prefill). A step
with one position (a decode step) is one vector, drawn as a near-square grid of its
width instead of a 1-pixel strip. Attention is averaged over heads unless ``per_head``.

Colour scale (``normalize``): ``per_image`` and ``none`` span each image's own min..max
(the seed's behaviour), ``signed`` is symmetric around zero, ``global`` shares one
min..max over every image of the call (a first pass reads the slices once to find it).
``reduce="abs"`` draws magnitudes. ``cmap`` defaults to ``RdBu_r`` for ``signed``
(positive red, negative blue, as Activation Lab draws) and ``viridis`` otherwise.

Files: ``<out>/<run_id>/<source>/layer_NN_step_MMM.png``; per head
``<out>/<run_id>/<source>/layer_NN/step_MMM_head_HH.png``; global sources (embeddings,
logits) ``<out>/<run_id>/<source>/step_MMM.png``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from actstore import naming
from actstore.errors import SelectionError
from actstore.paths import check_folder, output_folder
from actstore.query.states import read_region, select
from actstore.report import progress as P

NORMALIZE = ("none", "per_image", "signed", "global")
REDUCE = ("signed", "abs")
SIGNED_CMAP = "RdBu_r"  # Activation Lab's: positive red, negative blue


def default_cmap(normalize: str) -> str:
    """The colormap used when none is given: diverging for a scale symmetric around 0."""
    return SIGNED_CMAP if normalize == "signed" else "viridis"


@dataclass(frozen=True)
class Slice:
    """One image to draw: which layer (None: global source) and step, and the file stem."""

    layer: int | None
    step: int
    head: int | None
    path: Path
    title: str


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
    """A 2-D array to draw; a single row becomes a padded grid (second value True)."""
    if x.shape[0] != 1:
        return x, False
    rows, cols = grid_shape(x.shape[1])
    grid = np.full(rows * cols, np.nan, dtype=np.float64)
    grid[: x.shape[1]] = x[0]
    return grid.reshape(rows, cols), True


def check_request(run: Any, source: str, normalize: str = "per_image", reduce: str = "signed") -> None:
    """A heatmap request's source (known, captured) and colour options, or SelectionError."""
    naming.check_source(source)
    if source not in run.sources:
        raise SelectionError(f"run {run.id} did not capture {source!r}; it has: {', '.join(run.sources)}")
    if normalize not in NORMALIZE:
        raise SelectionError(f"normalize must be one of {', '.join(NORMALIZE)}, not {normalize!r}")
    if reduce not in REDUCE:
        raise SelectionError(f"reduce must be one of {', '.join(REDUCE)}, not {reduce!r}")


def plan_slices(
    run: Any, source: str, layers: list[int] | None, steps: list[int] | None, per_head: bool, root: Path
) -> list[Slice]:
    """Every image the request asks for, in (layer, step, head) order."""
    n = run.n_steps
    bad = [s for s in steps or [] if not -n <= s < n]
    if bad:
        raise SelectionError(f"run {run.id} has steps 0..{n - 1} (or -{n}..-1), not {bad}")
    step_ids = list(dict.fromkeys(s % n for s in (steps if steps is not None else range(n))))
    base = root / run.id / source
    if source in naming.GLOBAL_SOURCES:
        return [Slice(None, s, None, base / f"step_{s:03d}.png", f"{source} · step {s}") for s in step_ids]
    run.layer_index(layers)  # validates
    lay = list(run.layers) if layers is None else list(layers)
    heads = range(int(run.array(source).shape[1])) if source == "attn_weights" and per_head else [None]
    out = []
    for layer in lay:
        for s in step_ids:
            for h in heads:
                if h is None:
                    out.append(Slice(layer, s, None, base / f"layer_{layer:02d}_step_{s:03d}.png",
                                     f"{source} · layer {layer} · step {s}"))  # fmt: skip
                else:
                    out.append(Slice(layer, s, h, base / f"layer_{layer:02d}" / f"step_{s:03d}_head_{h:02d}.png",
                                     f"{source} · layer {layer} · step {s} · head {h}"))  # fmt: skip
    return out


def read_slice(run: Any, source: str, sl: Slice, reduce: str) -> tuple[np.ndarray, str, str, bool]:
    """(2-D data, x label, y label, reshaped) for one image; reads only that slice."""
    positions = run.step_positions(sl.step)
    if source == "attn_weights":
        li = run.layer_index([sl.layer])[0]
        heads = slice(None) if sl.head is None else slice(sl.head, sl.head + 1)
        rows = slice(positions.start, positions.stop)
        att = read_region(run, source, (li, heads, rows, slice(0, positions.stop))).astype(np.float64)
        data = att[0] if sl.head is not None else att.mean(axis=0)
        xlabel, ylabel, reshaped = "key position", "query position", False
    else:
        # one orthogonal read (the query layer's select), not one task per inner chunk
        x = select(run, source, list(positions), None if sl.layer is None else [sl.layer]).compute()
        data, reshaped = as_image(np.asarray(x[0] if x.ndim == 3 else x, dtype=np.float64))
        xlabel, ylabel = (
            ("channel (grid column)", "channel (grid row)") if reshaped else ("channel", "token position")
        )
    data = np.asarray(data, dtype=np.float64)
    return (np.abs(data) if reduce == "abs" else data), xlabel, ylabel, reshaped


def color_range(data: np.ndarray, normalize: str) -> tuple[float, float]:
    finite = data[np.isfinite(data)]
    if finite.size == 0:
        return 0.0, 1.0
    if normalize == "signed":
        m = float(np.abs(finite).max()) or 1.0
        return -m, m
    lo, hi = float(finite.min()), float(finite.max())
    return (lo, hi) if hi > lo else (lo - 0.5, hi + 0.5)


def render_png(
    data: np.ndarray, path: Path, title: str, xlabel: str, ylabel: str, cmap: str, vmin: float, vmax: float,
    first_position: int = 0, dpi: int = 100,
) -> Path:  # fmt: skip
    """Draw one heatmap with a colour bar (matplotlib, no global pyplot state)."""
    from matplotlib.figure import Figure

    h, w = data.shape
    fig = Figure(figsize=(max(4.0, min(16.0, w / 120 + 4.0)), max(3.0, min(10.0, h / 12 + 2.5))), dpi=dpi)
    ax = fig.add_subplot()
    extent = None
    if ylabel == "token position" or ylabel == "query position":
        extent = (-0.5, w - 0.5, first_position + h - 0.5, first_position - 0.5)
    im = ax.imshow(
        data, aspect="auto", interpolation="nearest", cmap=cmap, vmin=vmin, vmax=vmax, extent=extent
    )
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, shrink=0.85)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def _iter_data(run: Any, source: str, slices: list[Slice], reduce: str) -> Iterator[tuple[Slice, Any]]:
    for sl in slices:
        yield sl, read_slice(run, source, sl, reduce)


def write_heatmaps(
    run: Any,
    source: str = "hidden_out",
    layers: list[int] | None = None,
    steps: list[int] | None = None,
    *,
    per_head: bool = False,
    normalize: str = "per_image",
    reduce: str = "signed",
    cmap: str | None = None,
    out: str | Path = "heatmaps",
    progress: bool | None = None,
    dpi: int = 100,
) -> list[Path]:
    """Write one PNG per layer x step (x head); returns their paths (see module docstring)."""
    import matplotlib

    check_request(run, source, normalize, reduce)
    cmap = cmap or default_cmap(normalize)
    if cmap not in matplotlib.colormaps:
        raise SelectionError(f"unknown colormap {cmap!r} (any Matplotlib name, e.g. viridis, RdBu_r, magma)")
    check_folder(out)  # before reading: a bad --out fails at once, creating nothing
    slices = plan_slices(run, source, layers, steps, per_head and source == "attn_weights", Path(out))
    shared: tuple[float, float] | None = None
    if normalize == "global":
        lo, hi = math.inf, -math.inf
        for _, (data, *_rest) in _iter_data(run, source, slices, reduce):
            a, b = color_range(data, "per_image")
            lo, hi = min(lo, a), max(hi, b)
        shared = (lo, hi)
    written = []
    bar = P.bar(len(slices), f"heatmaps {source}", progress, unit="png")
    # a full disk: one line naming the folder, and a folder this call made is removed
    with output_folder(Path(out) / run.id / source):
        for sl, (data, xlabel, ylabel, _reshaped) in _iter_data(run, source, slices, reduce):
            vmin, vmax = shared or color_range(data, normalize)
            kind = run.steps[sl.step].get("kind", "")
            title = (
                f"{sl.title} ({kind}) · {tuple(data.shape)}{' · |x|' if reduce == 'abs' else ''}\n{run.id}"
            )
            first = run.step_positions(sl.step).start
            written.append(render_png(data, sl.path, title, xlabel, ylabel, cmap, vmin, vmax, first, dpi))
            bar.update()
    bar.close()
    return written
