"""Analyses against plain NumPy on vectors read straight from Zarr."""

from __future__ import annotations

from itertools import combinations
from typing import Any

import numpy as np
import pandas as pd
import pytest

from actstore.errors import SelectionError
from actstore.query import analyses as A

from .helpers import RESIDUAL, np_cos, raw, raw_stack


def test_cross_layer(any_run: Any) -> None:
    run = any_run
    x = raw(run, "hidden_out")[:, -1]  # (L, W) at the last position
    mat = A.cross_layer_matrix(run)
    assert list(mat.index) == run.layers == list(mat.columns)
    expected = np.array([[np_cos(a, b) for b in x] for a in x])
    np.testing.assert_allclose(mat.to_numpy(), expected, rtol=1e-9, atol=1e-12)
    long = A.cross_layer(run, source="attn_out", state="initial", layers=run.layers[:2])
    a = raw(run, "attn_out")[:2, run.prompt_len - 1]
    assert len(long) == 4 and long["cosine"].iloc[1] == pytest.approx(np_cos(a[0], a[1]))


def test_neuron_trajectory(any_run: Any) -> None:
    run = any_run
    layer, neuron = run.layers[-1], 3
    x = raw(run, "mlp_down_out")[-1, :, neuron]
    df = A.neuron_trajectory(run, layer, neuron, source="mlp_down_out")
    last = [st["positions"][1] - 1 if "positions" in st else None for st in run.steps]
    expected_pos = [run.prompt_len - 1] + list(range(run.prompt_len, run.n_positions))
    assert df["position"].tolist() == expected_pos == last
    assert df["step"].tolist() == list(range(run.n_steps))
    np.testing.assert_array_equal(df["value"].to_numpy(), x[expected_pos])
    every = A.neuron_trajectory(run, layer, neuron, source="mlp_down_out", over="positions")
    np.testing.assert_array_equal(every["value"].to_numpy(), x)
    assert every["step"].iloc[-1] == run.n_steps - 1
    with pytest.raises(SelectionError):
        A.neuron_trajectory(run, layer, 10**6)


def test_residual_decomposition(any_run: Any) -> None:
    run = any_run
    df = A.residual_decomposition(run, steps=[0, -1])
    x = {s: raw(run, s) for s in RESIDUAL}
    assert len(df) == 2 * len(run.layers)
    for row in df.itertuples(index=False):
        li, p = run.layers.index(row.layer), row.position
        assert p == (run.prompt_len - 1 if row.step == 0 else run.n_positions - 1)
        for s in RESIDUAL:
            assert getattr(row, f"norm_{s}") == pytest.approx(np.linalg.norm(x[s][li, p]), rel=1e-9)
        assert row.cos_attn_out == pytest.approx(
            np_cos(x["attn_out"][li, p], x["hidden_out"][li, p]), rel=1e-9
        )
        assert row.cos_mlp_down_out == pytest.approx(
            np_cos(x["mlp_down_out"][li, p], x["hidden_out"][li, p]), rel=1e-9
        )


def test_layer_discrimination(any_run: Any) -> None:
    run = any_run
    df = A.layer_discrimination(run, sources=["hidden_out", "mlp_down_out"])
    for s in ("hidden_out", "mlp_down_out"):
        refs, snaps = raw_stack(run, "references", s), raw_stack(run, "snapshots", s)
        sub = df[df.source == s].set_index("layer")
        for li, layer in enumerate(run.layers):
            d = [1 - np_cos(refs[i, li], refs[j, li]) for i, j in combinations(range(len(refs)), 2)]
            within = np.mean([min(1 - np_cos(sn[li], r[li]) for r in refs) for sn in snaps])
            assert sub.loc[layer, "separation"] == pytest.approx(np.mean(d), rel=1e-9)
            assert sub.loc[layer, "min_separation"] == pytest.approx(min(d), rel=1e-9)
            assert sub.loc[layer, "fisher"] == pytest.approx(np.mean(d) / within, rel=1e-9)
        ranked = df[df.source == s]
        assert ranked["rank"].tolist() == list(range(1, len(run.layers) + 1))
        assert ranked["separation"].is_monotonic_decreasing
    by_fisher = A.layer_discrimination(run, sources=["hidden_out"], rank_by="fisher")
    assert by_fisher["fisher"].is_monotonic_decreasing


def test_neuron_trajectory_edges(synth_store: Any) -> None:
    run = synth_store.runs(["all"])[0]
    width = raw(run, "hidden_out").shape[-1]
    df = A.neuron_trajectory(run, run.layers[0], width - 1)  # the last neuron is a neuron
    assert df["step"].dtype == np.int64 and df["step"].tolist() == list(range(run.n_steps))
    assert (df["run"] == run.id).all() and (df["layer"] == run.layers[0]).all()
    for bad in (width, -1):
        msg = rf"hidden_out has {width} neurons \(0\.\.{width - 1}\), not {bad}$"
        with pytest.raises(SelectionError, match=msg):
            A.neuron_trajectory(run, run.layers[0], bad)


def test_residual_decomposition_rows(synth_store: Any) -> None:
    run = synth_store.runs(["all"])[0]
    df = A.residual_decomposition(run, steps=[-1, 0], layers=run.layers[1:3])
    # step-major rows whatever the order asked, numbered 0..n-1, each naming its run
    assert list(df.columns[:4]) == ["run", "step", "position", "layer"]
    assert (df["run"] == run.id).all()
    assert df.index.equals(pd.RangeIndex(4))
    assert list(zip(df["step"], df["layer"], strict=True)) == [
        (0, run.layers[1]), (0, run.layers[2]), (run.n_steps - 1, run.layers[1]), (run.n_steps - 1, run.layers[2]),
    ]  # fmt: skip
