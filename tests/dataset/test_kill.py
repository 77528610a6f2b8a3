"""kill -9 at five random moments of a 200-unit capture (the CLI as a subprocess), rerun
after each: every unit is committed exactly once, each kill costs at most one unit
(its orphan group), the finished store is bit-identical to an uninterrupted capture,
and gc (min age 0) leaves nothing orphaned."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from actstore.testing import topic_texts

from .conftest import write_jsonl

N_UNITS = 200


def _units(store: Path) -> list[int]:
    """The unit of every catalog entry of the store (a unit committed twice shows twice)."""
    out = []
    for p in (store / "catalog").glob("*.json") if (store / "catalog").is_dir() else []:
        if not p.name.startswith("."):
            out.append(json.loads(p.read_text())["dataset"]["unit"])
    return out


def _groups(store: Path) -> set[str]:
    runs = store / "runs"
    return {p.name for p in runs.iterdir() if p.is_dir()} if runs.is_dir() else set()


def _arrays(store: Path) -> dict[int, dict[str, bytes]]:
    """Per unit, the bytes of every array of its run (zarr read directly)."""
    root = zarr.open_group(str(store), mode="r")
    committed = {p.stem for p in (store / "catalog").glob("*.json") if not p.name.startswith(".")}
    out: dict[int, dict[str, bytes]] = {}
    for run_id in committed:
        g = root["runs"][run_id]
        arrays = {}
        for path, arr in g.members(max_depth=None):
            if isinstance(arr, zarr.Array) and path != "steps":
                arrays[path] = np.asarray(arr[...]).tobytes()
        out[g.attrs["run"]["dataset"]["unit"]] = arrays
    return out


@pytest.mark.slow
def test_kill_9_five_times_then_finish(tmp_path: Path, tiny_folder: Path) -> None:
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": t} for _, t in topic_texts(N_UNITS, max_chars=60)])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def cmd(store: Path) -> list[str]:
        return [sys.executable, "-m", "actstore", "capture-dataset", str(corpus), "--store", str(store),
                "--name", "k", "--model", str(tiny_folder), "--unit-size", "1", "--batch-size", "1", "-q"]  # fmt: skip

    store, rng = tmp_path / "killed.zarr", random.Random(20261130)
    orphans: set[str] = set()
    for kill in range(5):
        done = len(_units(store))
        target = done + rng.randint(1, 20)
        proc = subprocess.Popen(cmd(store), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        while len(_units(store)) < target and proc.poll() is None:
            time.sleep(0.005)
        time.sleep(rng.uniform(0, 0.2))  # land anywhere in a unit: forward pass, writes, commit
        proc.kill()
        proc.wait()
        assert proc.returncode == -9, f"kill {kill}: the capture ended before it ({proc.stderr.read()[-500:]!r})"
        units = _units(store)
        assert len(units) == len(set(units)), f"kill {kill}: a unit committed twice"
        committed = {p.stem for p in (store / "catalog").glob("*.json")}
        new_orphans = _groups(store) - committed - orphans
        assert len(new_orphans) <= 1, f"kill {kill} left {len(new_orphans)} unfinished units"
        orphans |= new_orphans
    before = set(_units(store))
    assert 0 < len(before) < N_UNITS
    assert orphans, "no kill landed inside a unit: the test did not test resume"
    finish = subprocess.run(cmd(store), env=env, capture_output=True, text=True, timeout=600)
    assert finish.returncode == 0, finish.stderr[-2000:]
    assert f"({N_UNITS - len(before)} captured now, {len(before)} already committed)" in finish.stdout
    units = _units(store)
    assert sorted(units) == list(range(N_UNITS))  # every unit exactly once

    clean = tmp_path / "clean.zarr"
    subprocess.run(cmd(clean), env=env, check=True, capture_output=True, timeout=600)
    got, want = _arrays(store), _arrays(clean)
    assert sorted(got) == sorted(want) == list(range(N_UNITS))
    for u in range(N_UNITS):
        assert got[u].keys() == want[u].keys() and all(got[u][k] == want[u][k] for k in want[u]), f"unit {u}"

    from actstore import open_store
    from actstore.dataset import dataset_status

    st = dataset_status(open_store(str(store)), "k")
    assert set(st.orphaned) == orphans and st.complete
    base = [sys.executable, "-m", "actstore"]
    gc = subprocess.run([*base, "gc", "--apply", "--min-age", "0", "--no-cache", "--store", str(store)],
                        env=env, capture_output=True, text=True, check=True)  # fmt: skip
    assert all(o in gc.stdout for o in orphans), gc.stdout
    assert dataset_status(open_store(str(store)), "k").orphaned == []
    check = subprocess.run([*base, "check", "--store", str(store)], env=env, capture_output=True, text=True)
    assert check.returncode == 0 and "no problems" in check.stdout, check.stdout[-2000:]
