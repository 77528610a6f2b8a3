"""NPZ import: what an imported run holds, checked against the files it came from.

The full-pass attention array is read with zarr directly and compared with Activation
Lab's own snapshot and reference files read with NumPy (its column count is the longest
pass, its rows every pass whole, in file order). A full-pass file that cannot be stored
losslessly is refused with an error naming that file. Model metadata that run.json
leaves out is filled from the tensors' widths as the NPZ headers give them, and the
scenario run an export records is kept by an import into another store.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
from test_npz import make_seed_dir
from test_seed_fixtures import SINGLE

from actstore import naming
from actstore.errors import StoreError
from actstore.store.npz import export_npz, import_npz, import_npz_dirs, read_seed_dirs
from actstore.store.store import ActStore


def _json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def _npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


# ---------------------------------------------------------------------- full-pass attention


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> tuple[ActStore, str]:
    if SINGLE is None:
        pytest.skip("seed-run fixtures not found")
    store = ActStore.open(str(tmp_path_factory.mktemp("single") / "s.zarr"), create=True)
    [run_id] = import_npz_dirs(store, read_seed_dirs(SINGLE), quiet=True)
    return store, run_id


def test_pass_attention_is_as_wide_as_the_longest_pass(single: tuple[ActStore, str]) -> None:
    """passes/attn_weights is (layers, heads, every pass's tokens, longest pass): each
    pass's rows hold its file's (heads, T, T) attention in its first T columns."""
    assert SINGLE is not None
    store, run_id = single
    prompt = SINGLE / "prompt_0"
    snaps = _json(prompt / "conversation_snapshots/index.json")["snapshots"]
    files = [prompt / "conversation_snapshots" / e["tensors_file"] for e in snaps]
    files += [SINGLE / f"references/ref_{x}.npz" for x in _json(SINGLE / "references/index.json")["labels"]]
    layers = _json(prompt / "run.json")["scenario"]["capture"]["layers"]
    attn = {}
    for path in files:
        with np.load(path) as z:
            attn[path] = [z[f"layer_{la:02d}/attn_weights"][0] for la in layers]  # (heads, T, T) each
    lengths = [a[0].shape[-1] for a in attn.values()]
    assert len(set(lengths)) > 1  # passes of different lengths: the width is not any one of them
    heads = attn[files[0]][0].shape[0]
    arr = zarr.open_group(store.location, mode="r")[f"runs/{run_id}/{naming.PASSES_GROUP}/acts/attn_weights"]
    assert arr.shape == (len(layers), heads, sum(lengths), max(lengths))
    start = 0
    for path in files:  # snapshots in index order, then references: each whole
        for li, want in enumerate(attn[path]):
            t = want.shape[-1]
            got = arr[li, :, start : start + t, :t]
            assert got.dtype == want.dtype and got.tobytes() == want.tobytes(), f"{path.name} layer {li}"
        start += attn[path][0].shape[-1]


# ---------------------------------------------------------------------- full passes refused


def _full_pass_snapshots(d: Path) -> list[Path]:
    """Turn a hand-made seed directory's snapshots into full prefills, as Activation Lab
    writes them: step 0's file holds every key at every prompt position."""
    folder = d / "conversation_snapshots"
    index = _json(folder / "index.json")
    paths = []
    for e in index:
        path = d / naming.snapshot_file(e["index"], e["role"])
        shutil.copyfile(d / naming.step_file(0), path)
        e["seq_len"] = len(_json(d / "steps.json")["steps"][0]["input_token_ids"])
        paths.append(path)
    (folder / "index.json").write_text(json.dumps(index))
    shutil.rmtree(d / "references")
    return paths


def _rewrite(path: Path, key: str, fn: Any) -> None:
    arrays = _npz(path)
    arrays[key] = fn(arrays[key].copy())
    np.savez_compressed(path, **arrays)


def test_full_pass_snapshots_import_whole(tmp_path: Path) -> None:
    """The unbroken variant of the directories below imports; each snapshot is a whole pass."""
    d = make_seed_dir(tmp_path)
    paths = _full_pass_snapshots(d)
    store = ActStore.open(str(tmp_path / "s.zarr"), create=True)
    run = store.run(import_npz(store, d, quiet=True))
    assert [(p.kind, p.length, p.shared) for p in run.passes] == [("snapshot", 5, 0)] * len(paths)
    want = _npz(paths[1])["layer_01/q"][0]
    got = np.asarray(run.pass_array("snapshot", 1, "q")[1].compute())
    assert got.dtype == want.dtype and got.tobytes() == want.tobytes()


@pytest.mark.parametrize("case", ["residual_mismatch", "not_bfloat16"])
def test_unstorable_full_pass_names_its_file(tmp_path: Path, case: str) -> None:
    """Only loading a full pass shows that it cannot be stored bit for bit (its headers
    passed); the error names that file, and no run is left."""
    if case == "residual_mismatch":
        d = make_seed_dir(tmp_path)
        bad = _full_pass_snapshots(d)[1]
        _rewrite(bad, "layer_00/hidden_out", lambda a: a + np.float16(1))
        rest = r"layer_0\d/hidden_(in|out) differs from layer_0\d/hidden_(in|out)"
    else:
        d = make_seed_dir(tmp_path, store_dtype="bfloat16")
        bad = _full_pass_snapshots(d)[1]
        _rewrite(bad, "layer_01/q", lambda a: (a.view(np.uint32) | np.uint32(1)).view(np.float32))
        rest = r"layer_01/q: float32 values are not bfloat16 values"
    store = ActStore.open(str(tmp_path / "s.zarr"), create=True)
    with pytest.raises(StoreError, match="^" + re.escape(str(bad)) + ": " + rest):
        import_npz(store, d, quiet=True)
    assert store.run_ids() == []


# ---------------------------------------------------------------------- metadata


@pytest.mark.parametrize(
    "dropped", [(), ("hidden_in", "hidden_out"), ("hidden_in", "hidden_out", "attn_out")]
)
def test_arch_gaps_are_filled_from_the_tensor_widths(tmp_path: Path, dropped: tuple[str, ...]) -> None:
    """run.json without model.arch: each size comes from the step NPZs' own shapes (the
    hidden size from hidden_in, else attn_out, else the embeddings), and is listed as filled."""
    d = make_seed_dir(tmp_path)
    steps = _json(d / "steps.json")["steps"]
    for s in steps:
        path = d / s["tensors_file"]
        arrays = {k: v for k, v in _npz(path).items() if k.split("/")[-1] not in dropped}
        np.savez_compressed(path, **arrays)
    shutil.rmtree(d / "conversation_snapshots")
    shutil.rmtree(d / "references")
    run_json = _json(d / "run.json")
    del run_json["model"]["arch"]
    (d / "run.json").write_text(json.dumps(run_json))
    step0 = _npz(d / steps[0]["tensors_file"])
    hidden_from = next(s for s in ("hidden_in", "attn_out", "embeddings") if s not in dropped)
    key = hidden_from if hidden_from == "embeddings" else f"layer_00/{hidden_from}"
    # make_seed_dir gives every residual width 8; the fill must still be a width, not a gap
    want = {
        "family": "unknown",
        "num_layers": 2,  # layers 0 and 1
        "hidden_size": step0[key].shape[-1],
        "intermediate_size": step0["layer_00/mlp_up"].shape[-1],
        "num_attention_heads": step0["layer_00/attn_weights"].shape[1],
        "vocab_size": step0["logits"].shape[-1],
    }
    store = ActStore.open(str(tmp_path / "s.zarr"), create=True)
    meta = store.run(import_npz(store, d, quiet=True)).meta
    assert meta["model"]["arch"] == want
    assert [x for x in meta["npz_filled"] if x.startswith("model.arch")] == [
        *(f"model.arch.{k}" for k in want), "model.arch",
    ]  # fmt: skip


# ---------------------------------------------------------------------- scenario run


def test_an_exports_scenario_run_is_kept_unless_the_store_holds_it(tmp_path: Path) -> None:
    """Importing an export into another store keeps the scenario run its run.json
    records; importing it where that scenario run's runs already are starts a new one."""
    first = ActStore.open(str(tmp_path / "a.zarr"), create=True)
    run = first.run(import_npz(first, make_seed_dir(tmp_path), quiet=True))
    out = export_npz(run, tmp_path / "out", layout="readme", quiet=True)
    kept = _json(out / "run.json")["actstore"]["scenario_run"]
    assert kept == run.id  # a run imported alone is its own scenario run

    other = ActStore.open(str(tmp_path / "b.zarr"), create=True)
    new_id = import_npz(other, out, quiet=True)
    assert new_id != kept
    assert other.run(new_id).meta["scenario_run"] == kept
    [entry] = other.catalog_entries()
    assert entry["scenario_run"] == kept

    again = import_npz(first, out, quiet=True)  # the store already holds runs of it
    assert first.run(again).meta["scenario_run"] == again


def test_snapshots_without_a_generated_flag_export_as_not_generated(tmp_path: Path) -> None:
    """An index.json whose entries carry no "generated" flag (Activation Lab before it
    appended the reply as a snapshot): every snapshot is a message of the conversation,
    and the export marks each one not generated."""
    d = make_seed_dir(tmp_path)
    _full_pass_snapshots(d)  # Activation Lab's own layout holds whole passes
    index_path = d / "conversation_snapshots" / "index.json"
    entries = _json(index_path)  # the hand-made directory's index: a list of entries
    assert entries
    for e in entries:
        e.pop("generated", None)
    index_path.write_text(json.dumps(entries))
    store = ActStore.open(str(tmp_path / "s.zarr"), create=True)
    run = store.run(import_npz(store, d, quiet=True))
    out = export_npz(run, tmp_path / "out", quiet=True)
    [exported] = list(Path(out).rglob("conversation_snapshots/index.json"))
    got = _json(exported)["snapshots"]
    assert [e["index"] for e in got] == [e["index"] for e in entries]
    assert [e["generated"] for e in got] == [False] * len(entries)
