"""Activation heatmaps as PNG files, one per layer x step (x head), read lazily.

>>> run = ActStore.open("stores/actstore.zarr").run("latest")          # doctest: +SKIP
>>> write_heatmaps(run, "hidden_out", layers=[0, 10], steps=[0, 1])     # doctest: +SKIP
[PosixPath('heatmaps/<run_id>/hidden_out/layer_00_step_000.png'), ...]

Data flow: for each (layer, step), only that slice is read (``query.slices.read_slice``,
which the viewer reads through too): the step's positions x width of one layer of a
vector source, or the step's query rows x the keys up to its last position of one
layer's attention weights, in blocks of rows, each one orthogonal Zarr read (Zarr
fetches just the inner chunks under it, concurrently; slicing the reader's Dask arrays
instead ran one task per inner chunk: 262 -> 76 ms for a 612-token prefill). A step
with one position (a decode step) is one vector, drawn as a near-square grid of its
width instead of a 1-pixel strip. Attention is averaged over heads unless ``per_head``.
A slice larger than ``PNG_BINS`` per side (more than the figure has pixels) is drawn as
means of blocks, pooled while it is read, so memory follows the picture, not the slice;
the title then says "means of R x C blocks". A slice that fits is drawn as read.

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
from actstore.query import slices
from actstore.report import progress as P

NORMALIZE = ("none", "per_image", "signed", "global")
REDUCE = slices.REDUCE
# Largest image drawn cell by cell, per side: more than a figure's pixels at the default
# dpi (at most 1600 x 1000); a larger slice is drawn as means of blocks (query.slices).
PNG_BINS = 2048
grid_shape = slices.grid_shape  # how a one-position image is laid out (query.slices)
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


def check_request(run: Any, source: str, normalize: str = "per_image", reduce: str = "signed") -> None:
    """A heatmap request's source (known, captured) and colour options, or SelectionError."""
    slices.check_slice(run, source, reduce)
    if normalize not in NORMALIZE:
        raise SelectionError(f"normalize must be one of {', '.join(NORMALIZE)}, not {normalize!r}")


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


def image(run: Any, source: str, sl: Slice, reduce: str, bins: int = PNG_BINS) -> slices.SliceImage:
    """One image's data (``query.slices.read_slice``): reads only that slice, block by
    block, binned to at most ``bins x bins``."""
    return slices.read_slice(run, source, sl.layer, sl.step, sl.head, reduce, bins, bins)


def read_slice(
    run: Any, source: str, sl: Slice, reduce: str, bins: int = PNG_BINS
) -> tuple[np.ndarray, str, str, bool]:
    """(2-D data, x label, y label, reshaped) of :func:`image`."""
    img = image(run, source, sl, reduce, bins)
    return img.data, img.xlabel, img.ylabel, img.reshaped


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
    first_position: int = 0, dpi: int = 100, *, shape: tuple[int, int] | None = None,
) -> Path:  # fmt: skip
    """Draw one heatmap with a colour bar (matplotlib, no global pyplot state).
    ``shape``: the slice's rows x cols when ``data`` holds its bin means (the axes and
    the figure size stay those of the slice)."""
    from matplotlib.figure import Figure

    h, w = shape or data.shape
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


def _iter_data(run: Any, source: str, planned: list[Slice], reduce: str) -> Iterator[tuple[Slice, Any]]:
    for sl in planned:
        yield sl, image(run, source, sl, reduce)


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
    planned = plan_slices(run, source, layers, steps, per_head and source == "attn_weights", Path(out))
    shared: tuple[float, float] | None = None
    if normalize == "global":
        lo, hi = math.inf, -math.inf
        for _, img in _iter_data(run, source, planned, reduce):
            a, b = color_range(img.data, "per_image")
            lo, hi = min(lo, a), max(hi, b)
        shared = (lo, hi)
    written = []
    bar = P.bar(len(planned), f"heatmaps {source}", progress, unit="png")
    # a full disk: one line naming the folder, and a folder this call made is removed
    with output_folder(Path(out) / run.id / source):
        for sl, img in _iter_data(run, source, planned, reduce):
            vmin, vmax = shared or color_range(img.data, normalize)
            kind = run.steps[sl.step].get("kind", "")
            fr, fc = img.block
            means = f" · means of {fr} x {fc} blocks" if img.binned else ""
            title = (
                f"{sl.title} ({kind}) · {tuple(img.shape)}{means}{' · |x|' if reduce == 'abs' else ''}\n{run.id}"
            )
            args = (img.xlabel, img.ylabel, cmap, vmin, vmax, img.first_position, dpi)
            written.append(render_png(img.data, sl.path, title, *args, shape=img.shape))
            bar.update()
    bar.close()
    return written
