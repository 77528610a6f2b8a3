"""``actstore materialize``: the train layout holds each run's values bit for bit, read
back here straight from Zarr (not through actstore's readers), with the run's rows and
normalisation statistics computed with plain NumPy."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from actstore.cli import main
from actstore.store import layout, shard_read
from actstore.store.materialize import materialize
from actstore.store.store import ActStore
from actstore.store.train_read import TrainLayout
from query.synth import write_synthetic_run
from train.helpers import folder


def _raw_run(location: Path, run_id: str, path: str) -> np.ndarray:
    return np.asarray(zarr.open_array(store=str(location), path=f"runs/{run_id}/{path}", mode="r")[...])


def _raw_segment(location: Path, name: str, segment: str, path: str) -> np.ndarray:
    where = folder(location, name, segment).relative_to(location).as_posix()
    return np.asarray(zarr.open_array(store=str(location), path=f"{where}/{path}", mode="r")[...])


@pytest.mark.parametrize(("store_dtype", "direct"), [("float16", True), ("bfloat16", True), ("float16", False)])
def test_values_are_the_runs_bits(tmp_path: Path, store_dtype: str, direct: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """``direct``: the shards decoded by store/shard_read.py, as for every run written by
    capture; otherwise zarr's own reads, which serve any chain that reader does not know."""
    if not direct:
        monkeypatch.setattr(shard_read, "read_layers", lambda *a: None)
    loc = tmp_path / "s.zarr"
    store = ActStore.open(loc, create=True)
    # prompt_len 300 and step_chunk 7: positions span several shards' worth of blocks
    ids = [write_synthetic_run(store, name=f"r{i}", n_layers=4, prompt_len=150 + 60 * i, n_steps=4, width=24,
                               seed=i, store_dtype=store_dtype, sources=("hidden_in", "mlp_act"))
           for i in range(2)]  # fmt: skip
    res = materialize(store, ["all"], "lay", ["hidden_out", "hidden_in", "mlp_act"], "1,3", chunk_rows=32)
    assert sorted(res.written) == sorted(ids) and res.rows == sum(153 + 60 * i for i in range(2))
    for run_id in ids:
        residual = _raw_run(loc, run_id, "acts/residual")  # boundaries 0..4: hidden_out of l is l + 1
        mlp_act = _raw_run(loc, run_id, "acts/mlp_act")
        tokens = _raw_run(loc, run_id, "tokens")
        want = {"hidden_out.1": residual[2], "hidden_out.3": residual[4], "hidden_in.1": residual[1],
                "hidden_in.3": residual[3], "mlp_act.1": mlp_act[1], "mlp_act.3": mlp_act[3]}  # fmt: skip
        for site, values in want.items():
            got = _raw_segment(loc, "lay", run_id, f"sites/{site}")
            assert got.dtype == values.dtype and got.dtype == (np.uint16 if store_dtype == "bfloat16" else np.float16)
            assert np.array_equal(got.view(np.uint16), values.view(np.uint16)), site  # bit for bit
        assert np.array_equal(_raw_segment(loc, "lay", run_id, "rows/token_ids"), tokens)
        assert np.array_equal(_raw_segment(loc, "lay", run_id, "rows/position"), np.arange(len(tokens)))
        assert not _raw_segment(loc, "lay", run_id, "rows/sequence_index").any()
    # normalisation statistics: plain NumPy over every row of both runs
    lay = TrainLayout.open(ActStore.open(loc), "lay")
    rows = np.concatenate([_raw_run(loc, i, "acts/residual")[2] for i in ids])
    x = (rows.view(np.uint16).astype(np.uint32) << 16).view(np.float32) if store_dtype == "bfloat16" else rows
    x = x.astype(np.float64)
    stats = lay.stats(("hidden_out", 1))
    assert stats.count == len(x)
    np.testing.assert_allclose(stats.mean, x.mean(0), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(stats.std, x.std(0), rtol=1e-6)
    np.testing.assert_allclose(stats.mean_norm, np.linalg.norm(x, axis=1).mean(), rtol=1e-9)
    np.testing.assert_allclose(stats.rms_norm, np.sqrt((x**2).sum(1).mean()), rtol=1e-9)


def test_the_direct_shard_reader_serves_a_written_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The direct reader answers (not None: it is the path materialize takes) with zarr's
    values, over position ranges that start and stop inside inner chunks and shards, one
    shard or several (decoded in threads)."""
    monkeypatch.setattr(layout, "SHARD_BUDGET", 1)  # shards of MIN_BLOCK positions
    monkeypatch.setattr(layout, "MIN_BLOCK", 64)
    loc = tmp_path / "s.zarr"
    store = ActStore.open(loc, create=True)
    run_id = write_synthetic_run(store, name="r", n_layers=5, prompt_len=300, n_steps=3, width=24, seed=3)
    run = store.run(run_id)
    assert run.group["acts/residual"].shards[1] == 64 and run.group["acts/residual"].chunks[1] == 32
    residual = _raw_run(loc, run_id, "acts/residual")
    n = residual.shape[1]
    for indices, start, stop in (([0, 5], 0, n), ([2], 1, n - 1), ([1, 3, 4], 37, 211), ([0, 3], 70, 90),
                                 ([4], n - 1, n)):  # fmt: skip
        got = shard_read.read_layers(run, "acts/residual", indices, start, stop)
        assert got is not None, (indices, start, stop)
        assert np.array_equal(got.view(np.uint16), residual[indices, start:stop].view(np.uint16))


def test_rerun_skips_committed_segments_and_adds_new_runs(tmp_path: Path) -> None:
    loc = tmp_path / "s.zarr"
    store = ActStore.open(loc, create=True)
    first = write_synthetic_run(store, name="a", n_layers=2, prompt_len=40, n_steps=2, width=8)
    materialize(store, ["all"], "lay", "hidden_out", [0])
    marker = loc / "layouts/lay/committed" / f"{first}.json"
    before = marker.stat().st_mtime_ns
    second = write_synthetic_run(store, name="b", n_layers=2, prompt_len=30, n_steps=2, width=8, seed=1)
    res = materialize(store, ["all"], "lay", "hidden_out", [0])
    assert res.skipped == [first] and res.written == [second]
    assert marker.stat().st_mtime_ns == before  # a committed segment is never rewritten
    lay = TrainLayout.open(ActStore.open(loc), "lay")
    assert lay.n_rows == 41 + 31
    # each segment names the run it holds, as its commit marker (plain JSON) records it
    assert [seg.source_run for seg in lay.segments] == [first, second]
    assert json.loads(marker.read_text())["source_run"] == first


def test_a_conversation_runs_rows_have_a_corpus_runs_dtypes(tmp_path: Path) -> None:
    """A conversation run has no rows group: its rows are made from its tokens, with the
    dtypes a corpus run stores (rows.py): int32 token ids and positions, int64 sequences."""
    from actstore.store.rows import run_rows

    store = ActStore.open(tmp_path / "s.zarr", create=True)
    run_id = write_synthetic_run(store, n_layers=2, prompt_len=12, n_steps=2, width=8)
    rows = run_rows(store.run(run_id))
    tokens = _raw_run(tmp_path / "s.zarr", run_id, "tokens")
    assert np.array_equal(rows.token_ids, tokens) and rows.token_ids.dtype == np.int32
    assert rows.position.dtype == np.int32 and np.array_equal(rows.position, np.arange(len(tokens)))
    assert rows.sequence_index.dtype == np.int64 and not rows.sequence_index.any()


def test_cli_materialize_and_its_errors(tmp_path: Path) -> None:
    loc = tmp_path / "s.zarr"
    store = ActStore.open(loc, create=True)
    write_synthetic_run(store, name="a", n_layers=3, prompt_len=40, n_steps=2, width=8)
    run = CliRunner().invoke(main, ["materialize", "all", "--store", str(loc), "--name", "lay",
                                    "--source", "hidden_out", "--layers", "0,2", "-q"])  # fmt: skip
    assert run.exit_code == 0, run.output
    assert "1 segment(s) written, 41 rows" in run.output
    assert TrainLayout.open(ActStore.open(loc), "lay").sites == [("hidden_out", 0), ("hidden_out", 2)]
    bad = {
        ("--layers", "7"): "did not capture layer(s) [7]",
        ("--layers", "x"): "--layers 'x'",
        ("--source", "attn_weights", "--layers", "0"): "per-layer vector sources",
        ("--source", "logits", "--layers", "0"): "per-layer vector sources",
        ("--source", "mlp_gate", "--layers", "0"): "did not capture 'mlp_gate'",
    }
    for args, message in bad.items():
        opts = list(args) if "--layers" in args else [*args, "--layers", "0"]
        res = CliRunner().invoke(main, ["materialize", "all", "--store", str(loc), "--name", "other", *opts, "-q"])
        assert res.exit_code == 2, (args, res.output)
        assert message in res.output and res.output.startswith("error: ") and res.output.count("\n") == 1
    # the sources it offers instead are the per-layer vector sources, attention weights not among them
    res = CliRunner().invoke(main, ["materialize", "all", "--store", str(loc), "--name", "other", "--source",
                                    "logits", "--layers", "0", "-q"])  # fmt: skip
    offered = res.output.split("(one of ", 1)[1].split(")")[0].split(", ")
    assert offered == ["hidden_in", "hidden_out", "q", "k", "v", "attn_out", "mlp_gate", "mlp_up", "mlp_act",
                       "mlp_down_in", "mlp_down_out"]  # fmt: skip
    assert not (loc / "layouts/other").exists()  # nothing half-written
    res = CliRunner().invoke(main, ["materialize", "all", "--store", str(loc), "--name", "lay",
                                    "--source", "hidden_out", "--layers", "1", "-q"])  # fmt: skip
    assert res.exit_code == 2 and "already holds hidden_out.0, hidden_out.2" in res.output


def test_layers_are_a_list_ranges_or_both() -> None:
    from actstore.errors import SelectionError
    from actstore.store.materialize import parse_layers

    assert parse_layers("8,16") == [8, 16]
    assert parse_layers("4-7") == [4, 5, 6, 7]
    assert parse_layers(" 1-2, 9 ,0-0") == [1, 2, 9, 0]
    for bad in ("x", "4-", "a-b", "1,,x"):
        with pytest.raises(SelectionError, match="use a list of layers like 8,16 or a range like 4-7"):
            parse_layers(bad)
    with pytest.raises(SelectionError, match="name at least one layer"):
        parse_layers(" , ")


def test_a_derived_source_is_the_product_of_its_stored_parts(tmp_path: Path) -> None:
    """A gated MLP's ``mlp_down_in`` is not stored: the reader serves ``mlp_act * mlp_up``.
    Its site in a layout holds that product, computed here with NumPy from the two raw
    arrays, at the site's own width (24, unlike the run's 32 positions)."""
    from query.synth import edited_run_meta

    loc = tmp_path / "s.zarr"
    store = ActStore.open(loc, create=True)
    rid = write_synthetic_run(store, n_layers=2, prompt_len=30, n_steps=3, width=24, store_dtype="float32",
                              sources=("mlp_act", "mlp_up"))  # fmt: skip
    with edited_run_meta(loc, rid) as meta:
        assert "mlp_down_in" not in meta["sources"]
        meta["sources"] = [*meta["sources"], "mlp_down_in"]  # served, derived from the two
    materialize(ActStore.open(loc), ["all"], "lay", ["mlp_down_in"], "1", chunk_rows=8)
    got = _raw_segment(loc, "lay", rid, "sites/mlp_down_in.1")
    want = _raw_run(loc, rid, "acts/mlp_act")[1] * _raw_run(loc, rid, "acts/mlp_up")[1]
    assert got.shape == want.shape == (32, 24) and got.dtype == np.float32
    np.testing.assert_array_equal(got, want)
