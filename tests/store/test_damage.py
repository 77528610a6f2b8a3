"""The damage matrix: each kind of damage to one run, against every reader.

A store of two tiny captured runs is damaged one way at a time (in a fresh copy). Every
reader then either answers exactly what it answered on the undamaged store (for the
undamaged run always; for the damaged one only where the damage is not in what it
read) or fails with one line naming the damaged run. Never a different number.
``actstore check`` finds every kind, and ``gc`` + ``check`` clear the leftovers of
killed writers.
"""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from actstore import naming
from actstore.capture.runner import capture_run
from actstore.cli import main
from actstore.errors import DamagedRunError, RunNotFoundError
from actstore.scenario import scenario_from_dict
from actstore.store.store import ActStore
from actstore.testing import SAMPLE_MESSAGES, tiny_loaded
from actstore.view import api
from query.synth import write_synthetic_run

METRIC_QUERIES = [
    ["cosine", "--runs", "all", "--source", "hidden_out", "--source", "q", "--source", "mlp_up"],
    ["mae", "--runs", "all", "--compare", "snapshots-references", "--source", "hidden_in"],
    ["jaccard", "--runs", "all", "--compare", "runs", "--source", "attn_out"],
]


def _invoke(store: Path, *args: str) -> Any:
    return CliRunner().invoke(main, [*args, "--store", str(store)])


def _csv(text: str) -> pd.DataFrame:
    return pd.read_csv(io.StringIO(text))


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: Any) -> dict[str, Any]:
    """Two runs (victim, bystander) and every reader's answers before any damage."""
    root = tmp_path_factory.mktemp("damage")
    store = ActStore.open(root / "s.zarr", create=True)
    loaded = tiny_loaded("llama")
    ids = []
    for name in ("victim", "bystander"):
        sc = scenario_from_dict({
            "name": name, "model": {"id": "tiny", "dtype": "float32", "device": "cpu"},
            "prompt": {"messages": SAMPLE_MESSAGES}, "generation": {"max_new_tokens": 5},
            "capture": {"store_dtype": "float16"},
            "reference_states": [{"label": "calm", "messages": [{"role": "user", "content": "Be calm."}]}],
        })  # fmt: skip
        ids.append(capture_run(sc, store, loaded, progress=False).run_id)
    out: dict[str, Any] = {"path": root / "s.zarr", "victim": ids[0], "bystander": ids[1]}
    out["answers"] = _answers(root / "s.zarr", ids, root / "pristine")
    return out


def _answers(path: Path, ids: list[str], work: Path) -> dict[str, Any]:
    """Every reader's answer on a store: CLI outputs (or their failure) and API values."""
    ans: dict[str, Any] = {}
    for q in METRIC_QUERIES:
        for skip in ([], ["--skip-damaged"]):
            ans[("query", *q, *skip)] = _invoke(path, "query", *q, "--format", "csv", *skip)
    for run_id in ids:
        for q in (["trajectory", "--run", run_id, "--layer", "1", "--neuron", "3"],
                  ["cross-layer", "--run", run_id, "--source", "mlp_down_out"],
                  ["decomposition", "--run", run_id]):  # fmt: skip
            ans[("query", *q)] = _invoke(path, "query", *q, "--format", "csv")
        ans[("inspect", run_id)] = _invoke(path, "inspect", run_id)
        out = work / f"export-{run_id}"
        ans[("export", run_id)] = (_invoke(path, "export", "npz", run_id, "--out", str(out), "-q"), out)
        ans[("api", run_id)] = _api_answers(path, run_id)
    ans[("ls",)] = _invoke(path, "ls", "--format", "json")
    rep = work / "report"
    ans[("report",)] = (_invoke(path, "report", "--out", str(rep), "-q"), rep)
    return ans


def _api_answers(path: Path, run_id: str) -> Any:
    try:
        run = ActStore.open(path).run(run_id)
        return {
            "heatmap": api.heatmap(run, "hidden_out", 1, 0)["z"],
            "attn": api.heatmap(run, "attn_weights", 1, 0)["z"],
            "top": api.top_neurons(run, "mlp_up", 2, 2),
            "trajectory": api.trajectory(run, "hidden_out", 1, 5),
            "decomposition": api.decomposition(run, 3),
        }
    except (DamagedRunError, RunNotFoundError) as e:  # damaged, or its entry unreadable (not listed)
        return e


# ---- damage -------------------------------------------------------------------------------------
def _shard(store: Path, run: str, array: str) -> Path:
    return store / naming.run_path(run) / naming.ACTS_GROUP / array / "c" / "0" / "0" / "0"


def _delete_shard(store: Path, run: str) -> None:
    _shard(store, run, "residual").unlink()


def _truncate_shard(store: Path, run: str) -> None:
    p = _shard(store, run, "mlp_up")
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _flip_bytes(store: Path, run: str) -> None:
    for array in ("residual", "q", "attn_out"):  # a flipped byte in every inner chunk's data
        p = _shard(store, run, array)
        b = bytearray(p.read_bytes())
        for i in range(64, len(b) - 200, 97):
            b[i] ^= 0x5A
        p.write_bytes(bytes(b))


def _corrupt_run_metadata(store: Path, run: str) -> None:
    (store / naming.run_path(run) / "zarr.json").write_text("{ not json")


def _corrupt_array_metadata(store: Path, run: str) -> None:
    # readers use the run's consolidated copy: their answers stay right; check must see it
    (store / naming.run_path(run) / naming.ACTS_GROUP / "q" / "zarr.json").write_text("[]")


def _catalog_entry(store: Path, run: str) -> Path:
    return store / naming.catalog_key(run)


def _catalog_id_of_other(store: Path, run: str) -> None:
    p = _catalog_entry(store, run)
    other = next(q.stem for q in p.parent.glob("*.json") if q.stem != run)
    p.write_text(json.dumps({**json.loads(p.read_text()), "id": other}))


def _catalog_without_id(store: Path, run: str) -> None:
    p = _catalog_entry(store, run)
    entry = json.loads(p.read_text())
    del entry["id"]
    p.write_text(json.dumps(entry))


def _catalog_unreadable(store: Path, run: str) -> None:
    _catalog_entry(store, run).write_text("\x00garbage")


def _leftovers(store: Path, run: str) -> None:
    """What killed writers leave: an orphan run group and a catalog temp file."""
    shutil.copytree(store / naming.run_path(run), store / naming.RUNS_PREFIX / "ghost_20260101T000000_abcdef")
    (store / naming.CATALOG_PREFIX / ".tmp-k1ll3d").write_text('{"id": "half')


# damage -> what check must report about it
DAMAGE: dict[str, tuple[Callable[[Path, str], None], str]] = {
    "object deleted": (_delete_shard, "missing"),
    "shard truncated": (_truncate_shard, "damaged"),
    "bytes flipped": (_flip_bytes, "damaged"),
    "run metadata corrupt": (_corrupt_run_metadata, "damaged"),
    "array metadata corrupt": (_corrupt_array_metadata, "damaged"),
    "catalog id of another run": (_catalog_id_of_other, "inconsistent"),
    "catalog entry without id": (_catalog_without_id, "inconsistent"),
    "catalog entry unreadable": (_catalog_unreadable, "damaged"),
    "leftovers of killed writers": (_leftovers, "orphaned"),
}


@pytest.fixture(scope="module", params=list(DAMAGE))
def damaged(request: Any, pristine: dict[str, Any], tmp_path_factory: Any) -> dict[str, Any]:
    work = tmp_path_factory.mktemp("damaged")
    path = work / "s.zarr"
    shutil.copytree(pristine["path"], path)
    fn, problem = DAMAGE[request.param]
    fn(path, pristine["victim"])
    ids = [pristine["victim"], pristine["bystander"]]
    return {**pristine, "pristine_answers": pristine["answers"], "kind": request.param, "path": path,
            "problem": problem, "answers": _answers(path, ids, work)}  # fmt: skip


# ---- the matrix ---------------------------------------------------------------------------------
def _one_line_naming(res: Any, run_id: str) -> None:
    assert res.exit_code == 2, res.output
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    err = [line for line in lines if not line.startswith("warning:")]  # damage seen on the way
    assert len(err) == 1 and err[0].startswith("error:") and run_id in err[0], res.stderr
    assert "Traceback" not in res.output


def _rows_without(df: pd.DataFrame, run_id: str) -> pd.DataFrame:
    keep = ~df.astype(str).apply(lambda col: col.str.contains(run_id, regex=False)).any(axis=1)
    return df[keep].reset_index(drop=True)


def test_metric_queries_never_answer_a_wrong_number(damaged: dict[str, Any]) -> None:
    victim, before, after = damaged["victim"], damaged["pristine_answers"], damaged["answers"]
    for key, res in after.items():
        if key[0] != "query" or key[1] not in ("cosine", "mae", "jaccard"):
            continue
        want = _csv(before[key].stdout)
        if res.exit_code != 0:  # stopped: one line that names the damaged run
            assert "--skip-damaged" not in key, (damaged["kind"], key, res.output)
            _one_line_naming(res, victim)
            continue
        got = _csv(res.stdout)
        if victim not in set(got.astype(str).stack()):
            # answered without the victim: it was skipped by name (or never listed)
            assert victim in res.stderr, (damaged["kind"], key, res.stderr)
            want = _rows_without(want, victim)
            got = got.reset_index(drop=True)
        pd.testing.assert_frame_equal(got, want, check_exact=True, check_dtype=bool(len(got)),
                                      obj=f"{damaged['kind']}: {key}")


def test_single_run_readers_answer_right_or_name_the_run(damaged: dict[str, Any]) -> None:
    victim, bystander = damaged["victim"], damaged["bystander"]
    before, after = damaged["pristine_answers"], damaged["answers"]
    for key, res in after.items():
        if key[0] != "query" or key[1] in ("cosine", "mae", "jaccard"):
            continue
        if res.exit_code != 0:
            assert victim in key, (damaged["kind"], key, res.output)  # the bystander always answers
            _one_line_naming(res, victim)
        else:
            assert res.stdout == before[key].stdout, (damaged["kind"], key)
    for run_id in (victim, bystander):
        res = after[("inspect", run_id)]
        if res.exit_code != 0:
            assert run_id == victim
            _one_line_naming(res, victim)
        else:
            assert res.stdout == before[("inspect", run_id)].stdout
    assert after[("inspect", bystander)].exit_code == 0


def test_view_api_answers_right_or_raises_naming_the_run(damaged: dict[str, Any]) -> None:
    before, after = damaged["pristine_answers"], damaged["answers"]
    for run_id in (damaged["victim"], damaged["bystander"]):
        got, want = after[("api", run_id)], before[("api", run_id)]
        if isinstance(got, Exception):
            assert run_id == damaged["victim"] and run_id in str(got)
            continue
        assert json.dumps(got, sort_keys=True, default=str) == json.dumps(want, sort_keys=True, default=str)


def test_export_writes_the_same_files_or_nothing(damaged: dict[str, Any]) -> None:
    before, after = damaged["pristine_answers"], damaged["answers"]
    for run_id in (damaged["victim"], damaged["bystander"]):
        res, out = after[("export", run_id)]
        _, want_dir = before[("export", run_id)]
        if res.exit_code != 0:
            assert run_id == damaged["victim"]
            _one_line_naming(res, run_id)
            assert not out.exists() or not any(out.rglob("*.npz")), "a failed export left files"
            continue
        files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
        assert files == sorted(p.relative_to(want_dir) for p in want_dir.rglob("*") if p.is_file())
        for rel in (f for f in files if f.suffix == ".npz"):
            with np.load(out / rel) as a, np.load(want_dir / rel) as b:
                assert sorted(a.files) == sorted(b.files)
                for k in a.files:
                    np.testing.assert_array_equal(a[k], b[k], err_msg=f"{rel}:{k}")


def test_report_skips_the_damaged_run_by_name(damaged: dict[str, Any]) -> None:
    victim = damaged["victim"]
    (res, out), (_, out0) = damaged["answers"][("report",)], damaged["pristine_answers"][("report",)]
    assert res.exit_code == 0, res.output
    for csv in sorted(out0.glob("*.csv")):
        got, want = pd.read_csv(out / csv.name), pd.read_csv(csv)
        if victim not in set(got.astype(str).stack()):  # else its rows must be exactly right
            if victim in set(want.astype(str).stack()):
                assert victim in res.stderr, res.stderr  # left out, and said so
            got, want = _rows_without(got, victim), _rows_without(want, victim)
        got, want = got.drop(columns=["pair"], errors="ignore"), want.drop(columns=["pair"], errors="ignore")
        pd.testing.assert_frame_equal(got.reset_index(drop=True), want.reset_index(drop=True), check_exact=True,
                                      check_dtype=bool(len(got)), obj=f"{damaged['kind']}: {csv.name}")


def test_ls_lists_each_run_once(damaged: dict[str, Any]) -> None:
    res = damaged["answers"][("ls",)]
    assert res.exit_code == 0, res.output
    ids = [r["id"] for r in json.loads(res.stdout)]
    assert len(ids) == len(set(ids)) and damaged["bystander"] in ids
    if damaged["kind"] == "catalog entry unreadable":
        assert damaged["victim"] not in ids
        assert "warning:" in res.stderr and damaged["victim"] in res.stderr  # never hidden silently
    else:
        assert damaged["victim"] in ids


def test_check_finds_it_and_gc_clears_leftovers(damaged: dict[str, Any]) -> None:
    path, kind = damaged["path"], damaged["kind"]
    res = _invoke(path, "check", "-q")
    assert res.exit_code == 1, (kind, res.output)
    found = [line.split()[0] for line in res.stdout.splitlines() if line.split()[0] in
             ("damaged", "missing", "inconsistent", "orphaned", "temporary")]  # fmt: skip
    assert damaged["problem"] in found, (kind, res.output)
    if kind == "leftovers of killed writers":
        assert "temporary" in found
        dry = _invoke(path, "gc", "--min-age", "0", "--no-cache")
        assert dry.exit_code == 0 and "would remove" in dry.stdout
        assert _invoke(path, "check", "-q").exit_code == 1  # a dry run removed nothing
        assert _invoke(path, "gc", "--apply", "--min-age", "0", "--no-cache").exit_code == 0
        assert _invoke(path, "check", "-q").exit_code == 0
        assert not (path / naming.RUNS_PREFIX / "ghost_20260101T000000_abcdef").exists()


def test_the_undamaged_store_checks_clean(pristine: dict[str, Any]) -> None:
    res = _invoke(pristine["path"], "check", "-q")
    assert res.exit_code == 0, res.output
    assert "checked 2 runs" in res.stdout and "no problems" in res.stdout


@pytest.mark.parametrize("damage", ["garbled", "missing"])
def test_a_group_that_does_not_open_is_named_with_its_cause(tmp_path: Path, damage: str) -> None:
    """The error names the run and the first line of why its group did not open, with the
    exception's type (what a researcher searches for)."""
    location = tmp_path / "s.zarr"
    write_synthetic_run(ActStore.open(location, create=True), n_layers=2, prompt_len=8, n_steps=3, width=16)
    run_id = ActStore.open(location).run_ids()[0]
    meta = location / naming.run_path(run_id) / "zarr.json"
    if damage == "garbled":
        meta.write_text('{"zarr_format": 3,\n "node_type": "group", "attributes": {"a": ')
        cause = "(JSONDecodeError: Expecting value: line 2 column 44"
    else:
        meta.unlink()
        cause = "(FileNotFoundError: "
    with pytest.raises(DamagedRunError) as info:
        ActStore.open(location).runs([run_id])
    message = str(info.value)
    assert message.startswith(f"run {run_id} is damaged: its group does not open {cause}"), message
    assert "\n" not in message
