"""``export hf-dataset``: the bits of the store, in SAELens's cached-activation layout.

Expected values are read straight from Zarr (``acts/residual``, ``acts/k``,
``acts/embeddings``, ``tokens``; bfloat16 bits widened with plain NumPy) and cut into
windows with plain Python, never through actstore's readers. The layout expected is
what SAELens's ``CacheActivationsRunner`` writes: ``Array2D((context, d), dtype)`` per
hook and ``token_ids`` as ``Sequence(int32, length=context)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from actstore.errors import SelectionError, StoreError
from actstore.store import hf_dataset
from actstore.store.hf_dataset import export_hf_dataset
from actstore.store.rows import Rows

HOOKS = ["blocks.1.hook_resid_post", "blocks.2.attn.hook_k", "hook_embed"]


def _zarr(run: Any) -> zarr.Group:
    return zarr.open_group(store=run.group.store, path=run.group.path, mode="r")


def _widen(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _stored(run: Any) -> dict[str, np.ndarray]:
    """The three hooks' (T, d) arrays and the tokens, from Zarr directly."""
    g = _zarr(run)
    bounds = run.meta["residual_boundaries"]
    vals = {
        "blocks.1.hook_resid_post": g["acts/residual"][bounds.index(2)],  # leaving layer 1
        "blocks.2.attn.hook_k": g["acts/k"][run.meta["layers"].index(2)],
        "hook_embed": g["acts/embeddings"][...],
    }
    if run.meta["store_dtype"] == "bfloat16":
        vals = {k: _widen(v) for k, v in vals.items()}
    vals["token_ids"] = g["tokens"][...]
    return vals


def _load(path: Path) -> Any:
    ds = datasets.load_from_disk(str(path))
    ds.set_format("numpy")
    return ds


@pytest.mark.parametrize("key", ["f16", "bf16", "llama"])
def test_export_is_the_stored_bits(exchange_store: dict[str, Any], tmp_path: Path, key: str) -> None:
    run = exchange_store[key].run
    context = 7
    out = export_hf_dataset(run, tmp_path / "ds", HOOKS, context, quiet=True)
    stored = _stored(run)
    n = len(stored["token_ids"]) // context  # one sequence; the remainder is left out
    assert n >= 3 and len(stored["token_ids"]) % context  # the remainder case is exercised
    ds = datasets.load_from_disk(str(out))
    assert len(ds) == n
    table = ds.data.table  # Arrow storage: the dtype actually written
    want = {"f16": "halffloat", "bf16": "float", "llama": "float"}[key]
    for hook in HOOKS:
        assert str(table.column(hook).type.storage_type) == f"list<item: list<item: {want}>>"
    for w in range(n):
        rows = slice(w * context, (w + 1) * context)
        for hook in HOOKS:
            cell = np.asarray(table.column(hook)[w].as_py(), dtype=stored[hook].dtype)
            np.testing.assert_array_equal(
                cell.view(np.uint8), stored[hook][rows].view(np.uint8), err_msg=hook
            )
        np.testing.assert_array_equal(table.column("token_ids")[w].as_py(), stored["token_ids"][rows])
        assert table.column("position")[w].as_py() == w * context
    assert set(table.column("run").to_pylist()) == {run.id}


def test_features_are_what_saelens_reads(exchange_store: dict[str, Any], tmp_path: Path) -> None:
    run = exchange_store["f16"].run
    ds = datasets.load_from_disk(str(export_hf_dataset(run, tmp_path / "ds", HOOKS, 5, quiet=True)))
    f = ds.features
    assert isinstance(f["blocks.1.hook_resid_post"], datasets.Array2D)
    assert f["blocks.1.hook_resid_post"].shape == (5, run.meta["model"]["arch"]["hidden_size"])
    assert f["blocks.1.hook_resid_post"].dtype == "float16"
    arch = run.meta["model"]["arch"]
    assert f["blocks.2.attn.hook_k"].shape == (5, arch["num_key_value_heads"] * arch["head_dim"])
    assert isinstance(f["token_ids"], datasets.Sequence | datasets.List)
    assert f["token_ids"].length == 5 and f["token_ids"].feature.dtype == "int32"
    ds.set_format("numpy", columns=["blocks.1.hook_resid_post", "token_ids"])
    batch = ds[0:2]
    assert batch["blocks.1.hook_resid_post"].shape == (2, 5, arch["hidden_size"])
    assert batch["token_ids"].shape == (2, 5)


def test_windows_stay_inside_sequences(exchange_store: dict[str, Any], tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """A corpus unit's rows: three sequences back to back (10, 3 and the rest tokens); a
    window never spans two, and each sequence's remainder is left out."""
    run = exchange_store["f16"].run
    stored = _stored(run)
    t = len(stored["token_ids"])
    lengths = [10, 3, t - 13]
    seq = np.repeat(np.array([4, 7, 9], dtype=np.int64), lengths)
    # the third sequence's kept tokens start at its position 3, right after the second's last
    # position (2): only its sequence_index tells them apart
    pos = np.concatenate([np.arange(n, dtype=np.int32) + (3 if i == 2 else 0) for i, n in enumerate(lengths)])
    rows = Rows(token_ids=stored["token_ids"].astype(np.int32), sequence_index=seq, position=pos)
    monkeypatch.setattr(hf_dataset, "run_rows", lambda _run: rows)
    context = 4
    ds = _load(export_hf_dataset(run, tmp_path / "ds", HOOKS[:1], context, quiet=True))
    expected_starts = []  # plain Python: sequence by sequence
    start = 0
    for n in lengths:
        expected_starts += [start + k * context for k in range(n // context)]
        start += n
    assert len(ds) == len(expected_starts)
    assert list(ds["sequence_index"]) == [int(seq[s]) for s in expected_starts]
    assert list(ds["position"]) == [int(pos[s]) for s in expected_starts]
    for w, s in enumerate(expected_starts):
        np.testing.assert_array_equal(ds[w]["blocks.1.hook_resid_post"],
                                      stored["blocks.1.hook_resid_post"][s : s + context])  # fmt: skip


def test_batches_join_up(
    exchange_store: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Many small batches give the same dataset as one."""
    run = exchange_store["f16"].run
    whole = _load(export_hf_dataset(run, tmp_path / "one", HOOKS, 3, quiet=True))
    monkeypatch.setattr(hf_dataset, "BATCH_BYTES", 1)  # one window per batch
    parts = _load(export_hf_dataset(run, tmp_path / "many", HOOKS, 3, quiet=True))
    for col in (*HOOKS, "token_ids", "position"):
        np.testing.assert_array_equal(parts[col], whole[col], err_msg=col)


def test_several_runs_and_mixed_dtypes(exchange_store: dict[str, Any], tmp_path: Path) -> None:
    """float16 and bfloat16 runs together: float32 holds both exactly."""
    f16, bf16 = exchange_store["f16"].run, exchange_store["bf16"].run
    ds = _load(export_hf_dataset([f16, bf16], tmp_path / "ds", HOOKS[:1], 6, quiet=True))
    assert ds.features[HOOKS[0]].dtype == "float32"
    a, b = _stored(f16)[HOOKS[0]], _stored(bf16)[HOOKS[0]]
    na = len(a) // 6
    assert list(ds["run"]) == [f16.id] * na + [bf16.id] * (len(b) // 6)
    np.testing.assert_array_equal(ds[HOOKS[0]][:na].reshape(-1, a.shape[1]), a[: na * 6].astype(np.float32))
    np.testing.assert_array_equal(ds[HOOKS[0]][na:].reshape(-1, b.shape[1]), b[: (len(b) // 6) * 6])


def test_nothing_half_written(
    exchange_store: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = exchange_store["f16"].run
    out = tmp_path / "parent" / "ds"
    from datasets.arrow_writer import ArrowWriter

    calls = []

    def failing(self: Any, batch: Any, *a: Any, **k: Any) -> None:
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # what a kill looks like inside the export
        return original(self, batch, *a, **k)

    original = ArrowWriter.write_batch
    monkeypatch.setattr(ArrowWriter, "write_batch", failing)
    monkeypatch.setattr(hf_dataset, "BATCH_BYTES", 1)
    with pytest.raises(KeyboardInterrupt):
        export_hf_dataset(run, out, HOOKS, 3, quiet=True)
    assert not out.parent.exists()  # the folder it made is gone with everything in it
    monkeypatch.setattr(ArrowWriter, "write_batch", original)

    out.parent.mkdir()
    export_hf_dataset(run, out, HOOKS, 3, quiet=True)
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(StoreError, match="already exists"):
        export_hf_dataset(run, out, HOOKS, 3, quiet=True)
    monkeypatch.setattr(ArrowWriter, "write_batch", failing)
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        export_hf_dataset(run, out, HOOKS, 4, quiet=True, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == before  # the old export is untouched
    assert sorted(p.name for p in out.parent.iterdir()) == ["ds"]  # no temporary left behind
    assert len(_load(out)) == len(_stored(run)["token_ids"]) // 3


@pytest.mark.parametrize(
    ("hooks", "context", "message"),
    [
        (["blocks.0.attn.hook_pattern"], 4, "no \\(context, d\\) form"),
        (["blocks.0.hook_resid_mid"], 4, "has no actstore source"),
        (["blocks.5.hook_resid_post"], 4, "did not capture layer 5"),
        ([HOOKS[0], HOOKS[0]], 4, "repeats"),
        ([], 4, "at least one --hook"),
        (HOOKS, 100000, "lower --context"),
    ],
)
def test_bad_requests_write_nothing(exchange_store: dict[str, Any], tmp_path: Path, hooks: list[str],
                                    context: int, message: str) -> None:  # fmt: skip
    with pytest.raises(SelectionError, match=message):
        export_hf_dataset(exchange_store["llama"].run, tmp_path / "x" / "ds", hooks, context, quiet=True)
    assert not (tmp_path / "x").exists()


def test_a_source_the_run_lacks_is_named_with_the_ones_it_has(tmp_path: Path) -> None:
    from actstore.store.store import ActStore
    from query.synth import write_synthetic_run

    store = ActStore.open(tmp_path / "s.zarr", create=True)
    run = store.run(write_synthetic_run(store, n_layers=2, prompt_len=8, n_steps=2, width=8,
                                        sources=("hidden_in", "mlp_act")))  # fmt: skip
    with pytest.raises(SelectionError) as e:
        export_hf_dataset(run, tmp_path / "x" / "ds", ["blocks.0.attn.hook_q"], 4, quiet=True)
    assert str(e.value) == (f"blocks.0.attn.hook_q: run {run.id} did not capture 'q'; "
                            f"it has: {', '.join(run.sources)}")  # fmt: skip
    assert set(run.sources) >= {"hidden_in", "hidden_out", "mlp_act"} and "q" not in run.sources
    assert not (tmp_path / "x").exists()


def test_cli(exchange_store: dict[str, Any], tmp_path: Path) -> None:
    from actstore.cli import main

    cap = exchange_store["f16"]
    base = ["export", "hf-dataset", cap.run.id, "--store", str(cap.store.location), "-q"]
    res = CliRunner().invoke(
        main, [*base, "--out", str(tmp_path / "ds"), "--hook", HOOKS[0], "--context", "8"]
    )
    assert res.exit_code == 0, res.output
    assert res.output.strip() == str(tmp_path / "ds")
    assert len(_load(tmp_path / "ds")) == len(_stored(cap.run)["token_ids"]) // 8
    bad = CliRunner().invoke(
        main, [*base, "--out", str(tmp_path / "b"), "--hook", "blocks.0.hook_z", "--context", "8"]
    )
    assert bad.exit_code == 2 and bad.output.count("\n") == 1, bad.output
    assert not (tmp_path / "b").exists()
