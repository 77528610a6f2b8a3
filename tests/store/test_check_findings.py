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


def test_a_chunk_outside_the_arrays_grid_is_one_inconsistent_finding(one_run: tuple[Path, str]) -> None:
    """A chunk object whose coordinates lie past the array's shape (a hand copy, another
    writer's leftovers) is named as such; every chunk inside the grid still decodes."""
    location, run_id = one_run
    chunks = _chunk_files(location / naming.run_path(run_id))
    tokens = location / naming.run_path(run_id) / naming.TOKENS_ARRAY / "c"
    stray = tokens / "999"
    stray.write_bytes((tokens / "0").read_bytes())
    result = check_store(ActStore.open(location), progress=False)
    key = stray.relative_to(location).as_posix()
    assert result.findings == [Finding("inconsistent", key, "chunk object outside the array's grid", run_id)]
    assert result.objects == len(chunks)


def test_garbled_run_metadata_is_one_finding_that_says_so(one_run: tuple[Path, str]) -> None:
    location, run_id = one_run
    (location / naming.run_path(run_id) / "zarr.json").write_text("{ not json")
    result = check_store(ActStore.open(location), [run_id], progress=False)
    assert result.findings == [Finding("damaged", f"{naming.run_path(run_id)}/zarr.json",
                                       "run metadata does not parse or lacks the run's attributes", run_id)]  # fmt: skip
    assert result.objects == 0



def test_array_metadata_missing_or_garbled_is_named_by_which(one_run: tuple[Path, str]) -> None:
    """An array's own zarr.json deleted is "missing"; one that does not parse is "damaged"."""
    location, run_id = one_run
    base = naming.run_path(run_id)
    tokens = location / base / naming.TOKENS_ARRAY / "zarr.json"
    tokens.unlink()
    (location / base / naming.POSITION_STEP_ARRAY / "zarr.json").write_text("{ not json")
    result = check_store(ActStore.open(location), [run_id], progress=False)
    what = "array or group metadata is missing or does not parse"
    assert len(result.findings) == 2 and set(result.findings) == {
        Finding("missing", f"{base}/{naming.TOKENS_ARRAY}/zarr.json", what, run_id),
        Finding("damaged", f"{base}/{naming.POSITION_STEP_ARRAY}/zarr.json", what, run_id)}  # fmt: skip
    # and nothing else: both arrays still open from the run's consolidated metadata, so their
    # chunks are decoded (every one), not reported as arrays that do not open
    assert result.objects == len(_chunk_files(location / base))


def test_an_array_zarr_cannot_open_is_one_finding_with_zarrs_reason(one_run: tuple[Path, str]) -> None:
    """Metadata that parses and agrees with the run's consolidated copy, but names a codec
    zarr does not have: the array does not open, and the finding quotes zarr's own reason
    (its first line, read here by opening the array with zarr directly)."""
    import json

    import zarr

    location, run_id = one_run
    base = naming.run_path(run_id)
    run_doc_path = location / base / "zarr.json"
    own_path = location / base / naming.TOKENS_ARRAY / "zarr.json"
    own = json.loads(own_path.read_text())
    own["codecs"][-1]["name"] = "no_such_codec"
    own_path.write_text(json.dumps(own))
    run_doc = json.loads(run_doc_path.read_text())
    run_doc["consolidated_metadata"]["metadata"][naming.TOKENS_ARRAY] = own
    run_doc_path.write_text(json.dumps(run_doc))
    with pytest.raises(Exception) as opening:  # noqa: PT011 - whatever zarr raises, quoted below
        zarr.open_array(store=str(location / base / naming.TOKENS_ARRAY), mode="r", zarr_format=3)
    reason = str(opening.value).strip().splitlines()[0][:160]
    result = check_store(ActStore.open(location), [run_id], progress=False)
    assert result.findings == [Finding("damaged", f"{base}/{naming.TOKENS_ARRAY}/zarr.json",
                                       f"array does not open ({reason})", run_id)]  # fmt: skip


def test_the_progress_bar_counts_every_chunk_it_will_decode(one_run: tuple[Path, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The bar's total is every chunk object the check decodes: the runs' and, store-wide,
    the train layouts' (counted on disk here), so it ends full, not past its end."""
    import actstore.report.progress as progress
    from actstore.store.materialize import materialize

    location, run_id = one_run
    materialize(ActStore.open(location), [run_id], "lay", ["hidden_out"], "0,1", chunk_rows=4, progress=False)
    bars: list[object] = []
    make = progress.bar
    monkeypatch.setattr(progress, "bar", lambda *a, **k: bars.append(make(*a, **k)) or bars[-1])
    result = check_store(ActStore.open(location), progress=True)
    on_disk = len(_chunk_files(location / naming.run_path(run_id))) + len(_chunk_files(location / "layouts"))
    assert result.ok and len(_chunk_files(location / "layouts")) > 0
    [pbar] = bars
    assert pbar.total == pbar.n == on_disk  # type: ignore[attr-defined]

def test_check_and_gc_on_an_fsspec_store_whose_path_starts_with_a_slash() -> None:
    """An in-memory fsspec store (its paths start with "/", unlike S3's): the keys check
    and gc name are relative to the store, and sizes come from the filesystem's listing."""
    import fsspec

    from actstore.store.check import collect_garbage
    from query.synth import write_synthetic_run

    url = "memory://checks/s.zarr"
    fs = fsspec.filesystem("memory")
    if fs.exists("/checks"):
        fs.rm("/checks", recursive=True)
    store = ActStore.open(url, create=True)
    write_synthetic_run(store, n_layers=2, prompt_len=8, n_steps=3, width=16)
    run_id = store.run_ids()[0]
    fs.pipe(f"/checks/s.zarr/{naming.CATALOG_PREFIX}/.tmp-abc", b"x" * 77)
    result = check_store(ActStore.open(url), progress=False)
    assert [(f.problem, f.key) for f in result.findings] == [("temporary", f"{naming.CATALOG_PREFIX}/.tmp-abc")]
    chunks = [p for p in fs.find(f"/checks/s.zarr/{naming.run_path(run_id)}") if "/c/" in p or p.endswith("/c")]
    assert result.runs == 1 and result.objects == len(chunks) > 0
    [g] = collect_garbage(ActStore.open(url), min_age=0)
    assert (g.what, g.where, g.bytes) == ("temp file", f"{naming.CATALOG_PREFIX}/.tmp-abc", 77)
    fs.rm("/checks", recursive=True)


def test_generated_text_is_the_runs_own_or_empty(one_run: tuple[Path, str]) -> None:
    """``generated_text()`` is the text the run's metadata holds (read here with zarr), and
    an empty string, not "None", for metadata that holds none."""
    import zarr

    location, run_id = one_run
    group = zarr.open_group(store=str(location), path=naming.run_path(run_id), mode="r+")
    text = group.attrs["run"]["generated_text"]
    assert ActStore.open(location).run(run_id).generated_text() == text
    group.attrs["run"] = {k: v for k, v in group.attrs["run"].items() if k != "generated_text"}
    assert ActStore.open(location).run(run_id).generated_text() == ""


def test_a_zarr_group_that_is_not_a_store_is_refused_by_name(tmp_path: Path) -> None:
    import zarr

    from actstore.errors import StoreError

    zarr.open_group(store=str(tmp_path / "plain.zarr"), mode="w")
    with pytest.raises(StoreError) as info:
        ActStore.open(tmp_path / "plain.zarr")
    assert str(info.value).startswith(f"{tmp_path / 'plain.zarr'}: a Zarr group, but not an actstore store")


def test_one_run_is_needed_and_a_name_gives_two(tmp_path: Path) -> None:
    """``run()`` takes one run: a scenario name whose runs came from two captures names
    both (an error that says so); a scenario-run id stands for its latest run."""
    from actstore.errors import RunNotFoundError
    from query.synth import write_synthetic_run

    store = ActStore.open(tmp_path / "s.zarr", create=True)
    first = write_synthetic_run(store, name="twice", n_layers=2, prompt_len=4, n_steps=2, width=8)
    write_synthetic_run(store, name="twice", n_layers=2, prompt_len=4, n_steps=2, width=8, seed=1)
    write_synthetic_run(store, name="other", n_layers=2, prompt_len=4, n_steps=2, width=8)
    with pytest.raises(RunNotFoundError, match="'twice' names 2 runs; pick one id"):
        store.run("twice")
    assert store.run(first).id == first
