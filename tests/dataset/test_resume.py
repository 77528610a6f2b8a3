"""Resume bookkeeping in-process: a rerun skips committed units, other settings under the
same name are refused until --force replaces the units, a killed unit's leftover group
is listed as orphaned, removed by gc and never trips a rerun; ls shows one row."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from actstore.testing import topic_texts

from .conftest import write_jsonl


def _entries(store: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted((store / "catalog").glob("*.json")) if not p.name.startswith(".")]


def _capture(corpus: Path, store: Path, loaded: Any, **kw: Any) -> Any:
    from actstore import capture_dataset

    return capture_dataset(str(corpus), str(store), name="d", model="tiny", loaded=loaded, unit_size=2,
                           batch_size=2, progress=False, **kw)  # fmt: skip


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "c.jsonl", [{"text": t} for _, t in topic_texts(6, max_chars=80)])


def test_rerun_skips_committed_units(tmp_path: Path, corpus: Path, tiny_model_loaded: Any) -> None:
    store = tmp_path / "s.zarr"
    first = _capture(corpus, store, tiny_model_loaded)
    assert first.captured == [0, 1, 2] and first.skipped == []
    before = _entries(store)
    again = _capture(corpus, store, tiny_model_loaded)
    assert again.captured == [] and again.skipped == [0, 1, 2]
    assert _entries(store) == before
    assert sorted(e["dataset"]["unit"] for e in before) == [0, 1, 2]
    assert {e["dataset"]["n_units"] for e in before} == {3}
    assert len({e["dataset"]["fingerprint"] for e in before}) == 1


def test_other_settings_refused_until_force(tmp_path: Path, corpus: Path, tiny_model_loaded: Any) -> None:
    from actstore.dataset.settings import DatasetError

    store = tmp_path / "s.zarr"
    _capture(corpus, store, tiny_model_loaded)
    old = {e["id"] for e in _entries(store)}
    with pytest.raises(DatasetError, match="--force"):
        _capture(corpus, store, tiny_model_loaded, layers="0-1")
    assert {e["id"] for e in _entries(store)} == old  # nothing written
    corpus.write_text(corpus.read_text() + json.dumps({"text": "one more sequence"}) + "\n")
    with pytest.raises(DatasetError, match="other input or settings"):
        _capture(corpus, store, tiny_model_loaded)
    r = _capture(corpus, store, tiny_model_loaded, force=True)
    new = _entries(store)
    assert r.captured == [0, 1, 2, 3] and not old & {e["id"] for e in new}
    assert sorted(e["dataset"]["unit"] for e in new) == [0, 1, 2, 3]
    assert not any((store / "runs" / i).exists() for i in old)


def test_killed_unit_is_orphaned_gc_removes_it_rerun_redoes_it(tmp_path: Path, corpus: Path,
                                                               tiny_model_loaded: Any) -> None:  # fmt: skip
    from actstore import open_store
    from actstore.cli import main
    from actstore.dataset import dataset_status

    store = tmp_path / "s.zarr"
    _capture(corpus, store, tiny_model_loaded)
    # what a kill -9 mid-unit leaves: unit 1's catalog entry never written, its group kept
    victim = next(e for e in _entries(store) if e["dataset"]["unit"] == 1)
    (store / "catalog" / f"{victim['id']}.json").unlink()
    st = dataset_status(open_store(str(store)), "d")
    assert (st.done, st.pending, st.orphaned) == ([0, 2], [1], [victim["id"]])
    out = CliRunner().invoke(main, ["status", "d", "--store", str(store)])
    assert out.exit_code == 0 and "pending   1" in out.output and victim["id"] in out.output, out.output
    r = _capture(corpus, store, tiny_model_loaded)  # the leftover does not trip the rerun
    assert r.captured == [1] and r.skipped == [0, 2]
    gc = CliRunner().invoke(main, ["gc", "--apply", "--min-age", "0", "--no-cache", "--store", str(store)])
    assert gc.exit_code == 0 and victim["id"] in gc.output, gc.output
    st = dataset_status(open_store(str(store)), "d")
    assert st.complete and st.orphaned == [] and not (store / "runs" / victim["id"]).exists()
    assert sorted(e["dataset"]["unit"] for e in _entries(store)) == [0, 1, 2]


def test_ls_shows_a_dataset_as_one_row(tmp_path: Path, corpus: Path, tiny_model_loaded: Any) -> None:
    from actstore.cli import main

    store = tmp_path / "s.zarr"
    _capture(corpus, store, tiny_model_loaded)
    entries = _entries(store)
    out = CliRunner().invoke(main, ["ls", "--store", str(store), "--format", "json"])
    assert out.exit_code == 0, out.output
    rows = json.loads(out.output)
    assert len(rows) == 1
    row = rows[0]
    assert row["id"] == "d" and row["units"] == "3/3" and row["model"] == tiny_model_loaded.model_id
    assert row["sequences"] == 6 and row["tokens"] == sum(e["n_positions"] for e in entries)
    table = CliRunner().invoke(main, ["ls", "--store", str(store)])
    assert table.exit_code == 0 and len(table.output.strip().splitlines()) == 2, table.output


def test_layers_beyond_the_model_are_refused_before_any_write(tmp_path: Path, corpus: Path,
                                                              tiny_model_loaded: Any) -> None:  # fmt: skip
    from actstore.dataset.settings import DatasetError

    for layers in ("1-5", "7"):  # the tiny model has layers 0-2
        with pytest.raises(DatasetError, match="has layers 0-2"):
            _capture(corpus, tmp_path / "s.zarr", tiny_model_loaded, layers=layers)
    assert not (tmp_path / "s.zarr").exists()
