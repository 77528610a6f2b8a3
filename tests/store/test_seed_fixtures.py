"""``import npz`` on run directories Activation Lab itself wrote (shared/fixtures/seed-runs).

Every imported array is compared with the NPZ it came from, read with plain NumPy: step
tensors position by position for every source and layer; snapshots and references as
full passes (every member, every position, qkv_last and token ids included) and as the
last position of their full prefill (the last-token stacks). The fixtures are float16
and so is the store, so every comparison is bit for bit. The fixtures are read-only:
edits go to a copy. Export back to these files: test_npz_layout.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from actstore.errors import StoreError
from actstore.store.npz import import_npz_dirs, read_seed_dirs
from actstore.store.store import ActStore

# The checkout (main or a worktree) sits beside shared/; a copy of the suite one level
# deeper (the mutation tool's mutants/) finds it too.
SEED_RUNS = next(
    (p / "shared/fixtures/seed-runs" for p in Path(__file__).resolve().parents[3:]
     if (p / "shared/fixtures/seed-runs").is_dir()),
    Path(__file__).resolve().parents[3] / "shared/fixtures/seed-runs",
)
SINGLE = next(SEED_RUNS.glob("seed_fixture_single_*"), None)
MULTI = next(SEED_RUNS.glob("seed_fixture_multi_*"), None)
RESIDUAL = ("hidden_in", "hidden_out", "attn_out", "mlp_down_out")

pytestmark = pytest.mark.skipif(SINGLE is None or MULTI is None, reason="seed-run fixtures not found")


def _json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def _bits(got: Any, want: np.ndarray) -> bool:
    got = np.asarray(got)
    return got.dtype == want.dtype and got.shape == want.shape and got.tobytes() == want.tobytes()


def _import(tmp_path: Path, d: Path) -> tuple[ActStore, list[str]]:
    store = ActStore.open(str(tmp_path / "s.zarr"), create=True)
    return store, import_npz_dirs(store, read_seed_dirs(d), quiet=True)


def _check_steps(run: Any, prompt_dir: Path) -> int:
    """Every member of every step NPZ equals the run's array at that step's positions."""
    steps = _json(prompt_dir / "steps.json")["steps"]
    prompt_len = len(steps[0]["input_token_ids"])
    layers = _json(prompt_dir / "run.json")["scenario"]["capture"]["layers"]
    compared = 0
    for i, step in enumerate(steps):
        a, b = (0, prompt_len) if i == 0 else (prompt_len + i - 1, prompt_len + i)
        with np.load(prompt_dir / step["tensors_file"]) as npz:
            assert set(npz.files) == set(step["tensor_index"])
            for key in npz.files:
                want = npz[key][0]
                if "/" not in key:  # embeddings, logits: (T, W)
                    got = run.array(key)[a:b]
                else:
                    layer, source = key.split("/")
                    li = layers.index(int(layer.removeprefix("layer_")))
                    if source == "attn_weights":  # (heads, T, kv): kv ends at the last position
                        got = run.array(source)[li, :, a:b, :b]
                    else:
                        got = run.array(source)[li, a:b]
                assert _bits(got.compute(), want), f"{prompt_dir.name} step {i} {key}"
                compared += 1
    fed = steps[0]["input_token_ids"] + [s["input_token_ids"][0] for s in steps[1:]]
    assert run.tokens().tolist() == fed
    return compared


def _check_rows(rows: Any, paths: list[Path], layers: list[int]) -> None:
    """(M, L, H) rows: the last position of each file's full prefill (1, T, H)."""
    for source in RESIDUAL:
        got = rows(source).compute()
        assert got.shape[0] == len(paths)
        for m, path in enumerate(paths):
            with np.load(path) as npz:
                for li, layer in enumerate(layers):
                    want = npz[f"layer_{layer:02d}/{source}"]
                    assert want.ndim == 3 and want.shape[0] == 1  # the real layout: full prefill
                    assert _bits(got[m, li], want[0, -1]), f"{path.name} {source} layer {layer}"


def _check_pass(run: Any, kind: str, key: Any, path: Path, tokens: list[int] | None) -> int:
    """Every member of a full-prefill NPZ equals the run's full pass, every position;
    qkv_last equals the one the import kept. Returns the members compared."""
    layers = run.layers
    with np.load(path) as npz:
        assert "qkv_last" in npz.files and not any(k.endswith("/v") for k in npz.files)
        for k in npz.files:
            want = npz[k]
            if k == "qkv_last":
                got = run.pass_qkv_last(kind, key)
            elif "/" not in k:  # embeddings, logits: (T, W)
                got = run.pass_array(kind, key, k).compute()[None]
            else:
                layer, source = k.split("/")
                li = layers.index(int(layer.removeprefix("layer_")))
                got = run.pass_array(kind, key, source)[li].compute()[None]
            assert _bits(got, want), f"{path.name} {k}"
        length = npz["embeddings"].shape[1]
    info = run.pass_info(kind, key)
    assert (info.length, info.shared) == (length, 0)  # whole, as the file holds it
    ids = run.pass_tokens(kind, key).tolist()
    assert ids == (tokens if tokens is not None else [-1] * length)  # references: no tokens recorded
    return len(npz.files)


def _check_snapshots(run: Any, prompt_dir: Path) -> None:
    folder = prompt_dir / "conversation_snapshots"
    index = _json(folder / "index.json")["snapshots"]
    assert [(s["index"], s["role"], s["content_preview"]) for s in run.snapshot_index] == [
        (e["index"], e["role"], e["content_preview"]) for e in index
    ]
    assert [s.get("generated") for s in run.snapshot_index] == [e["generated"] for e in index]
    assert index[-1]["generated"] is True  # the fixture does hold the generated-reply snapshot
    _check_rows(run.snapshots, [folder / e["tensors_file"] for e in index], run.layers)
    for e in index:
        n = _check_pass(run, "snapshot", e["index"], folder / e["tensors_file"], e["input_token_ids"])
        assert n == len(e["tensor_index"])
    assert [(p.kind, p.key) for p in run.passes if p.kind == "snapshot"] == [("snapshot", e["index"]) for e in index]
    np.testing.assert_array_equal(run.pass_tokens("snapshot", "generated"), index[-1]["input_token_ids"])


def _check_references(run: Any, top: Path) -> None:
    labels = _json(top / "references/index.json")["labels"]
    assert run.reference_labels == labels
    _check_rows(run.references, [top / f"references/ref_{x}.npz" for x in labels], run.layers)
    for label in labels:  # the full pass: this run's, or the first run's (references_run)
        _check_pass(run, "reference", label, top / f"references/ref_{label}.npz", None)


def test_single_fixture_imports_every_array(tmp_path: Path) -> None:
    assert SINGLE is not None
    store, ids = _import(tmp_path, SINGLE)
    assert len(ids) == 1
    run = store.run(ids[0])
    # 2 steps x (embeddings + 2 layers x 12 sources incl. attention weights)
    assert _check_steps(run, SINGLE / "prompt_0") == 2 * (1 + 2 * 12)
    _check_snapshots(run, SINGLE / "prompt_0")
    _check_references(run, SINGLE)
    assert run.meta["prompt_token_ids"] == _json(SINGLE / "prompt_0/run.json")["prompt_token_ids"]
    assert run.meta["scenario_dir"] == {"name": SINGLE.name, "scenario": _json(SINGLE / "scenario.json")}
    # steps keep Activation Lab's fields; seq_len is stored as tokens fed (the export writes its count back)
    steps = _json(SINGLE / "prompt_0/steps.json")["steps"]
    assert [s["seq_len"] for s in run.steps] == [34, 1] and [s["seq_len"] for s in steps] == [34, 36]
    assert [s["logit_stats"] for s in run.steps] == [s["logit_stats"] for s in steps]


def test_multi_fixture_is_one_run_per_prompt_in_order_with_shared_references(tmp_path: Path) -> None:
    assert MULTI is not None
    store, ids = _import(tmp_path, MULTI)
    names = ["prompt_0", "prompt_1_msg1of2", "prompt_1_msg2of2"]
    assert len(ids) == len(names) and sorted(store.run_ids()) == sorted(ids)
    for run_id, name in zip(ids, names, strict=True):
        run = store.run(run_id)
        assert Path(run.meta["imported_from"]).name == name
        assert run.meta["prompt_token_ids"] == _json(MULTI / name / "run.json")["prompt_token_ids"]
        assert _check_steps(run, MULTI / name) == 2 * (1 + 2 * 11)  # no attention weights
        _check_snapshots(run, MULTI / name)
        _check_references(run, MULTI)  # the one references/ beside the prompt directories
        place = {"prompt_0": (0, None), "prompt_1_msg1of2": (1, [1, 2]), "prompt_1_msg2of2": (1, [2, 2])}[name]
        assert (run.meta["prompt_index"], run.meta["message_prefix"]) == place
    # One scenario run; the reference passes stored once, in the first run
    runs = [store.run(i) for i in ids]
    assert {r.meta["scenario_run"] for r in runs} == {ids[0]}
    assert [r.meta.get("references_run") for r in runs] == [None, ids[0], ids[0]]
    assert [p.kind for p in runs[0].passes].count("reference") == 1
    assert all(p.kind == "snapshot" for r in runs[1:] for p in r.passes)


def test_a_single_prompt_directory_still_imports(tmp_path: Path) -> None:
    assert MULTI is not None
    store, ids = _import(tmp_path, MULTI / "prompt_1_msg2of2")
    run = store.run(ids[0])
    _check_steps(run, MULTI / "prompt_1_msg2of2")
    _check_snapshots(run, MULTI / "prompt_1_msg2of2")
    assert run.reference_labels == []  # references live in the parent, outside DIR


def test_cli_prints_the_run_ids_in_order(tmp_path: Path) -> None:
    from actstore.cli import main

    assert MULTI is not None
    location = str(tmp_path / "cli.zarr")
    r = CliRunner().invoke(main, ["import", "npz", str(MULTI), "--store", location, "-q"])
    assert r.exit_code == 0, r.output
    ids = r.output.split()
    assert len(ids) == 3 and sorted(ids) == sorted(ActStore.open(location).run_ids())
    store = ActStore.open(location)
    assert [Path(store.run(x).meta["imported_from"]).name for x in ids] == [
        "prompt_0", "prompt_1_msg1of2", "prompt_1_msg2of2",
    ]  # fmt: skip


def _copy(tmp_path: Path, src: Path) -> Path:
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    for p in [dst, *dst.rglob("*")]:
        p.chmod(p.stat().st_mode | 0o200)  # the fixtures are read-only
    return dst


def _edit(path: Path, fn: Any) -> None:
    data = _json(path)
    fn(data)
    path.write_text(json.dumps(data), encoding="utf-8")


def test_decode_seq_len_is_checked_as_activation_lab_counts_it(tmp_path: Path) -> None:
    assert SINGLE is not None
    d = _copy(tmp_path, SINGLE)
    steps = d / "prompt_0/steps.json"
    assert _json(steps)["steps"][1]["seq_len"] == 34 + 1 + 1  # prompt, the token fed, the one emitted
    _edit(steps, lambda x: x["steps"][1].update(seq_len=35))
    with pytest.raises(StoreError, match=r"steps\.json: steps\[1\]: seq_len 35 must be 1 or 36"):
        read_seed_dirs(d)


def test_snapshot_seq_len_must_match_its_file(tmp_path: Path) -> None:
    assert SINGLE is not None
    d = _copy(tmp_path, SINGLE)
    _edit(d / "prompt_0/conversation_snapshots/index.json", lambda x: x["snapshots"][1].update(seq_len=7))
    with pytest.raises(
        StoreError, match=r"snapshot_01_user\.npz: holds 22 tokens, but its index gives seq_len 7"
    ):
        read_seed_dirs(d)


def test_top_level_without_prompt_directories_is_refused(tmp_path: Path) -> None:
    assert MULTI is not None
    d = _copy(tmp_path, MULTI)
    for p in d.glob("prompt_*"):
        shutil.rmtree(p)
    with pytest.raises(StoreError, match=r"holds scenario\.json but no prompt_N/ directory"):
        read_seed_dirs(d)


def _rewrite_npz(path: Path, fn: Any) -> None:
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    fn(arrays)
    np.savez_compressed(path, **arrays)


@pytest.mark.parametrize(
    "case",
    ["extra_key", "missing_and_foreign_keys", "short_member", "qkv_last_rows", "token_ids", "two_spellings"],
)
def test_full_pass_files_are_checked_before_anything_is_written(tmp_path: Path, case: str) -> None:
    """A full snapshot or reference file is kept whole, so anything it holds that the
    store could not give back, or that disagrees with its index, is refused up front."""
    assert SINGLE is not None
    d = _copy(tmp_path, SINGLE)
    snap = d / "prompt_0/conversation_snapshots/snapshot_01_user.npz"
    index = d / "prompt_0/conversation_snapshots/index.json"
    if case == "extra_key":
        _rewrite_npz(snap, lambda a: a.update(notes=np.zeros(3, np.float32)))
        pattern = r"snapshot_01_user\.npz: keys \['notes'\] are neither activations nor qkv_last"
    elif case == "missing_and_foreign_keys":  # the fixture captured layers 0 and 29

        def swap(a: dict[str, np.ndarray]) -> None:
            a["layer_05/hidden_in"] = a.pop("layer_29/hidden_in")

        _rewrite_npz(snap, swap)
        pattern = (
            r"snapshot_01_user\.npz: a full pass holds the step tensors' keys \(v optional\); "
            r"missing \['layer_29/hidden_in'\]; not in the steps \['layer_05/hidden_in'\]$"
        )
    elif case == "short_member":
        _rewrite_npz(d / "references/ref_joy.npz", lambda a: a.update({"layer_29/q": a["layer_29/q"][:, :-1]}))
        pattern = r"ref_joy\.npz: layer_29/q has shape \[1, 32, 576\], expected \[1, 33, 576\]"
    elif case == "qkv_last_rows":
        _rewrite_npz(snap, lambda a: a.update(qkv_last=a["qkv_last"][:29]))
        pattern = r"snapshot_01_user\.npz: qkv_last is float32 \[29, 192\]; expected float32 \[30, 192\]"
    elif case == "token_ids":
        _edit(index, lambda x: x["snapshots"][1].update(input_token_ids=x["snapshots"][1]["input_token_ids"][1:]))
        pattern = r"index\.json: \[1\]\.input_token_ids must be 22 token ids, one per position of its file"
    else:
        _edit(index, lambda x: x["snapshots"][1]["input_tokens"].__setitem__(0, "<start>"))
        pattern = r"\[1\]\.input_tokens spells token 1 '<start>', another snapshot '<\|im_start\|>'"
    with pytest.raises(StoreError, match=pattern) as info:
        read_seed_dirs(d)  # the CLI checks every directory this way before opening the store
    assert "\n" not in str(info.value)


def test_steps_without_kind_are_prefill_then_decode(tmp_path: Path) -> None:
    """``kind`` is optional in steps.json (a hand-made run directory may leave it out): the
    first step is the prefill, the rest decode, as Activation Lab labels them."""
    assert SINGLE is not None
    d = _copy(tmp_path, SINGLE)
    steps = d / "prompt_0/steps.json"
    assert [s["kind"] for s in _json(steps)["steps"]] == ["prefill", "decode"]
    _edit(steps, lambda x: [s.pop("kind") for s in x["steps"]])
    store, ids = _import(tmp_path, d)
    assert [s["kind"] for s in store.run(ids[0]).steps] == ["prefill", "decode"]


def test_what_run_json_leaves_out_is_filled_from_the_files_and_named(tmp_path: Path) -> None:
    """A run.json without the device and the model's hidden size: the device is "unknown"
    (env gives none either), the hidden size the width of hidden_in (576, SmolLM2's), read
    from the files even when they hold neither attn_out nor embeddings; both are listed as
    filled, so an export leaves them out again."""
    assert SINGLE is not None
    d = _copy(tmp_path, SINGLE)
    run_json = d / "prompt_0/run.json"
    _edit(run_json, lambda x: (x["env"].pop("device"), x["model"]["arch"].pop("hidden_size")))
    for npz in d.rglob("*.npz"):
        _rewrite_npz(npz, lambda a: [a.pop(k) for k in list(a) if k == "embeddings" or k.endswith("/attn_out")])
    store, ids = _import(tmp_path, d)
    meta = store.run(ids[0]).meta
    assert "attn_out" not in store.run(ids[0]).sources and "embeddings" not in store.run(ids[0]).sources
    assert meta["model"]["device"] == "unknown" and meta["model"]["arch"]["hidden_size"] == 576
    assert {"model.device", "model.arch.hidden_size"} <= set(meta["npz_filled"])


def test_an_import_does_not_load_torch(tmp_path: Path) -> None:
    """Only capture needs torch: ``actstore import npz`` of Activation Lab's directory, in a
    fresh interpreter, imports every run without loading torch or transformers (whose imports
    cost seconds of start-up)."""
    from test_npz import cli_loads

    assert MULTI is not None
    store = tmp_path / "s.zarr"
    assert cli_loads(["import", "npz", str(MULTI), "--store", str(store), "-q"]) == ["0", "False", "False"]
    assert len(ActStore.open(store).run_ids()) == len(list(MULTI.glob("prompt_*")))  # one run per prompt
