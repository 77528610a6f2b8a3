"""Signed colour scales read as Activation Lab's (matplotlib ``RdBu_r``): positive red,
negative blue, in the report's plotly figures, the viewer's heatmap and ``actstore
heatmap``. The oracle is matplotlib's own RdBu_r and the pixels it draws."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from actstore.report import figures as F
from actstore.report import heatmaps as H
from actstore.view import api


def _rgb(text: str) -> np.ndarray:
    m = re.fullmatch(r"rgb\((\d+),(\d+),(\d+)\)", text)
    assert m, text
    return np.array([int(v) for v in m.groups()]) / 255


def _at(scale: Any, frac: float) -> np.ndarray:
    """A plotly colorscale ([[stop, 'rgb(...)'], ...]) at ``frac``, interpolated as plotly does."""
    stops = np.array([s for s, _ in scale])
    colors = np.stack([_rgb(c) for _, c in scale])
    return np.array([np.interp(frac, stops, colors[:, i]) for i in range(3)])


def _red(c: np.ndarray) -> bool:
    return bool(c[0] > c[2] + 0.25)


def _blue(c: np.ndarray) -> bool:
    return bool(c[2] > c[0] + 0.25)


def test_the_plotly_scale_is_matplotlibs_rdbu_r() -> None:
    import matplotlib

    cmap = matplotlib.colormaps["RdBu_r"]
    for stop, _ in F.DIVERGING_SCALE:
        np.testing.assert_allclose(_at(F.DIVERGING_SCALE, stop), cmap(stop)[:3], atol=1 / 255)
    assert _red(_at(F.DIVERGING_SCALE, 1.0)) and _red(_at(F.DIVERGING_SCALE, 0.8))
    assert _blue(_at(F.DIVERGING_SCALE, 0.0)) and _blue(_at(F.DIVERGING_SCALE, 0.2))


def test_report_signed_heatmap_maps_the_max_to_red() -> None:
    fig = F.heatmap(np.array([[-2.0, 0.5], [1.0, 3.0]]), [0, 1], ["a", "b"], title="t", signed=True)
    trace = fig["data"][0]
    assert trace["zmid"] == 0 and trace["reversescale"] is False  # a reversed scale would flip the colours
    assert _red(_at(trace["colorscale"], 1.0)) and _blue(_at(trace["colorscale"], 0.0))


def test_viewer_heatmap_signed_scale(two_run_store: Any) -> None:
    run = two_run_store.run(two_run_store.run_ids()[0])
    h = api.heatmap(run, "hidden_out", run.layers[0], 0)
    assert h["zmid"] == 0
    assert _red(_at(h["colorscale"], 1.0)) and _blue(_at(h["colorscale"], 0.0))
    # magnitudes and attention have no sign: a sequential scale
    assert api.heatmap(run, "hidden_out", run.layers[0], 0, reduce="abs")["colorscale"] == "Viridis"
    assert api.heatmap(run, "attn_weights", run.layers[0], 0)["colorscale"] == "Viridis"


def _long_runs(row: np.ndarray, min_len: int = 20) -> list[np.ndarray]:
    """Colours of the runs of one colour longer than ``min_len`` px along a pixel row,
    left to right, skipping white-ish ones (the background, the colour bar's middle)."""
    out, start = [], 0
    for i in range(1, len(row) + 1):
        if i == len(row) or not np.allclose(row[i], row[start], atol=0.02):
            if i - start > min_len and row[start].min() < 0.9:
                out.append(row[start])
            start = i
    return out


def test_signed_png_draws_positive_red_and_negative_blue(tmp_path: Path) -> None:
    import matplotlib.image

    data = np.where(np.arange(40) < 20, 1.0, -1.0)[None].repeat(12, 0)  # left half +1, right half -1
    vmin, vmax = H.color_range(data, "signed")
    path = H.render_png(data, tmp_path / "s.png", "t", "x", "y", H.default_cmap("signed"), vmin, vmax)
    img = matplotlib.image.imread(path)[..., :3]
    left, right = _long_runs(img[img.shape[0] // 2])[:2]
    assert _red(left) and _blue(right), (left, right)


@pytest.mark.parametrize(("normalize", "cmap"), [("signed", "RdBu_r"), ("per_image", "viridis")])
def test_heatmap_default_cmap_follows_normalize(
    two_run_store: Any, tmp_path: Path, normalize: str, cmap: str
) -> None:
    import matplotlib.image
    from click.testing import CliRunner

    from actstore.cli import main

    run = two_run_store.run(two_run_store.run_ids()[0])

    def pixels(out: str, *extra: str) -> np.ndarray:
        res = CliRunner().invoke(main, ["heatmap", run.id, "--store", two_run_store.location, "--layers", "0",
                                        "--steps", "0", "--normalize", normalize, "--out", str(tmp_path / out),
                                        "-q", *extra])  # fmt: skip
        assert res.exit_code == 0, res.output
        [png] = (tmp_path / out).rglob("*.png")
        return np.asarray(matplotlib.image.imread(png))

    default = pixels("default")
    np.testing.assert_array_equal(default, pixels("named", "--cmap", cmap))
    other = "viridis" if cmap == "RdBu_r" else "RdBu_r"
    assert not np.array_equal(default, pixels("other", "--cmap", other))


def test_color_range_of_empty_constant_and_ordinary_data() -> None:
    """No finite value: the unit range; one value: half a unit either side (a visible
    colour, not a zero-width scale); otherwise min..max, or -max|x|..max|x| when signed."""
    nan = np.full((3, 4), np.nan)
    assert H.color_range(nan, "linear") == (0.0, 1.0)
    assert H.color_range(nan, "signed") == (0.0, 1.0)
    assert H.color_range(np.full((2, 2), 2.5), "linear") == (2.0, 3.0)
    assert H.color_range(np.zeros((2, 2)), "signed") == (-1.0, 1.0)
    data = np.array([[-3.0, np.inf], [1.0, np.nan]])
    assert H.color_range(data, "linear") == (-3.0, 1.0)
    assert H.color_range(data, "signed") == (-3.0, 3.0)
