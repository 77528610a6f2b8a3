"""Activation Lab's multi-prompt scenarios: a list of prompts is one run per prompt (per
message prefix where run_at_each_message), in order; each run equals a separate
single-prompt capture of its prompt; the references are captured once and every run
answers for them; one scenario-run id selects them all."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from actstore import naming
from actstore.capture import runner
from actstore.capture.runner import capture, capture_run
from actstore.cli import main
from actstore.query.states import state_vectors
from actstore.store.store import ActStore

from .conftest import MESSAGES, REFERENCES, loaded_tiny, make_scenario

PROMPTS: list[dict[str, Any]] = [
    {"messages": MESSAGES},
    {"messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Sky colour?"},
                  {"role": "assistant", "content": "Blue."}], "run_at_each_message": True},
    {"messages": [{"role": "user", "content": "Say hi."}]},
]  # fmt: skip
# (prompt index, messages of that prompt the run holds), in capture order
EXPECTED_RUNS = [(0, 4), (1, 1), (1, 2), (1, 3), (2, 1)]


def arrays(group: zarr.Group) -> dict[str, np.ndarray]:
    """Every stored array of a run group, by path."""
    return {path: np.asarray(a[...]) for path, a in group.members(max_depth=None) if isinstance(a, zarr.Array)}


@pytest.fixture(scope="module")
def loaded() -> Any:
    return loaded_tiny("llama")


@pytest.fixture(scope="module")
def captured(loaded: Any, tmp_path_factory: Any) -> tuple[ActStore, list[Any], int]:
    store = ActStore.open(tmp_path_factory.mktemp("multi") / "store.zarr", create=True)
    calls = []
    real = runner._reference_passes

    def counting(*args: Any) -> Any:
        calls.append(1)
        return real(*args)

    mp = pytest.MonkeyPatch()
    mp.setattr(runner, "_reference_passes", counting)
    try:
        results = capture(make_scenario(prompt=PROMPTS), store, loaded=loaded, progress=False)
    finally:
        mp.undo()
    return store, results, len(calls)


def single(loaded: Any, prompt: dict[str, Any], tmp_path: Any, name: str) -> tuple[Any, dict[str, np.ndarray]]:
    """A separate single-prompt capture of one prompt, in its own store."""
    store = ActStore.open(tmp_path / f"{name}.zarr", create=True)
    res = capture_run(make_scenario(prompt=prompt), store, loaded, progress=False)
    run = store.run(res.run_id)
    return run, arrays(run.group)


def test_one_run_per_prompt_and_prefix_in_order(captured: Any) -> None:
    store, results, _ = captured
    runs = [store.run(r.run_id) for r in results]
    got = [(r.meta["prompt_index"], len(r.scenario["prompt"]["messages"])) for r in runs]
    assert got == EXPECTED_RUNS
    for r, (i, k) in zip(runs, EXPECTED_RUNS, strict=True):
        assert r.scenario["prompt"]["messages"] == PROMPTS[i]["messages"][:k]
    assert [e["id"] for e in store.catalog_entries()] == [r.run_id for r in results]  # oldest first


def test_each_run_equals_a_separate_single_prompt_capture(captured: Any, loaded: Any, tmp_path: Any) -> None:
    store, results, _ = captured
    refs_prefix = naming.REFERENCES_GROUP + "/"
    for n, (res, (i, k)) in enumerate(zip(results, EXPECTED_RUNS, strict=True)):
        prompt = {"messages": PROMPTS[i]["messages"][:k]}
        alone, expected = single(loaded, prompt, tmp_path, f"single{n}")
        run = store.run(res.run_id)
        got = arrays(run.group)
        assert sorted(got) == sorted(expected)
        assert got[f"{naming.SNAPSHOTS_GROUP}/hidden_out"].dtype == np.float32  # so equality is bit for bit
        assert any(p.startswith(naming.SNAPSHOTS_GROUP) for p in got) and any(p.startswith(refs_prefix) for p in got)
        for path, want in expected.items():
            if (path.startswith(refs_prefix) or path.startswith(naming.PASSES_GROUP + "/")) and n > 0:
                continue  # the first run's references (below); the passes hold no reference rows
            assert got[path].dtype == want.dtype
            np.testing.assert_array_equal(got[path], want, err_msg=f"run {n} {path}")
        assert run.steps == alone.steps and run.generated_text() == alone.generated_text()
        for k, _ in enumerate(run.snapshot_index):  # full snapshots, the generated one included
            for source in run.sources:
                np.testing.assert_array_equal(
                    run.pass_array("snapshot", k, source).compute(), alone.pass_array("snapshot", k, source).compute()
                )


def test_references_captured_once_and_served_by_every_run(captured: Any, loaded: Any, tmp_path: Any) -> None:
    store, results, ref_passes = captured
    assert ref_passes == 1  # one pass per reference for the file, not per run
    runs = [store.run(r.run_id) for r in results]
    labels = [r["label"] for r in REFERENCES]
    assert all(r.reference_labels == labels for r in runs)
    _, first_alone = single(loaded, PROMPTS[0], tmp_path, "first")
    refs = {p: a for p, a in first_alone.items() if p.startswith(naming.REFERENCES_GROUP + "/")}
    assert refs
    for run in runs:
        got = arrays(run.group)
        for path, want in refs.items():
            np.testing.assert_array_equal(got[path], want)  # bit for bit, float32
        for j, label in enumerate(labels):  # reference:LABEL on every run
            vec = state_vectors(run, f"reference:{label}", "hidden_out").compute()
            np.testing.assert_array_equal(vec, want_ref(first_alone, j))
            # the full pass is stored once, in the first run, and every run serves it
            assert run.meta.get("references_run", run.id) == runs[0].id
            full = run.pass_array("reference", label, "hidden_out").compute()
            np.testing.assert_array_equal(full, runs[0].pass_array("reference", label, "hidden_out").compute())
            np.testing.assert_array_equal(full[:, -1], vec.astype(full.dtype))
    assert all(p.kind == "snapshot" for r in runs[1:] for p in r.passes)
    # A separate capture of another prompt computes the same references (its own prefill
    # seeds them, so equal within float32 rounding).
    _, last_alone = single(loaded, PROMPTS[2], tmp_path, "last")
    for path, want in refs.items():
        np.testing.assert_allclose(last_alone[path], want, atol=2e-5, rtol=1e-4)


def want_ref(stored: dict[str, np.ndarray], j: int) -> np.ndarray:
    return stored[f"{naming.REFERENCES_GROUP}/hidden_out"][j]


def test_scenario_run_id_selects_every_run(captured: Any) -> None:
    store, results, _ = captured
    ids = [r.run_id for r in results]
    entries = store.catalog_entries()
    [sr] = {e["scenario_run"] for e in entries}
    assert sr not in ids and sr.startswith("tiny_")
    assert all(store.run(i).meta["scenario_run"] == sr for i in ids)
    assert store.resolve(sr) == ids
    assert store.resolve_many([sr, ids[0]]) == ids
    assert store.run(sr).id == ids[-1]  # where one run is needed: its latest
    assert [r.id for r in store.runs([sr])] == ids


def test_cli_ls_shows_the_scenario_run_and_run_arguments_take_it(captured: Any) -> None:
    store, results, _ = captured
    sr = store.catalog_entries()[0]["scenario_run"]
    cli = CliRunner()
    res = cli.invoke(main, ["ls", "--store", store.location, "--format", "json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)
    assert [(r["id"], r["scenario_run"]) for r in rows] == [(r.run_id, sr) for r in results]
    table = cli.invoke(main, ["ls", "--store", store.location]).stdout.splitlines()
    assert "scenario_run" in table[0].split() and all(sr in line for line in table[1:])
    res = cli.invoke(main, ["inspect", sr, "--store", store.location])
    assert res.exit_code == 0 and f"run        {results[-1].run_id}" in res.stdout, res.output
    assert f"(scenario run {sr}, prompt 2)" in res.stdout
    res = cli.invoke(main, ["check", sr, "--store", store.location])
    assert res.exit_code == 0 and f"checked {len(results)} runs" in res.stdout, res.output
    res = cli.invoke(main, ["inspect", sr + "x", "--store", store.location])
    assert res.exit_code == 2 and res.stderr.count("\n") == 1 and "no run matches" in res.stderr


def test_single_prompt_capture_has_a_scenario_run_of_its_own(loaded: Any, store: ActStore) -> None:
    [a] = capture(make_scenario(), store, loaded=loaded, progress=False)
    [b] = capture(make_scenario(), store, loaded=loaded, progress=False)
    sr_a, sr_b = (store.run(r.run_id).meta["scenario_run"] for r in (a, b))
    assert sr_a != sr_b and store.resolve(sr_a) == [a.run_id] and store.resolve(sr_b) == [b.run_id]
    alone = capture_run(make_scenario(), store, loaded, progress=False)
    assert store.run(alone.run_id).meta["scenario_run"] == alone.run_id
    assert store.run(alone.run_id).meta["prompt_index"] is None


def test_every_prompt_is_checked_before_the_store_is_created(loaded: Any, tmp_path: Any) -> None:
    from actstore.errors import ScenarioError

    too_long = {"messages": [{"role": "user", "content": "word " * 600}]}  # > the tiny model's 512
    location = tmp_path / "never.zarr"
    with pytest.raises(ScenarioError, match=r": prompt\[1\]\.messages: the prompt is \d+ tokens .*\(shorten prompt\[1\]\.messages"):
        capture(make_scenario(prompt=[PROMPTS[2], too_long]), str(location), loaded=loaded, progress=False)
    assert not location.exists()  # the first prompt fits, but nothing was captured


def test_cli_captures_activation_labs_multi_prompt_file(tmp_path: Any) -> None:
    """Activation Lab's multi-prompt fixture file, with only the model (and its layers)
    swapped for a saved tiny model: one output line per run, in order, one scenario run."""
    import yaml

    from actstore.testing import tiny_model

    folder = tmp_path / "tiny-llama"
    model, tok = tiny_model("llama", seed=3)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    data = {
        "name": "seed_fixture_multi",
        "model": {"id": str(folder), "dtype": "float32", "device": "cpu"},
        "prompt": [{"messages": [{"role": "user", "content": "Say hi."}]},
                   {"run_at_each_message": True, "messages": [{"role": "system", "content": "Be terse."},
                                                               {"role": "user", "content": "Sky colour?"}]}],
        "generation": {"max_new_tokens": 2, "do_sample": False, "temperature": 0},
        "capture": {"layers": [0, 2], "attention_weights": False, "logits": False, "top_k_probs": 2},
        "reference_states": [{"label": "calm", "messages": [{"role": "user", "content": "All quiet."}]}],
    }  # fmt: skip
    path = tmp_path / "multi.yaml"
    path.write_text(yaml.safe_dump(data))
    location = str(tmp_path / "store.zarr")
    cli = CliRunner()
    res = cli.invoke(main, ["capture", str(path), "--store", location, "-q", "--strict"])
    assert res.exit_code == 0, res.output
    ids = [line.split("\t")[0] for line in res.stdout.splitlines()]
    assert len(ids) == 3 and res.stderr == ""
    rows = json.loads(cli.invoke(main, ["ls", "--store", location, "--format", "json"]).stdout)
    assert [r["id"] for r in rows] == ids and len({r["scenario_run"] for r in rows}) == 1
    store = ActStore.open(location)
    got = [(r.meta["prompt_index"], [m["content"] for m in r.scenario["prompt"]["messages"]]) for r in store.runs()]
    assert got == [(0, ["Say hi."]), (1, ["Be terse."]), (1, ["Be terse.", "Sky colour?"])]


@pytest.mark.slow  # subprocesses, a browser or many captures: the full suite runs it
def test_npz_export_and_import_keep_the_scenario_run(captured: Any, tmp_path: Any) -> None:
    import shutil

    from actstore.store.npz import export_npz, import_npz_dirs, read_seed_dirs
    from actstore.store.npz_lab import scenario_runs

    store, results, _ = captured
    run = store.run(results[1].run_id)
    everything = scenario_runs(run)  # what `actstore export npz RUN` writes: RUN's scenario run
    assert [r.id for r in everything] == [r.run_id for r in results]
    folder = export_npz(everything, tmp_path / "exported", quiet=True)
    assert sorted(p.name for p in folder.iterdir() if p.is_dir()) == [
        "prompt_0", "prompt_1_msg1of3", "prompt_1_msg2of3", "prompt_1_msg3of3", "prompt_2", "references",
    ]  # fmt: skip
    other = ActStore.open(tmp_path / "other.zarr", create=True)
    ids = import_npz_dirs(other, read_seed_dirs(folder), quiet=True)
    copies = [other.run(i) for i in ids]
    assert [(c.meta["scenario_run"], c.meta["prompt_index"], c.meta["message_prefix"]) for c in copies] == [
        (run.meta["scenario_run"], i, [k, 3] if i == 1 else None) for i, k in EXPECTED_RUNS
    ]
    assert other.resolve(run.meta["scenario_run"]) == ids
    # the reference passes come back once, in the first run; the others name it
    assert [c.meta.get("references_run") for c in copies] == [None, *[ids[0]] * (len(ids) - 1)]
    # imported again into the same store: a scenario run of its own (no prompt directory twice)
    again = import_npz_dirs(other, read_seed_dirs(folder), quiet=True)
    assert {other.run(i).meta["scenario_run"] for i in again} == {again[0]}
    # a directory without actstore's block (another tool's) is a scenario run of its own,
    # its prompt directories' names giving each run's place
    plain = tmp_path / "plain"
    shutil.copytree(folder, plain)
    for path in plain.glob("prompt_*/run.json"):
        run_json = json.loads(path.read_text())
        del run_json["actstore"]
        path.write_text(json.dumps(run_json))
    alone = [other.run(i) for i in import_npz_dirs(other, read_seed_dirs(plain), quiet=True)]
    assert {r.meta["scenario_run"] for r in alone} == {alone[0].id}
    assert [(r.meta["prompt_index"], r.meta["message_prefix"]) for r in alone] == [
        (i, [k, 3] if i == 1 else None) for i, k in EXPECTED_RUNS
    ]
