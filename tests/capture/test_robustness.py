"""A killed capture, concurrent captures, and bad input: the store stays consistent."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from actstore.capture.runner import capture_run
from actstore.cli import main
from actstore.store.store import ActStore

from .conftest import loaded_tiny, make_scenario

CAPTURE_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.path[:0] = {paths!r}
    from conftest import loaded_tiny, make_scenario
    from actstore.capture.runner import capture_run
    from actstore.store.store import ActStore
    store = ActStore.open(sys.argv[1], create=True)
    sc = make_scenario(name=sys.argv[3], generation={{"max_new_tokens": int(sys.argv[2])}},
                       capture={{"attention_weights": False, "store_dtype": "float16"}})
    loaded = loaded_tiny("llama", eager=False)
    loaded.model.config.max_position_embeddings = 8192  # rope runs past it; capture checks it
    print(capture_run(sc, store, loaded, progress=False).run_id, flush=True)
    """
)


def _spawn(store: Path, tokens: int, name: str) -> subprocess.Popen[str]:
    here = str(Path(__file__).parent)
    script = CAPTURE_SCRIPT.format(paths=[here, *sys.path])
    return subprocess.Popen(
        [sys.executable, "-c", script, str(store), str(tokens), name],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


@pytest.mark.slow  # subprocesses, a browser or many captures: the full suite runs it
def test_killed_capture_leaves_store_consistent(tmp_path: Path) -> None:
    location = tmp_path / "store.zarr"
    store = ActStore.open(location, create=True)
    first = capture_run(make_scenario(), store, loaded_tiny("llama"), progress=False)
    before = store.run(first.run_id).array("hidden_out").compute()

    proc = _spawn(location, 4000, "doomed")
    runs_dir = location / "runs"
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until the doomed run's group exists, then a bit more
        if any(p.name.startswith("doomed") for p in runs_dir.iterdir()):
            break
        time.sleep(0.05)
    else:
        proc.kill()
        raise AssertionError(f"capture never started: {proc.stderr.read() if proc.stderr else ''}")
    time.sleep(1.0)
    assert proc.poll() is None, "capture finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()

    reopened = ActStore.open(location)
    assert reopened.run_ids() == [first.run_id]
    np.testing.assert_array_equal(reopened.run(first.run_id).array("hidden_out").compute(), before)
    orphans = reopened.orphans()
    assert len(orphans) == 1 and orphans[0].startswith("doomed")
    result = CliRunner().invoke(main, ["ls", "--store", str(location), "--format", "csv"])
    assert result.exit_code == 0 and "doomed" not in result.output


@pytest.mark.slow  # subprocesses, a browser or many captures: the full suite runs it
def test_two_concurrent_captures_both_land(tmp_path: Path) -> None:
    location = tmp_path / "shared.zarr"  # neither process finds an existing store
    procs = [_spawn(location, 30, f"writer{i}") for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err
    ids = sorted(o.strip() for o, _ in outs)
    store = ActStore.open(location)
    assert sorted(store.run_ids()) == ids
    for run_id in ids:
        run = store.run(run_id)
        assert run.array("hidden_out").shape[1] == run.n_positions
        assert np.isfinite(run.array("hidden_out").compute()).all()


def _invoke(args: list[str]) -> Any:
    return CliRunner().invoke(main, args)


def test_bad_scenarios_exit_2_with_one_line_and_write_nothing(tmp_path: Path) -> None:
    location = tmp_path / "store.zarr"
    cases = {
        "unknown_key.yaml": "name: x\nmodel: {id: smollm2}\nprompt: {messages: [{role: user, content: hi}]}\nbogus: 1\n",
        "bad_role.yaml": "name: x\nmodel: {id: smollm2}\nprompt: {messages: [{role: bot, content: hi}]}\n",
        "syntax.yaml": "name: x\nmodel: {id: smollm2\n",
        "empty.yaml": "name: x\nmodel: {id: smollm2}\nprompt: {messages: []}\n",
        "label.yaml": (
            "name: x\nmodel: {id: smollm2}\nprompt: {messages: [{role: user, content: hi}]}\n"
            "reference_states: [{label: a b, messages: [{role: user, content: x}]}]\n"
        ),
    }
    for fname, text in cases.items():
        path = tmp_path / fname
        path.write_text(text)
        strict = ["--strict"] if fname == "unknown_key.yaml" else []  # else a warning, and it loads
        result = _invoke(["capture", str(path), "--store", str(location), *strict])
        assert result.exit_code == 2, (fname, result.output)
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 1 and fname in lines[0], (fname, result.output)
        assert "Traceback" not in result.output
    missing = _invoke(["capture", str(tmp_path / "nope.yaml"), "--store", str(location)])
    assert missing.exit_code == 2 and "nope.yaml" in missing.output
    assert not location.exists()


def test_layer_out_of_range_fails_before_writing(tmp_path: Path) -> None:
    store = ActStore.open(tmp_path / "s.zarr", create=True)
    sc = make_scenario(capture={"layers": [0, 99]})
    try:
        capture_run(sc, store, loaded_tiny("llama"), progress=False)
    except ValueError as e:
        assert "capture.layers" in str(e)
    else:
        raise AssertionError("expected a ScenarioError")
    assert store.run_ids() == [] and store.orphans() == []


def test_unknown_run_and_missing_store_exit_2(tmp_path: Path) -> None:
    result = _invoke(["inspect", "nope", "--store", str(tmp_path / "none.zarr")])
    assert result.exit_code == 2 and result.output.startswith("error:")
    ActStore.open(tmp_path / "empty.zarr", create=True)
    result = _invoke(["inspect", "nope", "--store", str(tmp_path / "empty.zarr")])
    assert result.exit_code == 2 and "no committed runs" in result.output
