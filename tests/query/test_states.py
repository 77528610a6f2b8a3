"""State selection: parsing, positions, and vectors equal to direct Zarr reads."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import zarr

from actstore.errors import SelectionError
from actstore.query import states as S

from .helpers import raw, raw_stack
from .synth import edited_run_meta, write_synthetic_run


def test_parse_states() -> None:
    assert S.parse_state("final") == S.State("final")
    assert str(S.parse_state("step:-1")) == "step:-1"
    assert S.parse_state_pair("step:0:final") == (S.State("step", "0"), S.State("final"))
    assert S.parse_state_pair("snapshot:3:reference:joy") == (
        S.State("snapshot", "3"),
        S.State("reference", "joy"),
    )
    assert S.parse_state_pair("initial:pos:7") == (S.State("initial"), S.State("pos", "7"))
    for bad in ("foo", "step", "step:x", "final:final:final", "", "reference:"):
        with pytest.raises(SelectionError):
            S.parse_state_pair(bad) if bad.count(":") >= 2 else S.parse_state(bad)
    with pytest.raises(SelectionError):
        S.parse_state_pair("final")


def test_state_positions(any_run: Any) -> None:
    run = any_run
    P, T = run.prompt_len, run.n_positions
    assert S.state_position(run, "initial") == P - 1 == S.state_position(run, "step:0")
    assert S.state_position(run, "final") == T - 1 == S.state_position(run, "step:-1")
    if run.n_steps > 1:
        assert S.state_position(run, "step:1") == P
    assert S.state_position(run, "pos:-1") == T - 1
    for bad in ("step:999", "pos:100000"):
        with pytest.raises(SelectionError):
            S.state_position(run, bad)


def test_select_equals_direct_zarr_reads(any_run: Any) -> None:
    run = any_run
    positions = [0, run.prefill_position, run.final_position]
    layers = run.layers[-2:]
    li = [run.layers.index(la) for la in layers]
    for source in S.vector_sources(run):
        got = S.select(run, source, positions, layers).compute()
        np.testing.assert_array_equal(
            got.astype(np.float64), raw(run, source)[li][:, positions], err_msg=source
        )
        # and the reader's own per-chunk path serves the same numbers
        np.testing.assert_array_equal(got, run.array(source)[li][:, positions].compute(), err_msg=source)
    for source in ("embeddings", "logits"):
        if source in run.sources:
            got = S.select(run, source, positions).compute()
            np.testing.assert_array_equal(got.astype(np.float64), raw(run, source)[positions])


def test_state_vectors_snapshots_and_references(any_run: Any) -> None:
    run = any_run
    label = run.reference_labels[-1]
    for source in ("hidden_out", "attn_out"):
        snaps, refs = raw_stack(run, "snapshots", source), raw_stack(run, "references", source)
        np.testing.assert_array_equal(S.state_vectors(run, "snapshot:1", source).compute(), snaps[1])
        np.testing.assert_array_equal(S.state_vectors(run, "snapshot:-1", source).compute(), snaps[-1])
        np.testing.assert_array_equal(S.state_vectors(run, f"reference:{label}", source, run.layers[:1]).compute(),
                                      refs[-1][:1])  # fmt: skip
        assert S.snapshot_stack(run, source).shape == snaps.shape
        final = S.state_vectors(run, "final", source, [run.layers[0]]).compute()
        np.testing.assert_array_equal(final, raw(run, source)[:1, run.final_position])
    with pytest.raises(SelectionError, match="no reference"):
        S.state_vectors(run, "reference:nope", "hidden_out")
    with pytest.raises(SelectionError):
        S.state_vectors(run, "snapshot:99", "hidden_out")
    with pytest.raises(SelectionError, match=r"^snapshots keep only hidden_in, hidden_out, attn_out, mlp_down_out"):
        S.state_vectors(run, "snapshot:0", "q")
    with pytest.raises(SelectionError, match=r"^references keep only hidden_in, hidden_out, attn_out, mlp_down_out"):
        S.state_vectors(run, f"reference:{label}", "q")


def test_selection_errors(any_run: Any) -> None:
    run = any_run
    with pytest.raises(SelectionError, match="did not capture layer"):
        S.state_vectors(run, "final", "hidden_out", [10_000])
    with pytest.raises(SelectionError):
        S.select(run, "attn_weights", [0])
    with pytest.raises(ValueError):
        S.select(run, "nonsense", [0])


def test_bfloat16_runs_are_widened(tmp_path: Any) -> None:
    from actstore.store.store import ActStore

    store = ActStore.open(tmp_path / "bf.zarr", create=True)
    write_synthetic_run(store, store_dtype="bfloat16", n_layers=2, width=32)
    run = store.run("latest")
    got = S.select(run, "hidden_out", [1, 5]).compute()
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, run.array("hidden_out")[:, [1, 5]].compute())
    assert np.isfinite(got).all() and got.std() > 0.5


def test_as_xarray(any_run: Any) -> None:
    run = any_run
    x = S.as_xarray(run, "hidden_out")
    assert x.dims == ("layer", "position", "width")
    assert list(x.layer.values) == run.layers
    assert int(x.step[-1]) == run.n_steps - 1 and int(x.step[run.prefill_position]) == 0
    v = x.sel(layer=run.layers[-1]).isel(position=-1).values
    np.testing.assert_array_equal(v.astype(np.float64), raw(run, "hidden_out")[-1, -1])


@pytest.mark.parametrize("store_dtype", ["float16", "bfloat16"])
def test_read_region_is_the_stored_block(tmp_path: Any, store_dtype: str) -> None:
    from actstore.store.store import ActStore

    store = ActStore.open(tmp_path / "s.zarr", create=True)
    run = store.run(write_synthetic_run(store, n_layers=3, prompt_len=6, n_steps=3, width=16,
                                        sources=("hidden_in", "q"), store_dtype=store_dtype))  # fmt: skip
    stored = zarr.open_group(store=run.group.store, path=run.group.path, mode="r")["acts/q"][...]
    if store_dtype == "bfloat16":  # uint16 bits: the top half of a float32
        assert stored.dtype == np.uint16
        stored = (stored.astype(np.uint32) << 16).view(np.float32)
    got = S.read_region(run, "q", ([0, 2], slice(1, 5), [3, 7, 8]))
    assert got.dtype == stored.dtype and got.dtype != np.uint16
    np.testing.assert_array_equal(got, stored[[0, 2]][:, 1:5][:, :, [3, 7, 8]])
    with pytest.raises(SelectionError, match="has no stored array for 'attn_out'"):
        S.read_region(run, "attn_out", (0, slice(None), slice(None)))


def test_state_pair_errors_name_the_text_and_what_is_wrong() -> None:
    cases = {
        "reference:x:reference:y:reference:z": r"'reference:x:reference:y:reference:z' reads two ways "
        r"\(reference:x vs reference:y:reference:z or reference:x:reference:y vs reference:z\)",
        "foo:final": r"^'foo:final': unknown state 'foo'",  # the first state is wrong
        "final:foo": r"^'final:foo': unknown state 'foo'",  # the second one is
        "final:step:x": r"^'final:step:x': 'x' is not a whole number",
        "final:": r"^'final:': missing state",
    }
    for text, msg in cases.items():
        with pytest.raises(SelectionError, match=msg):
            S.parse_state_pair(text)


def test_state_names_and_selection_messages(synth_store: Any) -> None:
    run = synth_store.runs(["all"])[0]
    assert str(S.State("final")) == "final" and str(S.State("snapshot", "2")) == "snapshot:2"
    with pytest.raises(SelectionError, match=rf"^run {run.id} has steps 0\.\.{run.n_steps - 1}, not 99$"):
        S.step_index(run, 99)
    with pytest.raises(SelectionError, match=rf"^run {run.id} has no reference 'nope'; it has: joy, fear, calm$"):
        S.state_vectors(run, "reference:nope", "hidden_out")
    with pytest.raises(SelectionError, match=rf"^run {run.id} has snapshots 0\.\.4, not 5$"):
        S.snapshot_row(run, "5", 5)
    with pytest.raises(SelectionError, match=r"^'snapshot:x': 'x' is not a whole number$"):
        S.snapshot_row(run, "x", 5)
    with pytest.raises(SelectionError, match=r"^'snapshot:': '' is not a whole number$"):
        S.state_vectors(run, S.State("snapshot"), "hidden_out")  # a snapshot state without its row


def test_generated_reply_snapshot(tmp_path: Any) -> None:
    from actstore.store.store import ActStore

    store = ActStore.open(tmp_path / "s.zarr", create=True)
    rid = write_synthetic_run(store, n_layers=2, prompt_len=4, n_steps=2, width=8, n_snapshots=4, labels=("a",))
    run = store.run(rid)
    with pytest.raises(SelectionError, match=rf"^run {rid} has no generated-reply snapshot \(.*\); its snapshots are 0\.\.3$"):
        S.state_vectors(run, "snapshot:generated", "hidden_out")
    with edited_run_meta(store.location, rid) as meta:
        meta["snapshots"][2]["generated"] = True  # the row the index marks, not the last one
    run = store.run(rid)
    assert S.snapshot_row(run, "generated", 4) == 2
    np.testing.assert_array_equal(
        S.state_vectors(run, "snapshot:generated", "hidden_out").compute().astype(np.float64),
        raw_stack(run, "snapshots", "hidden_out")[2],
    )


def test_global_sources_and_attention_as_xarray(tiny: Any) -> None:
    run = tiny.run
    g = zarr.open_group(store=run.group.store, path=run.group.path, mode="r")
    steps = np.asarray(g["position_step"][...])  # the step of each position, as stored
    for source in ("embeddings", "logits"):
        stored = np.asarray(g[f"acts/{source}"][...], dtype=np.float64)  # (T, W)
        v = S.state_vectors(run, "final", source).compute()  # no layer axis: one vector
        np.testing.assert_array_equal(v.astype(np.float64), stored[run.final_position])
        x = S.as_xarray(run, source)
        assert x.dims == ("position", "width") and x.name == source and x.attrs == {"run": run.id}
        assert list(x.position.values) == list(range(run.n_positions))
        assert x.step.dims == ("position",) and x.step.dtype == np.int64
        np.testing.assert_array_equal(x.step.values, steps)
        np.testing.assert_array_equal(x.values.astype(np.float64), stored)
    att = S.as_xarray(run, "attn_weights")
    assert att.dims == ("layer", "head", "query", "key") and att.name == "attn_weights"
    assert list(att.layer.values) == run.layers and att.attrs == {"run": run.id}
    assert list(att.coords["query"].values) == list(range(run.n_positions)) == list(att.coords["key"].values)
    assert att.step.dims == ("query",) and int(att.step[-1]) == run.n_steps - 1
    np.testing.assert_array_equal(att.step.values, steps)
    np.testing.assert_array_equal(att.sel(layer=run.layers[0]).values, g["acts/attn_weights"][0])
