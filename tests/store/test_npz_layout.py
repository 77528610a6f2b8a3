"""``export npz`` writes Activation Lab's real layout (shared/fixtures/seed-runs).

* Import then export of each real fixture gives back its files: the same paths, every
  NPZ member byte for byte in the same order, and the same JSON, except run.json's
  ``actstore`` block, which the export adds (run id, dtypes, layers, scenario run, the
  decoded reply): Activation Lab's readers ignore it, an import reads it back.
* A tiny random llama's multi-prompt capture, exported: directory names, scenario.json,
  the snapshot index, seq_len as Activation Lab counts it, qkv_last recomputed here.
* (slow: the real SmolLM2) each fixture's scenario file captured by actstore and exported
  has the fixture's files, NPZ keys, shapes and dtypes, and its values within float16
  tolerance of Activation Lab's.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from actstore import naming
from actstore.cli import main
from actstore.errors import StoreError
from actstore.store.npz import default_export_dir, export_npz, import_npz_dirs, read_seed_dirs
from actstore.store.npz_lab import STEP_KEYS, scenario_runs
from actstore.store.store import ActStore

SEED_RUNS = Path(__file__).resolve().parents[3] / "shared/fixtures/seed-runs"
FIXTURES = {name: next(SEED_RUNS.glob(f"seed_fixture_{name}_*"), None) for name in ("single", "multi")}
needs_fixtures = pytest.mark.skipif(None in FIXTURES.values(), reason="seed-run fixtures not found")
RUN_KEYS = ["scenario", "model", "tokenizer", "prompt_token_ids", "prompt_tokens", "env", "created_at"]
SNAPSHOT_KEYS = [
    "index", "role", "content_preview", "input_token_ids", "input_tokens", "seq_len", "tensors_file",
    "tensor_index", "generated",
]  # fmt: skip


def _json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def _members(path: Path) -> list[tuple[str, bytes]]:
    """Every member of an NPZ, in order, as bytes (the .npy header and data)."""
    with zipfile.ZipFile(path) as z:
        return [(i.filename, z.read(i)) for i in z.infolist()]


# ---------------------------------------------------------------------- the real files, back


@needs_fixtures
@pytest.mark.parametrize("name", ["single", "multi"])
def test_import_then_export_gives_back_activation_labs_files(tmp_path: Path, name: str) -> None:
    src = FIXTURES[name]
    assert src is not None
    location = str(tmp_path / "s.zarr")
    cli = CliRunner()
    r = cli.invoke(main, ["import", "npz", str(src), "--store", location, "-q"])
    assert r.exit_code == 0, r.output
    ids = r.output.split()
    # Any one run names its scenario run: the export holds every prompt directory.
    r = cli.invoke(main, ["export", "npz", ids[-1], "--store", location, "--out", str(tmp_path / "out"), "-q"])
    assert r.exit_code == 0, r.output
    out = Path(r.output.strip())
    assert out == tmp_path / "out" / src.name  # the imported directory's own name
    assert _files(out) == _files(src)
    compared = 0
    for rel in _files(src):
        a, b = src / rel, out / rel
        if rel.endswith(".npz"):
            assert [n for n, _ in _members(b)] == [n for n, _ in _members(a)], rel  # same keys, same order
            for (key, x), (_, y) in zip(_members(a), _members(b), strict=True):
                assert x == y, f"{rel}: {key}"
                compared += 1
            continue
        x, y = _json(a), _json(b)
        if rel.endswith("run.json"):
            info = y.pop("actstore")  # the one addition (see the module docstring)
            assert info["run_id"] in ids and info["generated_text"] and info["store_dtype"] == "float16"
        # equal, keys in the same order all the way down
        assert json.dumps(y, ensure_ascii=False) == json.dumps(x, ensure_ascii=False), rel
    assert compared > 0


# ---------------------------------------------------------------------- a tiny capture


PROMPTS = [
    {"messages": [{"role": "user", "content": "Say hi."}]},
    {"messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Sky colour?"}],
     "run_at_each_message": True},
]  # fmt: skip
LABELS = ["calm", "fear"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[ActStore, list[Any], Path]:
    """A multi-prompt capture of a tiny llama (layers 0 and 2 of 3) and its export."""
    from actstore.capture.runner import capture
    from actstore.scenario import scenario_from_dict
    from actstore.testing import tiny_loaded

    scenario = scenario_from_dict({
        "name": "tiny_lab", "model": {"id": "tiny", "dtype": "float32", "device": "cpu"},
        "prompt": PROMPTS, "generation": {"max_new_tokens": 3},
        "capture": {"layers": [0, 2], "store_dtype": "float16", "top_k_probs": 3},
        "reference_states": [{"label": x, "messages": [{"role": "user", "content": f"I feel {x}."}]} for x in LABELS],
    })  # fmt: skip
    root = tmp_path_factory.mktemp("tiny_lab")
    store = ActStore.open(root / "store.zarr", create=True)
    results = capture(scenario, store, loaded=tiny_loaded("llama"), progress=False)
    runs = scenario_runs(store.run(results[0].run_id))
    return store, runs, export_npz(runs, default_export_dir(root / "out", runs), quiet=True)


def test_tiny_capture_exports_activation_labs_layout(tiny: tuple[ActStore, list[Any], Path]) -> None:
    store, runs, out = tiny
    sr = runs[0].meta["scenario_run"]
    stamp = sr.split("_")[-2]  # <name>_<YYYYmmddTHHMMSS>_<hex>: when the capture began
    assert out.name == f"tiny_lab_{stamp[:4]}-{stamp[4:6]}-{stamp[6:11]}-{stamp[11:13]}-{stamp[13:]}Z"
    names = ["prompt_0", "prompt_1_msg1of2", "prompt_1_msg2of2"]
    assert sorted(p.name for p in out.iterdir()) == sorted([*names, "references", "scenario.json"])
    scenario = _json(out / "scenario.json")
    assert scenario["name"] == "tiny_lab"
    assert scenario["prompt"] == [{"run_at_each_message": False, **PROMPTS[0]}, PROMPTS[1]]
    refs = _json(out / "references/index.json")
    assert refs["labels"] == LABELS
    for label in LABELS:  # not in Activation Lab's index (it records none): for an import
        assert refs["input_token_ids"][label] == runs[0].pass_tokens("reference", label).tolist()
    for run, name in zip(runs, names, strict=True):
        d = out / name
        # Activation Lab's prompt folder: these entries and no others (no stray folder either)
        assert sorted(p.name for p in d.iterdir()) == ["conversation_snapshots", "run.json", "steps.json", "tensors"]
        assert {p.suffix for p in (d / "tensors").iterdir()} == {".npz"}
        run_json = _json(d / "run.json")
        assert list(run_json) == [*RUN_KEYS, "actstore"] and run_json["actstore"]["run_id"] == run.id
        info = run_json["actstore"]
        assert (info["layers"], info["sources"], info["prompt_len"]) == (run.layers, list(run.sources), run.prompt_len)
        steps = _json(d / "steps.json")["steps"]
        P = run.prompt_len
        for i, s in enumerate(steps):
            assert list(s) == [*STEP_KEYS, "tensors_file", "tensor_index"]  # Activation Lab's order
            assert s["seq_len"] == (P if i == 0 else P + i + 1)  # as Activation Lab counts
            assert set(s["logit_stats"]) == {"entropy", "effective_vocab", "top1_prob"}
            stats = s["logit_stats"]
            assert stats["effective_vocab"] == pytest.approx(np.exp(stats["entropy"]), rel=1e-6)  # float32 exp
        index = _json(d / "conversation_snapshots/index.json")["snapshots"]
        assert [e["generated"] for e in index] == [False] * (len(index) - 1) + [True]
        for e in index:
            assert list(e) == SNAPSHOT_KEYS
            assert e["tensors_file"] == f"snapshot_{e['index']:02d}_{e['role']}.npz"
            assert e["input_token_ids"] == run.pass_tokens("snapshot", e["index"]).tolist()
            assert len(e["input_tokens"]) == e["seq_len"] == len(e["input_token_ids"])
            with np.load(d / "conversation_snapshots" / e["tensors_file"]) as npz:
                assert list(npz.files) == list(e["tensor_index"])
                assert not any(k.endswith("/v") for k in npz.files) and npz.files[-1] == "qkv_last"
                for k in npz.files:
                    assert e["tensor_index"][k] == {"shape": list(npz[k].shape), "dtype": str(npz[k].dtype)}
                got = npz["layer_02/attn_weights"][0]
                want = run.pass_array("snapshot", e["index"], "attn_weights")[1].compute()
                np.testing.assert_array_equal(got, want)
                _check_qkv_last(run, "snapshot", e["index"], npz["qkv_last"])


def _check_qkv_last(run: Any, kind: str, key: Any, got: np.ndarray) -> None:
    """Activation Lab's qkv_last, recomputed here from the pass's last-token q, k, v."""
    q, k, v = (run.pass_array(kind, key, s)[:, -1].compute().astype(np.float32) for s in "qkv")
    m = min(q.shape[-1], k.shape[-1])
    assert got.dtype == np.float32 and got.shape == (run.meta["model"]["arch"]["num_layers"], v.shape[-1])
    want = np.zeros_like(got)
    for i, layer in enumerate(run.layers):
        want[layer] = (q[i, :m] @ k[i, :m]) / np.sqrt(m) * v[i]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert not got[1].any()  # layer 1 is not captured: a zero row


def test_tiny_references_carry_qkv_last(tiny: tuple[ActStore, list[Any], Path]) -> None:
    _, runs, out = tiny
    for label in LABELS:
        with np.load(out / f"references/ref_{label}.npz") as npz:
            _check_qkv_last(runs[1], "reference", label, npz["qkv_last"])  # a later run follows references_run


def test_a_scenario_run_id_opens_its_latest_run(tiny: tuple[ActStore, list[Any], Path], tmp_path: Path) -> None:
    """Imported into a store that already holds another run, the export's three runs keep
    their scenario run, whose id is no run's id there: ``run()`` given it opens the last
    of the three (one scenario run, not three matches), and the other run stays apart."""
    from query.synth import write_synthetic_run

    _, runs, out = tiny
    scenario_run = runs[0].meta["scenario_run"]
    store = ActStore.open(tmp_path / "b.zarr", create=True)
    other = write_synthetic_run(store, name="other", n_layers=2, prompt_len=4, n_steps=2, width=8)
    ids = import_npz_dirs(store, read_seed_dirs(out), quiet=True)
    assert len(ids) == 3 and scenario_run not in store.run_ids()
    assert [store.run(i).meta["scenario_run"] for i in ids] == [scenario_run] * 3
    assert store.run(scenario_run).id == ids[-1]
    assert store.run(other).id == other


def test_runs_recorded_before_message_prefix_get_the_same_names(
    tiny: tuple[ActStore, list[Any], Path], tmp_path: Path
) -> None:
    """Runs captured before message_prefix was recorded: a prompt index several runs of
    one scenario run share is a prompt with run_at_each_message."""
    store, runs, out = tiny
    root = zarr.open_group(store.location, mode="r+")
    saved = {}
    try:
        for run in runs:
            group = root[naming.run_path(run.id)]
            saved[run.id] = dict(group.attrs["run"])
            group.attrs["run"] = {k: v for k, v in saved[run.id].items() if k != "message_prefix"}
        again = scenario_runs(store.run(runs[0].id))
        assert all("message_prefix" not in r.meta for r in again)
        second = export_npz(again, tmp_path / "again", quiet=True)
        assert _files(second) == _files(out)
        assert _json(second / "scenario.json") == _json(out / "scenario.json")
    finally:
        for run_id, meta in saved.items():
            root[naming.run_path(run_id)].attrs["run"] = meta



def test_a_scenario_run_without_a_time_stamp_is_dated_by_created_at(
    tiny: tuple[ActStore, list[Any], Path], tmp_path: Path
) -> None:
    """A scenario run named without actstore's ``_YYYYmmddTHHMMSS_`` stamp: the folder is
    dated by the run's ``created_at``, in UTC, in Activation Lab's format."""
    from actstore.store.npz_lab import dir_name

    store, runs, _ = tiny
    group = zarr.open_group(store.location, mode="r+")[naming.run_path(runs[0].id)]
    saved = dict(group.attrs["run"])
    try:
        group.attrs["run"] = {**saved, "scenario_run": "named_by_hand", "created_at": "2025-01-02T03:04:05+01:00"}
        assert dir_name([store.run(runs[0].id)]) == "tiny_lab_2025-01-02T02-04-05Z"
    finally:
        group.attrs["run"] = saved


@pytest.mark.parametrize(("key", "value"), [
    ("prompt_index", -1), ("prompt_index", 10**6), ("prompt_index", True), ("prompt_index", 2.0),
    ("message_prefix", [0, 2]), ("message_prefix", [3, 2]), ("message_prefix", [1, 2.0]),
    ("message_prefix", [True, 2]), ("message_prefix", [1]),
])  # fmt: skip
def test_placement_metadata_out_of_range_is_refused_by_name(
    tiny: tuple[ActStore, list[Any], Path], tmp_path: Path, key: str, value: Any
) -> None:
    """A run's prompt_index and message_prefix become folder names (prompt_<i>_msg<k>of<m>):
    a value that is no small whole number (a bool, a float, negative, huge) or a prefix
    that is no [k, m] with 1 <= k <= m is refused, naming the run and the value, and
    nothing is written."""
    import shutil

    from query.synth import edited_run_meta

    store, runs, _ = tiny
    shutil.copytree(store.location, tmp_path / "s.zarr")
    run_id = runs[0].id
    with edited_run_meta(tmp_path / "s.zarr", run_id) as meta:
        meta[key] = value
    copy = ActStore.open(tmp_path / "s.zarr")
    want = "is not a number 0 to 999999" if key == "prompt_index" else r"is not \[k, m\] with 1 <= k <= m"
    with pytest.raises(StoreError, match=rf"run {run_id}: {key} .* {want}"):
        export_npz(scenario_runs(copy.run(run_id)), tmp_path / "out", quiet=True)
    assert not (tmp_path / "out").exists()

def test_runs_without_full_passes_are_refused_before_anything_is_written(tmp_path: Path) -> None:
    from test_npz import make_seed_dir

    store = ActStore.open(tmp_path / "s.zarr", create=True)
    [run_id] = import_npz_dirs(store, read_seed_dirs(make_seed_dir(tmp_path)), quiet=True)  # README layout
    out = tmp_path / "out" / "x"
    with pytest.raises(StoreError, match=rf"run {run_id} has no full snapshot passes .* --layout readme"):
        export_npz(store.run(run_id), out, quiet=True)
    assert not (tmp_path / "out").exists()
    assert (export_npz(store.run(run_id), out, layout="readme", quiet=True) / "steps.json").is_file()
    with pytest.raises(StoreError, match="the readme layout exports one run, not 2"):
        export_npz([store.run(run_id)] * 2, tmp_path / "two", layout="readme")


@pytest.mark.parametrize("umask", [0o022, 0o002], ids=["022", "002"])
def test_lab_export_folder_has_umask_permissions(
    tiny: tuple[ActStore, list[Any], Path], tmp_path: Path, umask: int
) -> None:
    _, runs, _ = tiny
    old = os.umask(umask)
    try:
        out = export_npz(runs, tmp_path / "exports" / "lab", quiet=True)
    finally:
        os.umask(old)
    modes = {p: p.stat().st_mode & 0o777 for p in [out, *out.rglob("*")]}
    assert {m for p, m in modes.items() if p.is_dir()} == {0o777 & ~umask}
    assert {m for p, m in modes.items() if p.is_file()} == {0o666 & ~umask}


# ---------------------------------------------------------------------- the real model


# Capture vs Activation Lab, max |actstore - Activation Lab| / max |Activation Lab| per
# array, on both fixtures (torch 2.13 / transformers 5.24, CPU, float32 model, float16
# store). Step files agree bit for bit except mlp_down_in; snapshot and reference files
# differ because actstore runs a snapshot as a few tokens over a slice of the prompt's KV
# cache, not as a fresh prefill (store/passes.py). mlp_down_in is act * up rounded from
# float16 inputs, Activation Lab's a float32 product rounded once.
# The bound is counted in float16 steps: two float32 results a hair apart on either side
# of a float16 rounding boundary are stored one step apart, and a step at x is at most
# 2**-10 * max|x|. Which values straddle a boundary moves with the machine's kernels:
# with the same versions, one day measured at most 3.4e-4 (mlp_act), a later day 5.04e-4
# (q of one reference, one step with max|x| in the same binade) and 4.9e-4 (attention
# weights); mlp_down_in 8.2e-4 on both. So one step for every source, two for
# mlp_down_in (two rounded factors, then the product rounded); a wrong layer, row,
# position or source is off by far more than a step.
FLOAT16_STEP = 2.0**-10
TOLERANCE = {"mlp_down_in": 2 * FLOAT16_STEP}
DEFAULT_TOLERANCE = FLOAT16_STEP
LOGPROB_TOLERANCE = 1e-4  # nats; measured 0 (the step passes agree bit for bit)


@pytest.fixture(scope="module")
def captured(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Both fixtures' scenario files (loaded as they are) captured with actstore, one
    model load, and exported."""
    from actstore.capture.runner import capture
    from actstore.models.loading import load_model
    from actstore.scenario import load_scenario

    root = tmp_path_factory.mktemp("captured")
    store = ActStore.open(root / "store.zarr", create=True)
    loaded = None
    out = {}
    for name in FIXTURES:
        scenario = load_scenario(SEED_RUNS / f"seed_fixture_{name}.yaml")
        loaded = loaded or load_model(scenario.model, attn_implementation="eager")
        results = capture(scenario, store, loaded=loaded, progress=False)
        runs = scenario_runs(store.run(results[0].run_id))
        assert len(runs) == len(results)
        out[name] = export_npz(runs, default_export_dir(root / "out", runs), quiet=True)
    return out


@pytest.mark.slow
@needs_fixtures
@pytest.mark.parametrize("name", ["single", "multi"])
def test_capture_writes_the_fixtures_files(captured: dict[str, Path], name: str) -> None:
    src, out = FIXTURES[name], captured[name]
    assert src is not None
    assert out.name.startswith(f"seed_fixture_{name}_")
    assert _files(out) == _files(src)
    for rel in _files(src):
        if rel.endswith(".npz"):
            with np.load(src / rel) as a, np.load(out / rel) as b:
                assert list(b.files) == list(a.files), rel
                for k in a.files:
                    assert (b[k].shape, b[k].dtype) == (a[k].shape, a[k].dtype), f"{rel}: {k}"
    for rel in (r for r in _files(src) if r.endswith("steps.json")):
        want, got = _json(src / rel)["steps"], _json(out / rel)["steps"]
        assert len(got) == len(want)
        for a, b in zip(want, got, strict=True):
            assert list(b) == list(a), rel
            same = ("step", "kind", "input_token_ids", "generated_token_id", "logit_argmax_id", "seq_len",
                    "tensors_file", "tensor_index")  # fmt: skip
            assert {k: b[k] for k in same} == {k: a[k] for k in same}, rel
            assert [t["id"] for t in b["top_k"]] == [t["id"] for t in a["top_k"]]
            lp = [(t["logprob"], u["logprob"]) for t, u in zip(a["top_k"], b["top_k"], strict=True)]
            assert max(abs(x - y) for x, y in [(a["logit_argmax_logprob"], b["logit_argmax_logprob"]), *lp]) < LOGPROB_TOLERANCE
            assert all(abs(a["logit_stats"][k] - b["logit_stats"][k]) <= 1e-4 * max(1, abs(a["logit_stats"][k]))
                       for k in a["logit_stats"])  # fmt: skip
    for rel in (r for r in _files(src) if r.endswith("conversation_snapshots/index.json")):
        want, got = _json(src / rel)["snapshots"], _json(out / rel)["snapshots"]
        assert [list(e) for e in got] == [list(e) for e in want] == [SNAPSHOT_KEYS] * len(want)
        for a, b in zip(want, got, strict=True):  # token strings: actstore spells tokens as the tokenizer does
            assert {k: b[k] for k in SNAPSHOT_KEYS if k != "input_tokens"} == {
                k: a[k] for k in SNAPSHOT_KEYS if k != "input_tokens"
            }, rel
    for rel in (r for r in _files(src) if r.endswith("run.json")):
        a, b = _json(src / rel), _json(out / rel)
        assert list(b) == [*list(a), "actstore"] and b["prompt_token_ids"] == a["prompt_token_ids"]
        assert b["scenario"]["prompt"]["messages"] == a["scenario"]["prompt"][0]["messages"]
    a, b = _json(src / "scenario.json"), _json(out / "scenario.json")
    assert (b["name"], b["prompt"], b["reference_states"]) == (a["name"], a["prompt"], a["reference_states"])
    assert _json(out / "references/index.json")["labels"] == _json(src / "references/index.json")["labels"]


@pytest.mark.slow
@needs_fixtures
@pytest.mark.parametrize("name", ["single", "multi"])
def test_capture_values_are_activation_labs_within_float16(captured: dict[str, Path], name: str) -> None:
    src, out = FIXTURES[name], captured[name]
    assert src is not None
    worst: dict[str, float] = {}
    for rel in (r for r in _files(src) if r.endswith(".npz")):
        with np.load(src / rel) as a, np.load(out / rel) as b:
            for k in a.files:
                want, got = a[k].astype(np.float64), b[k].astype(np.float64)
                source = k.rsplit("/", 1)[-1]
                err = float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))
                worst[source] = max(worst.get(source, 0.0), err)
                assert err <= TOLERANCE.get(source, DEFAULT_TOLERANCE), f"{rel}: {k}: {err:.2e}"
    print(name, {k: f"{v:.1e}" for k, v in sorted(worst.items())})  # shown with -s
