"""The report's numbers come from the query layer: the plan-based pieces equal the
query functions they stand in for. Which runs it compares with each other: only runs of
one model (same id and hidden size), with a note whenever the runs come from more than one."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pytest

from actstore.capture.runner import capture_run
from actstore.query.analyses import layer_discrimination
from actstore.report.frames import dense
from actstore.report.gather import gather, model_groups
from actstore.store.store import ActStore

from .conftest import MESSAGES_B, loaded_tiny, scenario

NOTE = "The runs come from more than one model; only runs of the same model are compared with each other."


def test_discrimination_equals_layer_discrimination(two_run_store: Any) -> None:
    data = gather(two_run_store.runs(["all"]))
    for rr in data.runs:
        expected = layer_discrimination(rr.run)
        pd.testing.assert_frame_equal(rr.discrimination, expected, check_exact=False, rtol=1e-10)


def test_discrimination_of_a_run_with_references_but_no_snapshots(tmp_path: Any) -> None:
    """No snapshots: no snapshot x reference cube, so ``within`` (and Fisher) is NaN, and the
    report's table still equals ``layer_discrimination``'s."""
    from query.synth import write_synthetic_run

    store = ActStore.open(tmp_path / "s.zarr", create=True)
    write_synthetic_run(store, n_layers=3, prompt_len=8, n_steps=2, width=16, n_snapshots=0,
                        labels=("joy", "fear", "anger"))  # fmt: skip
    [rr] = gather(store.runs(["all"])).runs
    assert rr.cube is None and rr.discrimination is not None
    assert rr.discrimination["within"].isna().all() and rr.discrimination["separation"].notna().all()
    pd.testing.assert_frame_equal(rr.discrimination, layer_discrimination(rr.run), check_exact=False, rtol=1e-10)


def test_gather_shapes(two_run_store: Any) -> None:
    runs = two_run_store.runs(["all"])
    data = gather(runs)
    assert [r.label for r in data.runs] == ["R1", "R2"]
    assert len(data.intra_summary) == 2 * 4 and len(data.inter_summary) == 2 * 4
    for rr in data.runs:
        assert rr.svr is not None and rr.cube is not None and rr.message_reference is not None
        assert rr.discrimination is not None and rr.cross is not None
    assert len(model_groups(runs)) == 1


def test_dense() -> None:
    df = pd.DataFrame({"a": ["x", "y", "x", "z"], "b": [1, 1, 2, 2], "v": [1.0, 2.0, 3.0, 4.0]})
    cube = dense(df, [("a", ["x", "y"]), ("b", [1, 2])], ["v"])
    np.testing.assert_array_equal(cube[0], [[1.0, 3.0], [2.0, np.nan]])


def test_cube_reductions_equal_the_query_tables(two_run_store: Any) -> None:
    from actstore.query.compare import role_averages
    from actstore.query.tables import reference_tables

    for rr in gather(two_run_store.runs(["all"])).runs:
        assert rr.svr is not None and rr.cube is not None
        expected = reference_tables(rr.svr, rr.run)["message_reference"]
        pd.testing.assert_frame_equal(rr.message_reference, expected, check_dtype=False, rtol=1e-12)
        roles = role_averages(rr.svr)
        c = rr.cube
        for role in ("user", "assistant"):
            mean = c.role_mean(role)
            assert mean is not None
            sub = roles[roles["role"] == role]
            for metric_i, metric in enumerate(("cosine", "mae", "jaccard")):
                for row in sub.itertuples(index=False):
                    got = mean[
                        metric_i,
                        c.labels.index(row.reference),
                        c.sources.index(row.source),
                        c.layers.index(row.layer),
                    ]
                    np.testing.assert_allclose(got, getattr(row, metric), rtol=1e-12)


def test_report_reads_each_state_once(two_run_store: Any) -> None:
    """The intra-run and inter-run plans name the same reads, so one compute reads each
    stored array of a run once."""
    from actstore.query.compare import compare_states_plan, inter_run_plan

    runs = two_run_store.runs(["all"])

    def reads(plan: Any) -> set[str]:
        keys = {
            k[0] if isinstance(k, tuple) else k
            for v in plan.pieces.values()
            for k in dict(v.__dask_graph__())
        }
        return {str(k) for k in keys if str(k).startswith("actstore-sel-")}

    intra, inter = reads(compare_states_plan(runs, "initial", "final")), reads(inter_run_plan(runs))
    assert inter and inter <= intra


@pytest.fixture(scope="module")
def gpt2_run(tmp_path_factory: Any) -> Any:
    """A run of another model (tiny gpt2), in a store of its own."""
    store = ActStore.open(tmp_path_factory.mktemp("gpt2") / "store.zarr", create=True)
    sc = scenario("mood_gpt2", MESSAGES_B)
    return store.run(capture_run(sc, store, loaded_tiny("gpt2"), progress=False).run_id)


def _pairs(data: Any) -> set[frozenset[str]]:
    return {frozenset(p) for p in zip(data.inter["run_a"], data.inter["run_b"], strict=True)}


def test_runs_of_one_model_are_paired_without_a_note(two_run_store: ActStore) -> None:
    a, b = (two_run_store.run(r) for r in two_run_store.run_ids()[:2])
    both = gather([a, b], cross_layer=False)
    assert both.notes == [] and _pairs(both) == {frozenset((a.id, b.id))}
    one = gather([a], cross_layer=False)
    assert one.notes == [] and len(one.inter) == 0


def test_a_run_of_another_model_is_noted_and_paired_with_none(two_run_store: ActStore, gpt2_run: Any) -> None:
    a, b = (two_run_store.run(r) for r in two_run_store.run_ids()[:2])
    assert a.meta["model"]["id"] != gpt2_run.meta["model"]["id"]
    # two llama runs and one gpt2 run: the llama pair is compared, and the page says why
    # the gpt2 run is in no pair
    data = gather([a, b, gpt2_run], cross_layer=False)
    assert data.notes == [NOTE] and _pairs(data) == {frozenset((a.id, b.id))}
    # one run of each model: no pair at all
    data = gather([a, gpt2_run], cross_layer=False)
    assert data.notes == [NOTE] and len(data.inter) == 0
