"""Runs written before checksums (no crc32c, all-zero chunks skipped, no integrity
record) keep reading as they did, and say that their damage goes unseen."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from actstore import naming
from actstore.capture.runner import capture_run
from actstore.cli import main
from actstore.scenario import scenario_from_dict
from actstore.store import layout, writer
from actstore.store.store import ActStore
from actstore.testing import SAMPLE_MESSAGES, tiny_loaded


def _capture(store: ActStore) -> str:
    sc = scenario_from_dict({
        "name": "old", "model": {"id": "tiny", "dtype": "float32", "device": "cpu"},
        "prompt": {"messages": SAMPLE_MESSAGES}, "generation": {"max_new_tokens": 4},
        "capture": {"store_dtype": "float16"},
    })  # fmt: skip
    return capture_run(sc, store, tiny_loaded("llama"), progress=False).run_id


@pytest.fixture(scope="module")
def stores(tmp_path_factory: Any) -> tuple[ActStore, str, str]:
    tmp_path = tmp_path_factory.mktemp("legacy")
    store = ActStore.open(tmp_path / "s.zarr", create=True)
    new = _capture(store)
    with pytest.MonkeyPatch.context() as m:  # the writer as it was before checksums
        m.setattr(layout, "CHUNK_CODECS", [layout.COMPRESSOR])
        m.setattr(writer, "WRITE_EMPTY_CHUNKS", False)
        m.setattr(writer, "INTEGRITY", {})
        old = _capture(store)
    return ActStore.open(tmp_path / "s.zarr"), old, new


def test_old_runs_read_the_same_numbers(stores: tuple[ActStore, str, str]) -> None:
    store, old, new = stores
    r_old, r_new = store.run(old), store.run(new)
    assert not r_old.checksummed and r_new.checksummed
    meta = r_old.group[naming.act_path("q")].metadata.to_dict()
    assert "crc32c" not in str(meta["codecs"][0]["configuration"]["codecs"])  # really the old chain
    for source in r_new.sources:
        np.testing.assert_array_equal(r_old.array(source).compute(), r_new.array(source).compute(),
                                      err_msg=source)  # fmt: skip


def test_old_runs_say_their_damage_goes_unseen(stores: tuple[ActStore, str, str]) -> None:
    store, old, new = stores
    res = CliRunner().invoke(main, ["inspect", old, "--store", store.location])
    assert res.exit_code == 0 and "written before checksums" in res.stdout
    res = CliRunner().invoke(main, ["inspect", new, "--store", store.location])
    assert "crc32c on every chunk" in res.stdout
    res = CliRunner().invoke(main, ["check", "-q", "--store", store.location])
    assert res.exit_code == 0, res.output
    assert f"note: run {old} was written before checksums" in res.stdout and new not in res.stdout


def test_a_missing_chunk_of_an_old_run_reads_as_before(stores: tuple[ActStore, str, str], tmp_path: Path) -> None:
    """Old runs skipped all-zero chunks on purpose, so a missing one is the fill value
    there (as it always was), while the same loss in a new run is an error."""
    shutil.copytree(stores[0].location, tmp_path / "s.zarr")
    store, old, new = ActStore.open(tmp_path / "s.zarr"), stores[1], stores[2]
    for run_id in (old, new):
        shard = Path(store.location) / naming.run_path(run_id) / naming.ACTS_GROUP / "v" / "c" / "0" / "0" / "0"
        shard.unlink()
    assert not store.run(old).array("v").compute().any()
    with pytest.raises(Exception, match=f"run {new} is damaged: .*v/c/0/0/0 is missing"):
        store.run(new).array("v").compute()
