"""``actstore gc``: what it removes, what it keeps, and never a committed run."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from actstore import naming
from actstore.cli import main
from actstore.store.store import ActStore
from query.synth import write_synthetic_run


def _gc(store: Path, *args: str) -> Any:
    res = CliRunner().invoke(main, ["gc", *args, "--store", str(store)])
    assert res.exit_code == 0, res.output
    return res


@pytest.fixture()
def store(tmp_path: Path) -> Path:
    location = tmp_path / "s.zarr"
    write_synthetic_run(ActStore.open(location, create=True), n_layers=2, prompt_len=8, n_steps=3, width=16)
    return location


def _orphan(store: Path, age_s: float) -> Path:
    """A run group with no catalog entry, last written ``age_s`` ago."""
    group = store / naming.RUNS_PREFIX / "killed_20260101T000000_aaaaaa"
    (group / "acts").mkdir(parents=True)
    for p in (group / "zarr.json", group / "acts" / "blob"):
        p.write_bytes(b"{}" if p.name == "zarr.json" else os.urandom(5000))
        t = time.time() - age_s
        os.utime(p, (t, t))
    return group


def test_young_orphans_are_kept_old_ones_removed(store: Path) -> None:
    committed = ActStore.open(store).run_ids()
    young = _orphan(store, age_s=60)
    res = _gc(store, "--apply", "--no-cache")
    assert "kept (too recent)" in res.stdout and young.exists()  # a capture may still be writing
    res = _gc(store, "--apply", "--no-cache", "--min-age", "30")
    assert "removed" in res.stdout and not young.exists()
    assert ActStore.open(store).run_ids() == committed  # committed runs are never touched
    assert CliRunner().invoke(main, ["check", "-q", "--store", str(store)]).exit_code == 0


def test_dry_run_by_default(store: Path) -> None:
    old = _orphan(store, age_s=7200)
    tmp = store / naming.CATALOG_PREFIX / ".tmp-abc"
    tmp.write_text("{")
    os.utime(tmp, (time.time() - 7200,) * 2)
    res = _gc(store, "--no-cache")
    assert res.stdout.count("would remove") >= 2 and "run with --apply" in res.stdout
    assert old.exists() and tmp.exists()
    _gc(store, "--apply", "--no-cache")
    assert not old.exists() and not tmp.exists()


def test_model_cache_builds_are_removed_only_when_abandoned(store: Path, tmp_path: Path, monkeypatch: Any) -> None:
    cache = tmp_path / "cache"
    models = cache / "models"
    build = models / ".gguf-x-123.tmp-q1w2e3"
    build.mkdir(parents=True)
    (build / "model.safetensors").write_bytes(os.urandom(10_000))
    monkeypatch.setenv("ACTSTORE_CACHE", str(cache))
    lock = models / ".gguf-x-123.lock"
    # another process builds into it: it holds the folder's lock
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl,sys,time; f=open(sys.argv[1],'a'); fcntl.flock(f, fcntl.LOCK_EX); "
         "print('locked', flush=True); time.sleep(60)", str(lock)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        res = _gc(store, "--apply")
        assert "kept (too recent)" in res.stdout and build.exists()
    finally:
        holder.kill()
        holder.wait()
    res = _gc(store, "--apply")  # the build died: its lock is free, its folder garbage
    assert "model cache build" in res.stdout and not build.exists()
