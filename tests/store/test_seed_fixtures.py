"""``import npz`` on run directories Activation Lab itself wrote (shared/fixtures/seed-runs).

Every imported array is compared with the NPZ it came from, read with plain NumPy: step
tensors position by position for every source and layer, snapshots and references as
the last position of their full prefill. The fixtures are float16 and so is the store,
so every comparison is bit for bit. The fixtures are read-only: edits go to a copy.
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

# The checkout (main or a worktree) sits beside shared/.
SEED_RUNS = Path(__file__).resolve().parents[3] / "shared/fixtures/seed-runs"
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


def _check_snapshots(run: Any, prompt_dir: Path) -> None:
    folder = prompt_dir / "conversation_snapshots"
    index = _json(folder / "index.json")["snapshots"]
    assert [(s["index"], s["role"], s["content_preview"]) for s in run.snapshot_index] == [
        (e["index"], e["role"], e["content_preview"]) for e in index
    ]
    assert [s.get("generated") for s in run.snapshot_index] == [e["generated"] for e in index]
    assert index[-1]["generated"] is True  # the fixture does hold the generated-reply snapshot
    _check_rows(run.snapshots, [folder / e["tensors_file"] for e in index], run.layers)


def _check_references(run: Any, top: Path) -> None:
    labels = _json(top / "references/index.json")["labels"]
    assert run.reference_labels == labels
    _check_rows(run.references, [top / f"references/ref_{x}.npz" for x in labels], run.layers)


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
