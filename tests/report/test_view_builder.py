"""The scenario builder's server side: files confined to the scenarios folder, saves
that never half-write or silently replace, and capture jobs run in a child process
(a real SmolLM2 capture; a cancelled one leaves nothing in the store)."""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from actstore.errors import SelectionError
from actstore.store.store import ActStore
from actstore.view import serve
from actstore.view.builder import CaptureJobs, ScenarioFolder

GOOD = """name: tiny_job
model: {id: smollm2, dtype: float32, device: cpu}
prompt:
  messages:
    - {role: user, content: "Say hi."}
generation: {max_new_tokens: 2, do_sample: false}
capture: {layers: [0], attention_weights: false, qkv: false, mlp: false, logits: false}
"""


@pytest.fixture
def folder(tmp_path: Path) -> ScenarioFolder:
    root = tmp_path / "scenarios"
    root.mkdir()
    (root / "a.yaml").write_text(GOOD)
    (root / "b.yml").write_text(GOOD)
    (root / ".hidden.yaml").write_text(GOOD)
    (root / "notes.txt").write_text("not a scenario")
    (tmp_path / "outside.yaml").write_text("secret: 1\n")
    (root / "link.yaml").symlink_to(tmp_path / "outside.yaml")
    return ScenarioFolder(root)


def test_lists_only_plain_scenario_files(folder: ScenarioFolder) -> None:
    assert [f["name"] for f in folder.files()] == ["a.yaml", "b.yml"]
    assert folder.read("a.yaml") == GOOD


@pytest.mark.parametrize("name", ["../outside.yaml", "/etc/passwd", "sub/a.yaml", "..\\a.yaml", ".hidden.yaml",
                                  "notes.txt", "", "a.yaml/", "link.yaml", "%2e%2e/outside.yaml"])  # fmt: skip
def test_nothing_outside_the_folder_is_read_or_written(folder: ScenarioFolder, name: str, tmp_path: Path) -> None:
    with pytest.raises(SelectionError) as err:
        folder.read(name)
    assert "\n" not in str(err.value) and str(tmp_path) not in str(err.value)
    with pytest.raises(SelectionError):
        folder.save(name, "name: x\n", overwrite=True)
    assert (tmp_path / "outside.yaml").read_text() == "secret: 1\n"


def test_save_refuses_to_replace_unless_asked_and_leaves_no_temp_file(folder: ScenarioFolder) -> None:
    with pytest.raises(SelectionError, match="exists"):
        folder.save("a.yaml", "name: other\n")
    assert folder.read("a.yaml") == GOOD
    folder.save("a.yaml", "name: other\n", overwrite=True)
    assert folder.read("a.yaml") == "name: other\n"
    folder.save("new.yaml", "name: new\n")
    assert sorted(p.name for p in folder.root.iterdir()) == [
        ".hidden.yaml", "a.yaml", "b.yml", "link.yaml", "new.yaml", "notes.txt"
    ]  # fmt: skip


def _wait(jobs: CaptureJobs, job_id: int, states: tuple[str, ...], timeout: float = 240.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = jobs.get(job_id)
        if job["state"] in states:
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} still {jobs.get(job_id)}")


@pytest.mark.slow  # subprocesses, a browser or many captures: the full suite runs it
def test_a_launched_capture_runs_in_the_background_and_its_run_is_committed(
    folder: ScenarioFolder, tmp_path: Path
) -> None:
    location = str(tmp_path / "store.zarr")
    jobs = CaptureJobs(folder, location)
    try:
        first = jobs.launch("a.yaml")
        second = jobs.launch("b.yml")  # waits for the first: one capture at a time
        assert jobs.get(second["id"])["state"] == "queued"
        done = _wait(jobs, first["id"], ("done", "failed"))
        assert done["state"] == "done", done["log"]
        done2 = _wait(jobs, second["id"], ("done", "failed"))
        assert done2["state"] == "done", done2["log"]
    finally:
        jobs.close()
    store = ActStore.open(location)
    assert store.run_ids() == [*done["runs"], *done2["runs"]] and len(store.run_ids()) == 2
    run = store.run(done["runs"][0])
    assert run.layers == [0] and run.n_steps == 2
    assert done["total"] > 0 and done["done"] == done["total"]  # the capture's progress bar, parsed
    with pytest.raises(SelectionError, match="save it first"):
        jobs.launch("missing.yaml")


@pytest.mark.slow
def test_a_cancelled_capture_leaves_nothing_in_the_store(folder: ScenarioFolder, tmp_path: Path) -> None:
    long = GOOD.replace("max_new_tokens: 2", "max_new_tokens: 400").replace("name: tiny_job", "name: long_job")
    folder.save("long.yaml", long)
    location = str(tmp_path / "store.zarr")
    jobs = CaptureJobs(folder, location)
    try:
        kept = _wait(jobs, jobs.launch("a.yaml")["id"], ("done", "failed"))  # a run the kill must not touch
        assert kept["state"] == "done", kept["log"]
        job = jobs.launch("long.yaml")
        queued = jobs.launch("b.yml")
        jobs.cancel(queued["id"])  # still waiting: it never starts
        deadline = time.monotonic() + 120
        while True:  # decoding: its run group exists
            now = jobs.get(job["id"])
            if now["progress"].startswith("capture long_job") and now["done"] >= 3:
                break
            assert time.monotonic() < deadline and now["state"] in ("queued", "running"), now
            time.sleep(0.1)
        jobs.cancel(job["id"])
        ended = _wait(jobs, job["id"], ("cancelled", "done", "failed"))
    finally:
        jobs.close()
    assert ended["state"] == "cancelled" and jobs.get(queued["id"])["state"] == "cancelled"
    runs = Path(location) / "runs"
    assert [p.name for p in runs.iterdir() if p.is_dir()] == kept["runs"]  # the group it was writing is gone
    store = ActStore.open(location)
    assert store.run_ids() == kept["runs"] and store.run(kept["runs"][0]).n_steps == 2


# ---- over HTTP: what writes is a POST with the token --------------------------------------------
def _request(url: str, body: dict[str, Any] | None = None, token: str | None = None) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["X-Actstore-Token"] = token
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers=headers, method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_builder_routes_are_confined_and_writes_need_the_token(
    two_run_store: ActStore, loaded: Any, folder: ScenarioFolder, tmp_path: Path
) -> None:
    server = serve(two_run_store, "latest", port=0, model=loaded, scenarios=folder.root)
    base = f"http://127.0.0.1:{server.port}/api/"
    token = server.policy.token
    try:
        status, body = _request(base + "scenarios")
        assert status == 200 and [f["name"] for f in body["files"]] == ["a.yaml", "b.yml"]
        assert body["folder"] == "scenarios"  # its name, not where it lives
        for name in ("../outside.yaml", "link.yaml", "/etc/passwd"):
            status, body = _request(base + "scenario?name=" + urllib.request.quote(name))
            assert status == 400 and "\n" not in body["error"] and str(tmp_path) not in body["error"], body
        status, _ = _request(base + "save", {"name": "c.yaml", "text": GOOD})  # no token
        assert status in (401, 403) and not (folder.root / "c.yaml").exists()
        status, body = _request(base + "save", {"name": "c.yaml", "text": GOOD}, token)
        assert status == 200 and (folder.root / "c.yaml").read_text() == GOOD, body
        status, _ = _request(base + "save", {"name": "c.yaml", "text": "name: x\n"}, token)
        assert status == 400 and (folder.root / "c.yaml").read_text() == GOOD
        status, body = _request(base + "clone?run=" + two_run_store.run_ids()[0])
        assert status == 200 and body["text"].startswith("name: mood_a")
        status, _ = _request(base + "launch?name=a.yaml")  # a GET never starts a job
        assert status == 405
        assert os.listdir(folder.root) == os.listdir(folder.root)  # nothing else written
    finally:
        server.shutdown()
