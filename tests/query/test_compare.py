"""Comparisons against plain NumPy on vectors read straight from Zarr."""

from __future__ import annotations

from itertools import combinations
from typing import Any

import dask
import numpy as np
import pandas as pd
import pytest
import zarr

from actstore.errors import SelectionError
from actstore.query import compare as C

from .helpers import RESIDUAL, np_cos, np_jaccard, np_mae, raw, raw_stack

METRIC_FNS = {"cosine": np_cos, "mae": np_mae, "jaccard": np_jaccard}


def _check_rows(
    df: pd.DataFrame, expected: dict[tuple[Any, ...], tuple[np.ndarray, np.ndarray]], keys: list[str]
) -> None:
    assert len(df) == len(expected)
    for row in df.itertuples(index=False):
        a, b = expected[tuple(getattr(row, k) for k in keys)]
        for m, fn in METRIC_FNS.items():
            assert getattr(row, m) == pytest.approx(fn(a, b), rel=1e-9, abs=1e-12), (m, row)


class CountingScheduler:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, dsk: Any, keys: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return dask.get(dsk, keys, **kwargs)


def test_intra_run_matches_numpy(any_run: Any) -> None:
    run = any_run
    layers = run.layers[-3:]
    sched = CountingScheduler()
    with dask.config.set(scheduler=sched):
        df = C.intra_run([run], layers=layers)
    assert sched.calls == 1  # one graph for every source and layer
    assert list(df.columns) == ["run", "state_a", "state_b", "source", "layer", "cosine", "mae", "jaccard"]
    expected = {}
    for s in RESIDUAL:
        x = raw(run, s)
        for la in layers:
            li = run.layers.index(la)
            expected[(run.id, s, la)] = (x[li, run.prompt_len - 1], x[li, run.n_positions - 1])
    _check_rows(df, expected, ["run", "source", "layer"])


def test_compare_states_between_arbitrary_states(any_run: Any) -> None:
    run = any_run
    df = C.compare_states(run, "step:0", "snapshot:0", sources=["hidden_in"])
    x, snaps = raw(run, "hidden_in"), raw_stack(run, "snapshots", "hidden_in")
    expected = {(la,): (x[i, run.prompt_len - 1], snaps[0, i]) for i, la in enumerate(run.layers)}
    _check_rows(df, expected, ["layer"])
    assert set(df["state_b"]) == {"snapshot:0"}


def test_inter_run_every_pair(synth_store: Any) -> None:
    runs = synth_store.runs(["all"])
    sched = CountingScheduler()
    with dask.config.set(scheduler=sched):
        df = C.inter_run(runs, sources=["hidden_out", "mlp_down_out"], layers=[0, 3], frac=0.05)
    assert sched.calls == 1
    raws = {(r.id, s): raw(r, s) for r in runs for s in ("hidden_out", "mlp_down_out")}
    pos = {r.id: {"initial": r.prompt_len - 1, "final": r.n_positions - 1} for r in runs}
    assert len(df) == 3 * 2 * 2 * 2  # pairs x states x sources x layers
    assert [tuple(p) for p in df[["run_a", "run_b"]].drop_duplicates().to_numpy()] == [
        (a.id, b.id) for a, b in combinations(runs, 2)
    ]
    for row in df.itertuples(index=False):
        li = [0, 1, 2, 3].index(row.layer)
        a = raws[(row.run_a, row.source)][li, pos[row.run_a][row.state]]
        b = raws[(row.run_b, row.source)][li, pos[row.run_b][row.state]]
        assert row.cosine == pytest.approx(np_cos(a, b)) and row.mae == pytest.approx(np_mae(a, b))
        assert row.jaccard == pytest.approx(np_jaccard(a, b, 0.05))


def test_inter_run_one_run_is_empty(synth_store: Any) -> None:
    df = C.inter_run(synth_store.runs(["all"])[:1])
    assert df.empty and "cosine" in df.columns


def test_snapshots_vs_references(any_run: Any) -> None:
    run = any_run
    sched = CountingScheduler()
    with dask.config.set(scheduler=sched):
        df = C.snapshots_vs_references(run, layers=run.layers[:2])
    assert sched.calls == 1
    assert list(df.columns) == [
        "run",
        "message",
        "role",
        "reference",
        "source",
        "layer",
        "cosine",
        "mae",
        "jaccard",
    ]
    expected = {}
    for s in RESIDUAL:
        snaps, refs = raw_stack(run, "snapshots", s), raw_stack(run, "references", s)
        for m in range(len(snaps)):
            for r, label in enumerate(run.reference_labels):
                for li in range(2):
                    expected[(m, label, s, run.layers[li])] = (snaps[m, li], refs[r, li])
    _check_rows(df, expected, ["message", "reference", "source", "layer"])
    roles = {s["index"]: s["role"] for s in run.snapshot_index}
    assert (df["role"] == df["message"].map(roles)).all()


def test_role_averages(any_run: Any) -> None:
    df = C.snapshots_vs_references(any_run, sources=["hidden_out"])
    avg = C.role_averages(df)
    assert set(avg["role"]) == {"user", "assistant"}
    for role in ("user", "assistant"):
        sub = df[
            (df.role == role)
            & (df.reference == any_run.reference_labels[0])
            & (df.layer == any_run.layers[0])
        ]
        row = avg[
            (avg.role == role)
            & (avg.reference == any_run.reference_labels[0])
            & (avg.layer == any_run.layers[0])
        ]
        assert row["cosine"].item() == pytest.approx(np.mean(sub["cosine"]))
        assert row["n_messages"].item() == sub["message"].nunique()


def test_summarize_seed_columns() -> None:
    df = pd.DataFrame({
        "run": ["a"] * 4 + ["b"] * 4, "source": "hidden_out", "layer": [0, 1, 2, 3] * 2,
        "cosine": [0.9, 0.5, 0.7, np.nan, 1, 1, 1, 1], "mae": [0.1, 0.4, 0.2, 0.3, 0, 0, 0, 0],
        "jaccard": [1, 0.5, 0.25, 0.5, 1, 1, 1, 1],
    })  # fmt: skip
    s = C.summarize(df, by=["run", "source"])
    assert list(s.columns) == ["run", "source", *C.SUMMARY_COLUMNS]
    a = s[s.run == "a"].iloc[0]
    # A NaN layer (a zero vector's cosine) is not averaged around: its statistics are NaN,
    # as NumPy's are; the layer of the lowest cosine is still found among the others.
    assert np.isnan([a.mean_cosine, a.std_cosine, a.median_cosine, a.min_cosine]).all()
    assert a.most_divergent_layer == 1
    b = s[s.run == "b"].iloc[0]
    assert b.mean_cosine == 1 and b.std_cosine == 0 and b.min_cosine == 1
    assert (
        a.mean_MAE == pytest.approx(0.25)
        and a.max_MAE_layer == 1
        and a.std_MAE == pytest.approx(np.std([0.1, 0.4, 0.2, 0.3]))
    )
    assert a.min_overlap == 0.25 and a.min_overlap_layer == 2 and a.median_overlap == pytest.approx(0.5)
    assert (C.summarize(df)["run"] == ["a", "b"]).all()  # default by: every non-metric column but layer


def test_missing_source_is_an_error(synth_store: Any) -> None:
    with pytest.raises(SelectionError, match="did not capture"):
        C.intra_run(synth_store.runs(["all"]), sources=["k"])


def test_role_averages_per_run_and_source_in_the_runs_order(synth_store: Any) -> None:
    runs = synth_store.runs(["all"])
    sources = ["hidden_out", "attn_out"]
    df = C.snapshots_vs_references(runs, sources=sources, layers=[0])
    avg = C.role_averages(df)
    expected = []  # rows in the order the comparison lists them: run, source, role, reference
    for run in runs:
        roles = [s["role"] for s in run.snapshot_index]
        for source in sources:
            snaps, refs = raw_stack(run, "snapshots", source), raw_stack(run, "references", source)
            for role in dict.fromkeys(r for r in roles if r in ("user", "assistant")):  # first-seen order
                msgs = [i for i, r in enumerate(roles) if r == role]
                for ri, label in enumerate(run.reference_labels):  # the run's order, not alphabetical
                    cos = np.mean([np_cos(snaps[m, 0], refs[ri, 0]) for m in msgs])
                    expected.append((run.id, role, label, source, cos, len(msgs)))
    assert run.reference_labels != sorted(run.reference_labels)  # so the order is tested
    cols = ["run", "role", "reference", "source", "cosine", "n_messages"]
    got = list(avg[cols].itertuples(index=False, name=None))
    assert [g[:4] for g in got] == [e[:4] for e in expected]
    for g, e in zip(got, expected, strict=True):
        assert g[4] == pytest.approx(e[4], rel=1e-9) and g[5] == e[5]


def test_intra_run_ranks_by_value_by_default(synth_store: Any) -> None:
    run = synth_store.runs(["all"])[0]
    x = raw(run, "hidden_out")
    a, b = x[:, run.prompt_len - 1], x[:, run.n_positions - 1]
    by_value = [np_jaccard(a[i], b[i], 0.05) for i in range(len(run.layers))]
    assert by_value != [np_jaccard(a[i], b[i], 0.05, magnitude=True) for i in range(len(run.layers))]
    df = C.intra_run(run, sources=["hidden_out"], frac=0.05)
    np.testing.assert_allclose(df["jaccard"], by_value, rtol=1e-12)


def test_snapshots_vs_references_magnitude(synth_store: Any) -> None:
    run = synth_store.runs(["all"])[0]
    snaps, refs = raw_stack(run, "snapshots", "hidden_out"), raw_stack(run, "references", "hidden_out")
    by_size = C.snapshots_vs_references(run, sources=["hidden_out"], layers=[0], frac=0.05, magnitude=True)
    by_value = C.snapshots_vs_references(run, sources=["hidden_out"], layers=[0], frac=0.05)
    label_index = {label: i for i, label in enumerate(run.reference_labels)}
    for df, magnitude in ((by_size, True), (by_value, False)):
        for row in df.itertuples(index=False):
            a, b = snaps[row.message, 0], refs[label_index[row.reference], 0]
            assert row.jaccard == pytest.approx(np_jaccard(a, b, 0.05, magnitude)), (magnitude, row)
    assert (by_size["jaccard"] != by_value["jaccard"]).any()  # the flag matters on this data


def test_summarize_keeps_the_first_seen_group_order_and_skips_nan() -> None:
    # Group "b" first: its cosine is all NaN (no lowest layer), its MAE NaN at one layer.
    df = pd.DataFrame({
        "run": ["b"] * 3 + ["a"] * 3, "layer": [4, 5, 6] * 2,
        "cosine": [np.nan, np.nan, np.nan, 0.5, 0.2, 0.9], "mae": [0.3, np.nan, 0.1, 0.2, 0.6, 0.4],
        "jaccard": [0.5, 0.25, 1.0, 1.0, 0.5, 0.75],
    })  # fmt: skip
    s = C.summarize(df, by=["run"])
    assert s["run"].tolist() == ["b", "a"]  # not sorted
    b, a = s.iloc[0], s.iloc[1]
    assert pd.isna(b.most_divergent_layer) and a.most_divergent_layer == 5
    assert b.max_MAE_layer == 4 and a.max_MAE_layer == 5  # the NaN MAE is not the largest
    assert b.min_overlap_layer == 5 and a.min_overlap_layer == 5
    assert np.isnan(b.mean_MAE) and a.mean_MAE == pytest.approx(0.4)


def test_inter_run_at_snapshot_and_reference_states(synth_store: Any) -> None:
    runs = synth_store.runs(["all"])[:2]
    df = C.inter_run(runs, sources=["hidden_out"], layers=[1, 3], states=["snapshot:2", "reference:fear"], frac=0.05)
    assert len(df) == 2 * 2  # states x layers, one pair
    (ra, rb) = runs
    for row in df.itertuples(index=False):
        li = [0, 1, 2, 3].index(row.layer)
        if row.state == "snapshot:2":
            a, b = (raw_stack(r, "snapshots", "hidden_out")[2, li] for r in (ra, rb))
        else:
            a, b = (raw_stack(r, "references", "hidden_out")[r.reference_labels.index("fear"), li] for r in (ra, rb))
        assert (row.run_a, row.run_b) == (ra.id, rb.id)
        assert row.cosine == pytest.approx(np_cos(a, b), rel=1e-9) and row.mae == pytest.approx(np_mae(a, b))
        assert row.jaccard == pytest.approx(np_jaccard(a, b, 0.05))


def test_compare_states_plan_defaults_and_chosen_layers(synth_store: Any) -> None:
    run = synth_store.runs(["all"])[0]
    x = raw(run, "hidden_in")
    default = C.compare_states_plan(run, sources=["hidden_in"]).compute()  # initial vs final
    assert (default["state_a"] == "initial").all() and (default["state_b"] == "final").all()
    for row in default.itertuples(index=False):
        a, b = x[row.layer, run.prompt_len - 1], x[row.layer, run.n_positions - 1]
        assert row.cosine == pytest.approx(np_cos(a, b), rel=1e-9)
    # non-positional states on chosen layers: only those layers, each its own vectors
    df = C.compare_states(run, "snapshot:1", "reference:calm", sources=["hidden_in"], layers=[2, 3])
    snaps, refs = raw_stack(run, "snapshots", "hidden_in"), raw_stack(run, "references", "hidden_in")
    assert df["layer"].tolist() == [2, 3]
    for row in df.itertuples(index=False):
        a, b = snaps[1, row.layer], refs[run.reference_labels.index("calm"), row.layer]
        assert row.cosine == pytest.approx(np_cos(a, b), rel=1e-9)


def test_compare_states_over_runs_of_different_widths(tmp_path: Any) -> None:
    from actstore.store.store import ActStore

    from .synth import write_synthetic_run

    store = ActStore.open(tmp_path / "s.zarr", create=True)
    runs = [store.run(write_synthetic_run(store, name=f"w{w}", width=w, n_layers=2, prompt_len=4, n_steps=2,
                                          sources=("hidden_in",), seed=w)) for w in (16, 24)]  # fmt: skip
    df = C.compare_states(runs, "initial", "final", sources=["hidden_out"])
    assert df["run"].tolist() == [runs[0].id] * 2 + [runs[1].id] * 2
    for row in df.itertuples(index=False):
        r = runs[[x.id for x in runs].index(row.run)]
        x = raw(r, "hidden_out")
        assert row.cosine == pytest.approx(np_cos(x[row.layer, 3], x[row.layer, -1]), rel=1e-9)


def test_snapshots_vs_references_plan_defaults_and_runs_without_references(tmp_path: Any) -> None:
    from actstore.store.store import ActStore

    from .synth import write_synthetic_run

    store = ActStore.open(tmp_path / "s.zarr", create=True)
    with_refs = store.run(write_synthetic_run(store, width=16, n_layers=2, prompt_len=4, n_steps=2))
    rid = write_synthetic_run(store, name="norefs", width=16, n_layers=2, prompt_len=4, n_steps=2, labels=())
    g = zarr.open_group(store=store.run(rid).group.store, path=store.run(rid).group.path, mode="r+")
    del g["references"]  # as a capture without references stores it: no arrays at all
    no_refs = store.run(rid)
    df = C.snapshots_vs_references_plan([with_refs, no_refs], sources=["hidden_out"], frac=0.25).compute()
    assert set(df["run"]) == {with_refs.id}  # the run without references is left out
    snaps, refs = raw_stack(with_refs, "snapshots", "hidden_out"), raw_stack(with_refs, "references", "hidden_out")
    labels = with_refs.reference_labels
    for row in df.itertuples(index=False):  # jaccard by value unless asked
        a, b = snaps[row.message, row.layer], refs[labels.index(row.reference), row.layer]
        assert row.jaccard == pytest.approx(np_jaccard(a, b, 0.25)), row
    assert (df["jaccard"] != [np_jaccard(snaps[r.message, r.layer], refs[labels.index(r.reference), r.layer],
                                         0.25, True) for r in df.itertuples()]).any()  # fmt: skip
    with pytest.raises(
        SelectionError, match=r"^no selected run has both conversation snapshots and reference states$"
    ):
        C.snapshots_vs_references_plan([no_refs])


def _mixed_runs(tmp_path: Any) -> list[Any]:
    """Three runs in a fresh store: 4 layers with every source, 2 layers with the residual
    stream only, 4 layers with every source (the middle one limits what all three share)."""
    from actstore.store.store import ActStore

    from .synth import write_synthetic_run

    store = ActStore.open(tmp_path / "mixed.zarr", create=True)
    kw: dict[str, Any] = {"prompt_len": 4, "n_steps": 2, "width": 16}
    ids = [write_synthetic_run(store, name="big", n_layers=4, seed=1, **kw),
           write_synthetic_run(store, name="small", n_layers=2, sources=("hidden_in",), seed=2, **kw),
           write_synthetic_run(store, name="big2", n_layers=4, seed=3, **kw)]  # fmt: skip
    return [store.run(i) for i in ids]


def test_inter_run_compares_what_every_run_has(tmp_path: Any) -> None:
    runs = _mixed_runs(tmp_path)
    df = C.inter_run(runs, frac=0.25)
    assert sorted(set(df["layer"])) == [0, 1]  # the layers all three captured
    assert list(dict.fromkeys(df["source"])) == ["hidden_in", "hidden_out"]  # the sources all three serve
    assert len(df) == 3 * 2 * 2 * 2  # pairs x states x sources x layers
    for row in df.sample(6, random_state=0).itertuples(index=False):
        ra, rb = (next(r for r in runs if r.id == i) for i in (row.run_a, row.run_b))
        pos = {"initial": lambda r: r.prompt_len - 1, "final": lambda r: r.n_positions - 1}[row.state]
        a, b = raw(ra, row.source)[row.layer, pos(ra)], raw(rb, row.source)[row.layer, pos(rb)]
        assert row.cosine == pytest.approx(np_cos(a, b), rel=1e-9)
    with pytest.raises(SelectionError, match="did not capture"):
        C.inter_run(runs, sources=["attn_out"])  # asked for by name: the small run lacks it
    empty = C.inter_run([])
    assert empty.empty and list(empty.columns) == ["run_a", "run_b", "state", "source", "layer", *C.METRICS]


def test_inter_run_plan_ranks_by_value_by_default(tmp_path: Any) -> None:
    runs = _mixed_runs(tmp_path)[::2]
    df = C.inter_run_plan(runs, sources=["hidden_out"], layers=[0, 3], frac=0.25).compute()
    xa, xb = raw(runs[0], "hidden_out"), raw(runs[1], "hidden_out")
    for magnitude, check in ((False, True), (True, False)):
        want = [np_jaccard(xa[r.layer, {"initial": 3, "final": -1}[r.state]],
                           xb[r.layer, {"initial": 3, "final": -1}[r.state]], 0.25, magnitude)
                for r in df.itertuples()]  # fmt: skip
        assert (df["jaccard"].to_numpy() == pytest.approx(want)) is check


def test_inter_run_refuses_runs_without_a_common_layer_or_width(tmp_path: Any) -> None:
    from types import SimpleNamespace

    apart = [SimpleNamespace(layers=[0, 1]), SimpleNamespace(layers=[2, 3])]
    with pytest.raises(SelectionError, match=r"^the runs share no captured layer; pick runs of one model$"):
        C.inter_run_plan(apart)
    from actstore.store.store import ActStore

    from .synth import write_synthetic_run

    store = ActStore.open(tmp_path / "w.zarr", create=True)
    runs = [store.run(write_synthetic_run(store, name=f"w{w}", width=w, n_layers=2, prompt_len=4, n_steps=2,
                                          sources=("hidden_in",), seed=w)) for w in (16, 24)]  # fmt: skip
    with pytest.raises(SelectionError, match=r"^runs differ in hidden_out width \(\[16, 24\]\): compare runs of one model$"):
        C.inter_run(runs, sources=["hidden_out"])


@pytest.mark.parametrize(("cap", "blocks"), [(144, (2, 2)), (10, (1, 1, 1, 1)), (10**9, (4,))])
def test_inter_run_layer_blocks_fit_the_answer_cap(
    synth_store: Any, monkeypatch: pytest.MonkeyPatch, cap: int, blocks: tuple[int, ...]
) -> None:
    # 3 runs: 3 pairs, so one layer of the (3 metrics, pairs, layers) float64 answer is
    # 3 * 3 * 8 = 72 bytes; blocks hold as many layers as fit under the cap (at least one).
    runs = synth_store.runs(["all"])
    expected = C.inter_run(runs, sources=["hidden_out"])
    monkeypatch.setattr(C, "_CHUNK_BYTES", cap)
    plan = C.inter_run_plan(runs, sources=["hidden_out"])
    for piece in plan.pieces.values():
        assert piece.shape == (3, 3, 4) and piece.chunks[2] == blocks
    pd.testing.assert_frame_equal(plan.compute(), expected)
