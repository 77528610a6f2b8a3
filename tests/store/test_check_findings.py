"""``check``'s findings by value on a small store: one finding per damaged object, with its
problem, key and wording, and a count of decoded chunks that matches the files on disk
(counted here with ``os.walk``, not taken from the checker)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from actstore import naming
from actstore.capture.runner import capture_run
from actstore.scenario import scenario_from_dict
from actstore.store.check import Finding, check_store
from actstore.store.store import ActStore
from actstore.testing import SAMPLE_MESSAGES, tiny_loaded


@pytest.fixture(scope="module")
def captured(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A real capture (checksummed chunks) of the tiny model."""
    location = tmp_path_factory.mktemp("check") / "s.zarr"
    sc = scenario_from_dict({"name": "c", "model": {"id": "tiny", "dtype": "float32", "device": "cpu"},
                             "prompt": {"messages": SAMPLE_MESSAGES}, "generation": {"max_new_tokens": 3}})  # fmt: skip
    run_id = capture_run(sc, ActStore.open(location, create=True), tiny_loaded("llama"), progress=False).run_id
    return location, run_id


@pytest.fixture()
def one_run(captured: tuple[Path, str], tmp_path: Path) -> tuple[Path, str]:
    shutil.copytree(captured[0], tmp_path / "s.zarr")
    return tmp_path / "s.zarr", captured[1]


def _chunk_files(run_dir: Path) -> list[Path]:
    return sorted(Path(d) / f for d, _, files in os.walk(run_dir) for f in files
                  if f"{os.sep}c{os.sep}" in os.path.join(d, f) or d.endswith(f"{os.sep}c"))  # fmt: skip


def test_a_sound_run_decodes_every_chunk_object_once(one_run: tuple[Path, str]) -> None:
    location, run_id = one_run
    result = check_store(ActStore.open(location), progress=False)
    assert result.ok and result.runs == 1 and result.unchecksummed == []
    assert result.objects == len(_chunk_files(location / naming.run_path(run_id)))


def test_a_deleted_chunk_is_one_missing_finding_and_not_decoded(one_run: tuple[Path, str]) -> None:
    location, run_id = one_run
    chunks = _chunk_files(location / naming.run_path(run_id))
    gone = chunks[len(chunks) // 2]
    gone.unlink()
    result = check_store(ActStore.open(location), progress=False)
    key = gone.relative_to(location).as_posix()
    assert result.findings == [Finding("missing", key, "chunk object is missing", run_id)]
    assert result.objects == len(chunks) - 1


def test_garbled_run_metadata_is_one_finding_that_says_so(one_run: tuple[Path, str]) -> None:
    location, run_id = one_run
    (location / naming.run_path(run_id) / "zarr.json").write_text("{ not json")
    result = check_store(ActStore.open(location), [run_id], progress=False)
    assert result.findings == [Finding("damaged", f"{naming.run_path(run_id)}/zarr.json",
                                       "run metadata does not parse or lacks the run's attributes", run_id)]  # fmt: skip
    assert result.objects == 0
