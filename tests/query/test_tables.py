"""The emotion experiment's four tables against plain NumPy."""

from __future__ import annotations

from typing import Any

import dask
import numpy as np
import pytest

from actstore.query.tables import paper_tables

from .helpers import RESIDUAL, np_cos, raw, raw_stack
from .test_compare import CountingScheduler


def test_paper_tables(any_run: Any) -> None:
    run = any_run
    sched = CountingScheduler()
    with dask.config.set(scheduler=sched):
        t = paper_tables(run)
    assert sched.calls == 1  # both comparisons in one graph
    assert set(t) == {"intra_run_drift", "message_reference", "reference_source", "role_gap"}

    drift = t["intra_run_drift"].set_index("source")
    for s in RESIDUAL:
        x = raw(run, s)
        cos = np.array([np_cos(x[i, run.prompt_len - 1], x[i, -1]) for i in range(len(run.layers))])
        row = drift.loc[s]
        assert row["mean"] == pytest.approx(cos.mean()) and row["std"] == pytest.approx(cos.std())
        assert row["median"] == pytest.approx(np.median(cos)) and row["min"] == pytest.approx(cos.min())
        assert row["min_layer"] == run.layers[int(np.argmin(cos))]

    labels = run.reference_labels
    # cos[s][m, r, l]
    cos = {}
    for s in RESIDUAL:
        sn, rf = raw_stack(run, "snapshots", s), raw_stack(run, "references", s)
        cos[s] = np.array([[[np_cos(sn[m, la], rf[r, la]) for la in range(sn.shape[1])]
                            for r in range(len(rf))] for m in range(len(sn))])  # fmt: skip
    mr = t["message_reference"]
    expected = np.mean([cos[s].mean(axis=2) for s in RESIDUAL], axis=0)  # (M, R)
    np.testing.assert_allclose(mr[labels].to_numpy(), expected, rtol=1e-9)
    assert mr["best"].tolist() == [labels[i] for i in expected.argmax(axis=1)]
    assert mr["role"].tolist() == [s["role"] for s in run.snapshot_index]

    rs = t["reference_source"].set_index("reference")
    for s in RESIDUAL:
        np.testing.assert_allclose(rs.loc[labels, s].to_numpy(), cos[s].mean(axis=(0, 2)), rtol=1e-9)

    gap = t["role_gap"].set_index("source")
    roles = np.array([s["role"] for s in run.snapshot_index])
    for s in RESIDUAL:
        user, asst = cos[s][roles == "user"].mean(), cos[s][roles == "assistant"].mean()
        assert gap.loc[s, "user"] == pytest.approx(user) and gap.loc[s, "assistant"] == pytest.approx(asst)
        assert gap.loc[s, "gap"] == pytest.approx(user - asst)


def test_paper_tables_on_chosen_layers(synth_store: Any) -> None:
    run = synth_store.runs(["all"])[0]
    t = paper_tables(run, layers=[1, 2])
    assert t["intra_run_drift"]["source"].tolist() == list(RESIDUAL)  # the residual sources, in order
    labels = run.reference_labels
    sims = []
    for s in RESIDUAL:
        sn, rf = raw_stack(run, "snapshots", s)[:, 1:3], raw_stack(run, "references", s)[:, 1:3]
        sims.append([[np.mean([np_cos(sn[m, i], rf[r, i]) for i in range(2)]) for r in range(len(rf))]
                     for m in range(len(sn))])  # fmt: skip
    mr = t["message_reference"]
    np.testing.assert_allclose(mr[labels].to_numpy(), np.mean(sims, axis=0), rtol=1e-9)
    assert list(mr.columns) == ["message", "role", "preview", *labels, "best"]
    assert mr["preview"].tolist() == [f"m{k}" for k in range(len(run.snapshot_index))]  # synth's previews
    # unstack's level names ("reference", "source", "role") do not stay on the columns
    assert all(t[k].columns.name is None for k in ("message_reference", "reference_source", "role_gap"))


def test_paper_tables_of_partial_runs(tmp_path: Any) -> None:
    # No references: the drift table only. Snapshots of one role (and a snapshot saved
    # without a preview): the other role's column is NaN, and so is the gap.
    from actstore.store.store import ActStore

    from .synth import edited_run_meta, write_synthetic_run

    store = ActStore.open(tmp_path / "s.zarr", create=True)
    bare = store.run(write_synthetic_run(store, n_layers=2, prompt_len=4, n_steps=2, width=16, labels=()))
    assert set(paper_tables(bare)) == {"intra_run_drift"}

    rid = write_synthetic_run(store, n_layers=2, prompt_len=4, n_steps=2, width=16, n_snapshots=2)
    with edited_run_meta(store.location, rid) as meta:
        assert [s["role"] for s in meta["snapshots"]] == ["system", "user"]
        del meta["snapshots"][1]["content_preview"]
    run = store.run(rid)
    t = paper_tables(run)
    assert t["message_reference"]["preview"].tolist() == ["m0", ""]
    gap = t["role_gap"]
    assert list(gap.columns) == ["source", "user", "assistant", "gap"]
    assert gap["source"].tolist() == list(RESIDUAL)
    for s in RESIDUAL:
        sn, rf = raw_stack(run, "snapshots", s), raw_stack(run, "references", s)
        user = np.mean([np_cos(sn[1, la], rf[r, la]) for r in range(len(rf)) for la in range(2)])
        row = gap[gap.source == s].iloc[0]
        assert row["user"] == pytest.approx(user, rel=1e-9)
        assert np.isnan(row["assistant"]) and np.isnan(row["gap"])

    with edited_run_meta(store.location, rid) as meta:
        meta["snapshots"][1]["role"] = "assistant"  # now the other role only
    gap = paper_tables(store.run(rid))["role_gap"]
    assert gap["user"].isna().all() and gap["assistant"].notna().all() and gap["gap"].isna().all()
    system_only = write_synthetic_run(store, n_layers=2, prompt_len=4, n_steps=2, width=16, n_snapshots=1)
    gap = paper_tables(store.run(system_only))["role_gap"]  # no user or assistant snapshot
    assert list(gap.columns) == ["source", "user", "assistant", "gap"] and gap.empty


def test_drift_table_is_per_source_over_every_row(synth_store: Any) -> None:
    from actstore.query.compare import intra_run
    from actstore.query.tables import drift_table

    runs = synth_store.runs(["all"])[:2]
    table = drift_table(intra_run(runs, sources=["hidden_out", "attn_out"]))
    assert table["source"].tolist() == ["hidden_out", "attn_out"]  # one row per source, runs pooled
    for s in ("hidden_out", "attn_out"):
        cos = [np_cos(x[i, r.prompt_len - 1], x[i, -1]) for r in runs for x in [raw(r, s)] for i in range(len(r.layers))]
        row = table[table.source == s].iloc[0]
        assert row["mean"] == pytest.approx(np.mean(cos), rel=1e-9) and row["min"] == pytest.approx(min(cos))


def test_a_message_with_no_direction_has_no_best_reference(tmp_path: Any) -> None:
    """A snapshot whose vectors are all zero has no cosine with any reference (NaN): its
    row's best is None, not the first label and not pandas' all-NA error; the other rows'
    best are NumPy's argmax of vectors read straight from the store."""
    from actstore.store.store import ActStore

    from .synth import raw_run_group, write_synthetic_run

    store = ActStore.open(tmp_path / "s.zarr", create=True)
    rid = write_synthetic_run(store, n_layers=3, prompt_len=4, n_steps=2, width=16, n_snapshots=3,
                              labels=("joy", "fear", "calm"), store_dtype="float32")  # fmt: skip
    group = raw_run_group(store.location, rid)
    for s in RESIDUAL:
        snaps = group[f"snapshots/{s}"]
        snaps[1] = np.zeros(snaps.shape[1:], dtype=snaps.dtype)
    run = store.run(rid)
    labels = run.reference_labels
    mr = paper_tables(run)["message_reference"]
    assert mr.loc[1, labels].isna().all()
    expected = []
    for m in (0, 2):
        cos = np.mean([[np.mean([np_cos(raw_stack(run, "snapshots", s)[m, la], raw_stack(run, "references", s)[r, la])
                                 for la in range(3)]) for r in range(len(labels))] for s in RESIDUAL], axis=0)
        expected.append(labels[int(np.argmax(cos))])
    assert mr["best"].tolist() == [expected[0], None, expected[1]]
