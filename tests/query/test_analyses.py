"""Analyses against plain NumPy on vectors read straight from Zarr."""

from __future__ import annotations

import warnings
from itertools import combinations
from typing import Any

import numpy as np
import pandas as pd
import pytest
import zarr

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


def test_neuron_trajectory_columns_and_over(synth_store: Any) -> None:
    run = synth_store.runs(["all"])[0]
    df = A.neuron_trajectory(run, run.layers[1], 5, source="attn_out")
    assert list(df.columns) == [
        "run", "source", "layer", "neuron", "step", "position", "token", "value", "generated_token",
    ]  # fmt: skip
    assert df[["run", "source", "layer", "neuron"]].drop_duplicates().values.tolist() == [
        [run.id, "attn_out", run.layers[1], 5]
    ]
    with pytest.raises(SelectionError, match=r"^over must be 'steps' or 'positions', not 'tokens'$"):
        A.neuron_trajectory(run, run.layers[1], 5, over="tokens")


def test_cross_layer_matrix_passes_its_options(synth_store: Any) -> None:
    run = synth_store.runs(["all"])[0]
    mat = A.cross_layer_matrix(run, source="mlp_down_out", state="initial", layers=run.layers[1:3])
    x = raw(run, "mlp_down_out")[1:3, run.prompt_len - 1]
    assert list(mat.index) == run.layers[1:3]
    assert mat.iloc[0, 1] == pytest.approx(np_cos(x[0], x[1]), rel=1e-9)


# ---- layer_discrimination on hand-made references: exact distances, ties, NaN --------------
def _discrimination_run(store: Any, *, n_snapshots: int = 2, labels: tuple[str, ...] = ("a", "b", "c")) -> Any:
    """Three layers; references are one-hot e0, e1, e2 at every layer (every pair at
    distance exactly 1, so the separation ties across layers); snapshots equal the
    references at layer 0 (within = 0) and are e3 elsewhere (distance 1: within = 1)."""
    from .synth import write_synthetic_run

    rid = write_synthetic_run(store, n_layers=3, prompt_len=4, n_steps=2, width=8, sources=("hidden_in",),
                              n_snapshots=n_snapshots, labels=labels)  # fmt: skip
    g = zarr.open_group(store=store.run(rid).group.store, path=store.run(rid).group.path, mode="r+")
    eye = np.eye(8, dtype=np.float16)
    g["references/hidden_out"][...] = np.stack([np.stack([eye[i]] * 3) for i in range(len(labels))])
    if n_snapshots:
        g["snapshots/hidden_out"][...] = np.stack(
            [np.stack([eye[m % len(labels)], eye[3], eye[3]]) for m in range(n_snapshots)]
        )
    return store.run(rid)


def test_layer_discrimination_exact_values_ties_and_nan(tmp_path: Any) -> None:
    from actstore.store.store import ActStore

    store = ActStore.open(tmp_path / "s.zarr", create=True)
    run = _discrimination_run(store)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # within = 0 gives NaN, not a division warning
        df = A.layer_discrimination(run, sources=["hidden_out"])
        by_fisher = A.layer_discrimination(run, sources=["hidden_out"], rank_by="fisher")
    assert list(df.columns) == ["run", "source", "layer", "separation", "min_separation", "within", "fisher", "rank"]
    assert df.index.equals(pd.RangeIndex(3)) and (df["run"] == run.id).all()
    assert df["layer"].tolist() == [0, 1, 2]  # all tie on separation: ranked in layer order
    assert df["rank"].tolist() == [1, 2, 3] and pd.api.types.is_integer_dtype(df["rank"])
    assert df["separation"].tolist() == [1.0] * 3 and df["min_separation"].tolist() == [1.0] * 3
    assert df["within"].tolist() == [0.0, 1.0, 1.0]
    assert df["fisher"].dtype == np.float64
    assert np.isnan(df["fisher"].iloc[0]) and df["fisher"].tolist()[1:] == [1.0, 1.0]
    # by fisher: the NaN layer has no rank and comes last
    assert by_fisher["layer"].tolist() == [1, 2, 0] and by_fisher.index.equals(pd.RangeIndex(3))
    assert by_fisher["rank"].tolist()[:2] == [1, 2] and by_fisher["rank"].isna().tolist() == [False, False, True]


def test_layer_discrimination_without_snapshots_and_errors(tmp_path: Any) -> None:
    from actstore.store.store import ActStore

    store = ActStore.open(tmp_path / "s.zarr", create=True)
    run = _discrimination_run(store, n_snapshots=0)
    df = A.layer_discrimination(run, sources=["hidden_out"])
    assert df["separation"].tolist() == [1.0] * 3
    assert df["within"].isna().all() and df["fisher"].isna().all() and df["within"].dtype == np.float64
    assert A.layer_discrimination(run, sources=["hidden_out"], rank_by="fisher")["rank"].isna().all()
    with pytest.raises(SelectionError, match=r"^rank_by must be 'separation' or 'fisher', not 'size'$"):
        A.layer_discrimination(run, rank_by="size")
    with pytest.raises(
        SelectionError, match=r"^references keep only hidden_in, hidden_out, attn_out, mlp_down_out, not 'q'$"
    ):
        A.layer_discrimination(run, sources=["hidden_out", "q"])
    one = _discrimination_run(store, labels=("a",))
    with pytest.raises(SelectionError, match=rf"^run {one.id} has 1 reference state\(s\); discrimination needs two"):
        A.layer_discrimination(one)
