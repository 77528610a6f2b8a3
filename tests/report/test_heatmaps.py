"""PNG heatmaps: file layout, shapes, per-head images, colour scales, errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from actstore.errors import SelectionError
from actstore.report import heatmaps as H


@pytest.mark.parametrize(
    ("width", "shape"), [(576, (24, 24)), (1536, (32, 48)), (64, (8, 8)), (97, (10, 10)), (1, (1, 1))]
)
def test_grid_shape(width: int, shape: tuple[int, int]) -> None:
    assert H.grid_shape(width) == shape
    assert shape[0] * shape[1] >= width


def test_vector_heatmaps_default_layout(two_run_store: Any, tmp_path: Path) -> None:
    import matplotlib.image

    run = two_run_store.run(two_run_store.run_ids()[0])
    paths = H.write_heatmaps(run, layers=[0, 1], steps=[0, -1], out=tmp_path, progress=False)  # source: the default
    last = run.n_steps - 1
    expected = {
        tmp_path / run.id / "hidden_out" / f"layer_{la:02d}_step_{s:03d}.png"
        for la in (0, 1)
        for s in (0, last)
    }
    assert set(paths) == expected
    for p in paths:
        img = matplotlib.image.imread(p)
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100


def test_only_the_needed_slices_are_read(two_run_store: Any, tmp_path: Path) -> None:
    """A decode step's image reads the shard index and the one inner chunk holding its
    position, counted at the Zarr store: never the whole source."""
    from actstore.testing import counting_store

    run_id = two_run_store.run_ids()[0]
    store, cs = counting_store(two_run_store.location)
    run = store.run(run_id)
    folder = Path(two_run_store.location) / "runs" / run_id / "acts" / "mlp_act"
    stored = sum(f.stat().st_size for f in (folder / "c").rglob("*") if f.is_file())
    cs.log.clear()
    H.write_heatmaps(run, "mlp_act", [1], [run.n_steps - 1], out=tmp_path, progress=False)
    reads = [(k, n) for k, n in cs.data_reads() if "/acts/mlp_act/" in k]
    assert 1 <= len(reads) <= 2, reads  # shard index + one inner chunk
    assert sum(n for _, n in reads) < stored / 2
    cs.log.clear()
    H.write_heatmaps(run, "attn_weights", [2], [run.n_steps - 1], out=tmp_path, progress=False)
    att = [(k, n) for k, n in cs.data_reads() if "/acts/attn_weights/" in k]
    att_stored = sum(f.stat().st_size for f in (folder.parent / "attn_weights" / "c").rglob("*") if f.is_file())
    assert att and sum(n for _, n in att) < att_stored / 2  # one layer's row, not every layer


def test_decode_step_is_drawn_as_a_grid(two_run_store: Any) -> None:
    run = two_run_store.run(two_run_store.run_ids()[0])
    sl = H.plan_slices(run, "hidden_out", [0], [1], False, Path("x"))[0]
    data, _x, ylabel, reshaped = H.read_slice(run, "hidden_out", sl, "signed")
    assert reshaped and data.shape == H.grid_shape(run.group["acts/residual"].shape[-1])
    prefill = H.plan_slices(run, "hidden_out", [0], [0], False, Path("x"))[0]
    data, _x, ylabel, reshaped = H.read_slice(run, "hidden_out", prefill, "abs")
    assert not reshaped and data.shape[0] == run.prompt_len and (data >= 0).all()


def test_attention_per_head_and_mean(two_run_store: Any, tmp_path: Path) -> None:
    run = two_run_store.run(two_run_store.run_ids()[0])
    heads = run.array("attn_weights").shape[1]
    per_head = H.write_heatmaps(run, "attn_weights", [0], [0, 2], per_head=True, out=tmp_path, progress=False)
    assert len(per_head) == 2 * heads
    assert tmp_path / run.id / "attn_weights" / "layer_00" / "step_002_head_00.png" in per_head
    mean = H.write_heatmaps(run, "attn_weights", [1], [2], out=tmp_path, progress=False)
    assert mean == [tmp_path / run.id / "attn_weights" / "layer_01_step_002.png"]
    sl = H.plan_slices(run, "attn_weights", [1], [2], False, tmp_path)[0]
    data, *_ = H.read_slice(run, "attn_weights", sl, "signed")
    p = run.prompt_len + 1  # step 2 computed position P+1: one query row, keys 0..P+1
    assert data.shape == (1, p + 1)
    np.testing.assert_allclose(data.sum(), 1.0, atol=1e-3)  # each head's row sums to one


@pytest.mark.parametrize("normalize", ["none", "per_image", "signed", "global"])
def test_color_scales(two_run_store: Any, tmp_path: Path, monkeypatch: Any, normalize: str) -> None:
    run = two_run_store.run(two_run_store.run_ids()[0])
    ranges: list[tuple[float, float, float, float]] = []

    def fake_render(data: np.ndarray, path: Path, *a: Any, **k: Any) -> Path:
        vmin, vmax = a[4], a[5]
        ranges.append((vmin, vmax, float(np.nanmin(data)), float(np.nanmax(data))))
        return path

    monkeypatch.setattr(H, "render_png", fake_render)
    H.write_heatmaps(run, "attn_out", [0, 1], [0, 1], normalize=normalize, out=tmp_path, progress=False)
    assert len(ranges) == 4
    if normalize == "global":
        assert len({(lo, hi) for lo, hi, _, _ in ranges}) == 1
        assert ranges[0][0] == min(r[2] for r in ranges) and ranges[0][1] == max(r[3] for r in ranges)
    elif normalize == "signed":
        assert all(lo == -hi and hi == max(abs(a), abs(b)) for lo, hi, a, b in ranges)
    else:
        assert all((lo, hi) == (a, b) for lo, hi, a, b in ranges)


def test_errors(two_run_store: Any, tmp_path: Path) -> None:
    run = two_run_store.run(two_run_store.run_ids()[0])
    with pytest.raises(SelectionError, match="steps"):
        H.write_heatmaps(run, "hidden_out", [0], [99], out=tmp_path, progress=False)
    with pytest.raises(SelectionError, match="layer"):
        H.write_heatmaps(run, "hidden_out", [7], [0], out=tmp_path, progress=False)
    with pytest.raises(SelectionError, match="colormap"):
        H.write_heatmaps(run, "hidden_out", [0], [0], cmap="nope", out=tmp_path, progress=False)
    with pytest.raises(ValueError, match="unknown source"):
        H.write_heatmaps(run, "bogus", [0], [0], out=tmp_path, progress=False)


def test_the_package_serves_its_two_entry_points_and_nothing_else() -> None:
    """``actstore.report`` imports its entry points on first use (so the progress module
    stays light): each name gives its own function, any other name is an AttributeError."""
    import actstore.report as report
    from actstore.report.build import build_report
    from actstore.report.heatmaps import write_heatmaps

    assert report.build_report is build_report and report.write_heatmaps is write_heatmaps
    with pytest.raises(AttributeError):
        report.make_report  # noqa: B018 - the lookup is the test
    assert not hasattr(report, "heatmaps_of")


@pytest.mark.parametrize("ylabel", ["token position", "query position"])
def test_position_rows_are_labelled_by_their_positions(tmp_path: Path, monkeypatch: Any, ylabel: str) -> None:
    """A slice of rows starting at position 20 is drawn with its y axis running from
    position 20 (top) to 29 (bottom), one row per position, whatever the bins it holds;
    other axes (a grid of one position's vector) count from 0."""
    from matplotlib.figure import Figure

    from actstore.report.heatmaps import render_png

    drawn: list[tuple[Any, Any]] = []
    monkeypatch.setattr(Figure, "savefig", lambda fig, path, **_: drawn.append(
        (fig.axes[0].images[0].get_extent(), fig.axes[0].get_ylim())))  # fmt: skip
    data = np.arange(60, dtype=np.float32).reshape(10, 6)
    render_png(data, tmp_path / "a.png", "t", "dim", ylabel, "viridis", 0.0, 59.0, first_position=20)
    render_png(data[:5, :3], tmp_path / "b.png", "t", "dim", ylabel, "viridis", 0.0, 59.0, first_position=20,
               shape=(10, 6))  # bin means of the same slice  # fmt: skip
    render_png(data, tmp_path / "c.png", "t", "column", "row", "viridis", 0.0, 59.0, first_position=20)
    (ext_a, ylim_a), (ext_b, ylim_b), (ext_c, ylim_c) = drawn
    assert tuple(ext_a) == tuple(ext_b) == (-0.5, 5.5, 29.5, 19.5)
    assert tuple(ylim_a) == tuple(ylim_b) == (29.5, 19.5)
    assert tuple(ext_c) == (-0.5, 5.5, 9.5, -0.5) and tuple(ylim_c) == (9.5, -0.5)


def test_a_global_source_is_one_image_per_step(two_run_store: Any, tmp_path: Path) -> None:
    """Logits have no layer: one image per step, named by the step alone, drawn as the
    step's positions x vocabulary."""
    run = two_run_store.run(two_run_store.run_ids()[0])
    assert "logits" in run.sources and run.n_steps >= 2
    planned = H.plan_slices(run, "logits", None, [1, 0, -1], False, tmp_path)
    base = tmp_path / run.id / "logits"
    last = run.n_steps - 1
    assert planned == [H.Slice(None, 1, None, base / "step_001.png", "logits · step 1"),
                       H.Slice(None, 0, None, base / "step_000.png", "logits · step 0"),
                       H.Slice(None, last, None, base / f"step_{last:03d}.png", f"logits · step {last}")]  # fmt: skip
    written = H.write_heatmaps(run, "logits", steps=[0], out=tmp_path / "png", progress=False)
    assert [p.relative_to(tmp_path / "png").as_posix() for p in written] == [f"{run.id}/logits/step_000.png"]
    assert written[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_binned_slice_keeps_the_axes_of_the_whole_slice(two_run_store: Any, tmp_path: Path,
                                                          monkeypatch: Any) -> None:  # fmt: skip
    """Logits are wider than PNG_BINS: the image holds bin means, but its x axis still
    spans the whole vocabulary (ids 0 to V-1) and its y axis the step's positions."""
    from matplotlib.figure import Figure

    run = two_run_store.run(two_run_store.run_ids()[0])
    vocab = int(run.group["acts/logits"].shape[-1])
    assert vocab > H.PNG_BINS
    drawn: list[tuple[Any, Any]] = []
    monkeypatch.setattr(Figure, "savefig", lambda fig, path, **_: drawn.append(
        (fig.axes[0].images[0].get_array().shape, fig.axes[0].images[0].get_extent())))  # fmt: skip
    H.write_heatmaps(run, "logits", steps=[0], out=tmp_path, progress=False)
    [(held, extent)] = drawn
    assert held[1] <= H.PNG_BINS  # bin means, not the vocabulary's columns
    assert tuple(extent) == (-0.5, vocab - 0.5, run.prompt_len - 0.5, -0.5)


def test_a_png_goes_into_folders_made_for_it(tmp_path: Path) -> None:
    from actstore.report.heatmaps import render_png

    path = render_png(np.eye(4, dtype=np.float32), tmp_path / "a" / "b" / "c.png", "t", "x", "y", "viridis",
                      0.0, 1.0)  # fmt: skip
    assert path == tmp_path / "a" / "b" / "c.png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_each_image_is_titled_with_what_it_shows(two_run_store: Any, tmp_path: Path, monkeypatch: Any) -> None:
    """Source, layer, step and its kind, the slice's shape, and ' · |x|' when magnitudes
    are drawn; the run id on the second line."""
    from matplotlib.figure import Figure

    run = two_run_store.run(two_run_store.run_ids()[0])
    titles: list[str] = []
    monkeypatch.setattr(Figure, "savefig", lambda fig, path, **_: titles.append(fig.axes[0].get_title()))
    for reduce in ("abs", "signed"):
        H.write_heatmaps(run, "hidden_out", layers=[0], steps=[0], reduce=reduce, out=tmp_path / reduce,
                         progress=False)  # fmt: skip
    shape = (run.prompt_len, int(run.group["acts/residual"].shape[-1]))
    assert titles == [f"hidden_out · layer 0 · step 0 (prefill) · {shape} · |x|\n{run.id}",
                      f"hidden_out · layer 0 · step 0 (prefill) · {shape}\n{run.id}"]  # fmt: skip
