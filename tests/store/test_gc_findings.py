"""``collect_garbage``'s findings by value: each one's kind, place and size on disk, measured
here with ``os.stat`` rather than taken from the checker, and every kind in one report."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from actstore import naming
from actstore.store.check import collect_garbage
from actstore.store.store import ActStore
from query.synth import write_synthetic_run
from store.test_gc import _orphan


def _bytes_under(path: Path) -> int:
    return sum(os.stat(os.path.join(d, f)).st_size for d, _, files in os.walk(path) for f in files)


@pytest.fixture()
def littered(tmp_path: Path) -> dict[str, Path]:
    """A store with one committed run, an old orphaned run, a young temp file, a catalog
    snapshot, and a model cache holding an abandoned half-built folder (no lock held)."""
    location = tmp_path / "s.zarr"
    write_synthetic_run(ActStore.open(location, create=True), n_layers=2, prompt_len=8, n_steps=3, width=16)
    temp = location / naming.CATALOG_PREFIX / ".tmp-abc"
    temp.write_bytes(b"x" * 123)
    snapshot = location / naming.CATALOG_PREFIX / ".snapshot.json"
    snapshot.write_text("[]" + " " * 40)
    build = tmp_path / "cache" / "models" / ".gguf-x-1.tmp-q1w2e3"
    build.mkdir(parents=True)
    (build / "model.safetensors").write_bytes(os.urandom(10_000))
    (build / "config.json").write_bytes(b"{}" * 7)
    old = time.time() - 7200
    for p in (build / "model.safetensors", build / "config.json", build):
        os.utime(p, (old, old))
    return {"store": location, "orphan": _orphan(location, age_s=7200), "temp": temp, "snapshot": snapshot,
            "build": build, "cache": tmp_path / "cache"}  # fmt: skip


def test_every_kind_is_reported_with_its_size_on_disk(littered: dict[str, Path]) -> None:
    found = collect_garbage(ActStore.open(littered["store"]), cache=littered["cache"])
    by_where = {g.where: g for g in found}
    orphan_key = f"{naming.RUNS_PREFIX}/{littered['orphan'].name}/"
    expected = {
        orphan_key: ("orphaned run", _bytes_under(littered["orphan"]), True),
        f"{naming.CATALOG_PREFIX}/.tmp-abc": ("temp file", 123, False),  # young: a writer may own it
        f"{naming.CATALOG_PREFIX}/.snapshot.json": ("catalog cache", littered["snapshot"].stat().st_size, True),
        str(littered["build"]): ("model cache build", 10_014, True),  # its lock is free: abandoned
    }
    assert set(by_where) == set(expected)  # the cache's finding does not replace the store's
    for where, (what, size, removable) in expected.items():
        g = by_where[where]
        assert (g.what, g.bytes, g.removable, g.removed) == (what, size, removable, False), where


def test_apply_removes_what_is_removable_and_says_so(littered: dict[str, Path]) -> None:
    store = ActStore.open(littered["store"])
    committed = store.run_ids()
    done = {g.where: g for g in collect_garbage(store, apply=True, cache=littered["cache"])}
    assert not littered["orphan"].exists() and not littered["build"].exists() and not littered["snapshot"].exists()
    assert littered["temp"].exists() and not done[f"{naming.CATALOG_PREFIX}/.tmp-abc"].removed
    assert [g.removed for g in done.values()].count(True) == 3
    assert ActStore.open(littered["store"]).run_ids() == committed


def test_check_names_an_orphan_with_its_objects_and_age(littered: dict[str, Path]) -> None:
    """What ``check`` says of a run group without a catalog entry: its object count (two
    files, counted here) and its age (the files' mtime, set two hours back)."""
    from actstore.store.check import Finding, check_store

    result = check_store(ActStore.open(littered["store"]), progress=False)
    orphans = [f for f in result.findings if f.problem == "orphaned"]
    assert len(orphans) == 1
    (f,) = orphans
    name = littered["orphan"].name
    files = [p for p in littered["orphan"].rglob("*") if p.is_file()]
    assert len(files) == 2 and f.key == f"{naming.RUNS_PREFIX}/{name}/" and f.run == name
    assert f.age_s is not None and 7199 <= f.age_s <= 7260
    assert f == Finding("orphaned", f.key, f"run group with no catalog entry (2 objects, last written "
                        f"{f.age_s:.0f} s ago): a killed or still running capture", name, f.age_s)  # fmt: skip
