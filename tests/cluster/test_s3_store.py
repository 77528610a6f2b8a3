"""A store on (loopback) S3: capture straight into it, the commit marker, concurrent
writers, the catalog snapshot, and the CLI with a store URL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from actstore import naming
from actstore.capture.runner import capture
from actstore.query.compare import intra_run
from actstore.store import remote
from actstore.store.store import ActStore

from .helpers import HERE, cli_env, make_scenario, run_cli, write_scenario


def _assert_same_run(a: Any, b: Any, exact: bool = True) -> None:
    """Every source, snapshot and reference array of two runs holds the same numbers."""
    check = np.testing.assert_array_equal if exact else (
        lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6))  # fmt: skip
    assert a.sources == b.sources and a.n_positions == b.n_positions and a.layers == b.layers
    np.testing.assert_array_equal(a.tokens(), b.tokens())
    for source in a.sources:
        check(a.array(source).compute(), b.array(source).compute())
    for source in naming.RESIDUAL_SOURCES:
        check(a.snapshots(source).compute(), b.snapshots(source).compute())
        check(a.references(source).compute(), b.references(source).compute())


def test_capture_into_s3_equals_local_disk(
    tiny_folder: Path, tiny_loaded: Any, s3_url: str, s3_options: dict[str, Any], tmp_path: Path
) -> None:
    sc = make_scenario(tiny_folder, "same")  # every flag on, attention weights and logits included
    loaded = tiny_loaded
    [local] = capture(sc, str(tmp_path / "local.zarr"), loaded=loaded, progress=False)
    [remote_run] = capture(sc, s3_url, loaded=loaded, progress=False, storage_options=s3_options)

    disk = ActStore.open(tmp_path / "local.zarr").run(local.run_id)
    s3 = ActStore.open(s3_url, storage_options=s3_options).run(remote_run.run_id)
    assert "attn_weights" in s3.sources and "logits" in s3.sources
    _assert_same_run(disk, s3)
    a, b = intra_run(disk), intra_run(s3)
    np.testing.assert_array_equal(
        a[["cosine", "mae", "jaccard"]].to_numpy(), b[["cosine", "mae", "jaccard"]].to_numpy()
    )


@pytest.mark.slow  # subprocesses, a browser or many captures: the full suite runs it
def test_two_concurrent_cli_captures_both_land(
    tiny_folder: Path, s3_url: str, s3_endpoint: str, tmp_path: Path
) -> None:
    # Neither process finds a store: both create the root, both write runs, both commit.
    paths = [
        write_scenario(tmp_path, tiny_folder, f"writer{i}", 6, attention_weights=False, logits=False)
        for i in range(2)
    ]
    args = ["--store", s3_url, "--storage-option", f"endpoint_url={s3_endpoint}", "-q"]
    exe = str(Path(sys.executable).parent / "actstore")
    procs = [subprocess.Popen([exe, "capture", str(p), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=cli_env()) for p in paths]  # fmt: skip
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    ids = [o[0].split("\t")[0] for o in outs]

    store = ActStore.open(s3_url, storage_options={"endpoint_url": s3_endpoint})
    assert sorted(store.run_ids()) == sorted(ids)
    assert {e["scenario"] for e in store.catalog_entries()} == {"writer0", "writer1"}
    assert store.orphans() == []
    for rid in ids:
        assert store.run(rid).array("hidden_out").compute().shape[1] == store.run(rid).n_positions


@pytest.mark.slow  # subprocesses under limits, or a CLI per call: the full suite runs it
def test_killed_capture_on_s3_leaves_no_visible_run(
    tiny_folder: Path, tiny_loaded: Any, s3_url: str, s3_endpoint: str, tmp_path: Path
) -> None:
    opts = {"endpoint_url": s3_endpoint}
    kept = make_scenario(tiny_folder, "kept", 3, logits=False)
    first = capture(kept, s3_url, loaded=tiny_loaded, storage_options=opts, progress=False)[0]
    path = write_scenario(tmp_path, tiny_folder, "doomed", 40, logits=False)
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "capture_child.py"), str(path), s3_url, s3_endpoint, "4"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env(),
    )  # fmt: skip
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        assert line.strip() == "mid-decode", proc.stderr.read() if proc.stderr else ""
        time.sleep(0.5)  # let the writer thread put what it has
        assert proc.poll() is None
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()

    store = ActStore.open(s3_url, storage_options=opts)
    assert store.run_ids() == [first.run_id]
    orphans = store.orphans()  # the doomed run's objects are there, but no reader sees them
    assert len(orphans) == 1 and orphans[0].startswith("doomed_")
    assert store.resolve("latest") == [first.run_id]


def _commit_fake(store: ActStore, n: int, start: int = 0) -> list[str]:
    ids = []
    for i in range(start, start + n):
        rid = f"fake_20260101T0000{i:02d}_{i:06x}"
        store.create_run_group(rid)  # an empty run: the catalog is what is under test
        store.commit(rid, {"scenario": "fake", "model": "m", "created_at": f"2026-01-01T00:00:{i:02d}"})
        ids.append(rid)
    return ids


def test_catalog_snapshot_is_only_a_cache(s3_url: str, s3_options: dict[str, Any]) -> None:
    store = ActStore.open(s3_url, create=True, storage_options=s3_options)
    ids = _commit_fake(store, remote.SNAPSHOT_MIN_FETCHED)
    assert store.run_ids() == ids  # this listing fetched every entry and wrote the snapshot
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True, **s3_options)  # a sync one, for poking at keys
    snap_path = f"{store.zstore.path}/{remote.SNAPSHOT_KEY}"
    snap = json.loads(fs.cat(snap_path))
    assert len(snap["entries"]) == len(ids)

    more = _commit_fake(store, 3, start=len(ids))  # newer than the snapshot: read one by one
    fs.rm(f"{store.zstore.path}/{naming.catalog_key(ids[0])}")  # gone from the listing: gone
    store.commit(ids[1], {"scenario": "rewritten", "model": "m", "created_at": "2026-01-01T00:00:01"})
    entries = store.catalog_entries()
    assert [e["id"] for e in entries] == ids[1:] + more
    assert entries[0]["scenario"] == "rewritten"  # a changed version is read again

    fs.pipe(snap_path, b"{not json")  # a broken snapshot costs GETs, never correctness
    assert [e["id"] for e in store.catalog_entries()] == ids[1:] + more


@pytest.mark.slow  # subprocesses under limits, or a CLI per call: the full suite runs it
def test_cli_ls_with_storage_option_and_with_env(
    tiny_folder: Path, tiny_loaded: Any, s3_url: str, s3_endpoint: str
) -> None:
    sc = make_scenario(tiny_folder, "listed", 2, logits=False)
    opts = {"endpoint_url": s3_endpoint}
    rid = capture(sc, s3_url, loaded=tiny_loaded, storage_options=opts, progress=False)[0].run_id
    by_option = run_cli(
        "ls", "--store", s3_url, "--storage-option", f"endpoint_url={s3_endpoint}", "--format", "json"
    )
    assert by_option.returncode == 0, by_option.stderr
    assert [r["id"] for r in json.loads(by_option.stdout)] == [rid]

    by_env = run_cli("inspect", rid, env=cli_env(AWS_ENDPOINT_URL=s3_endpoint, ACTSTORE_STORE=s3_url))
    assert by_env.returncode == 0, by_env.stderr
    assert rid in by_env.stdout

    missing = run_cli("ls", "--store", s3_url.replace("acts.zarr", "nothing.zarr"),
                      "--storage-option", f"endpoint_url={s3_endpoint}")  # fmt: skip
    assert missing.returncode == 2 and "no actstore store at" in missing.stderr
