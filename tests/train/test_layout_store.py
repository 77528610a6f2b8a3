"""Train layouts in the store: ``check`` verifies their segments (and names damage),
``gc`` removes what a killed writer left, a killed ``materialize`` never shows half a
segment, and the same code works on object storage."""

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
import zarr
from click.testing import CliRunner

from actstore.cli import main
from actstore.store.rows import Rows
from actstore.store.store import ActStore
from actstore.store.train_read import TrainLayout
from actstore.store.train_writer import SegmentWriter
from actstore.torch import ActivationDataset
from query.synth import write_synthetic_run
from train.helpers import SITE, attempts, folder, id_layout


def _cli(*args: str) -> Any:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def _check(loc: Path) -> Any:
    return _cli("check", "--store", str(loc), "-q")


def test_check_passes_then_names_each_problem(tmp_path: Path) -> None:
    loc = tmp_path / "s.zarr"
    store = id_layout(loc, [40, 20], chunk_rows=16, name="lay", labels=True)
    write_synthetic_run(store, n_layers=2, prompt_len=10, n_steps=2, width=8)
    res = _check(loc)
    assert res.exit_code == 0 and "no problems" in res.output and "2 layout segments" in res.output, res.output
    seg = folder(loc, "lay", "seg000")
    chunk = seg / "sites/hidden_out.3/c/1/0"
    data = bytearray(chunk.read_bytes())
    data[5] ^= 0x01
    chunk.write_bytes(bytes(data))
    (seg / "rows/position/c/2").unlink()
    (seg / "rows/token_ids/zarr.json").unlink()
    meta = seg / "rows/sequence_index/zarr.json"
    doc = json.loads(meta.read_text())
    doc["codecs"][-1]["name"] = "no_such_codec"  # parses, but zarr cannot open the array
    meta.write_text(json.dumps(doc))
    with pytest.raises(Exception) as opening:  # noqa: PT011 - whatever zarr raises, quoted below
        zarr.open_array(store=str(meta.parent), mode="r", zarr_format=3)
    reason = str(opening.value).strip().splitlines()[0][:160]
    (seg / "stray.bin").write_bytes(b"x")
    (loc / "layouts/lay/committed/seg001.json").write_text("{")
    res = _check(loc)
    assert res.exit_code == 1
    lines = res.output.splitlines()
    assert any(line.startswith("damaged") and "hidden_out.3/c/1/0" in line and "checksum" in line for line in lines)
    assert any(line.startswith("missing") and "rows/position/c/2" in line for line in lines)
    assert any(line.startswith("missing") and "rows/token_ids/zarr.json" in line
               and "array metadata is missing" in line for line in lines)  # fmt: skip
    assert any(line.startswith("damaged") and "rows/sequence_index/zarr.json" in line
               and f"array does not open ({reason})" in line for line in lines)  # fmt: skip
    assert any(line.startswith("inconsistent") and f"{seg.name}/stray.bin" in line for line in lines)
    assert any(line.startswith("damaged") and "committed/seg001.json" in line for line in lines)


def test_gc_removes_uncommitted_segments_and_temp_markers(tmp_path: Path) -> None:
    loc = tmp_path / "s.zarr"
    store = id_layout(loc, [30], chunk_rows=8, name="lay")
    w = SegmentWriter(store, "lay", "half", [SITE], 4, "float32", chunk_rows=8)
    w.append({SITE: np.ones((20, 4), np.float32)},
             Rows(np.zeros(20, np.int32), np.zeros(20, np.int64), np.arange(20, dtype=np.int32)))  # fmt: skip
    # ... and the writer dies here: no commit, no abort
    (loc / "layouts/lay/committed/.tmp-x1").write_text("{}")
    (loc / "layouts/lay/committed/.tmp-x2.json").write_text("{}")  # a temp name ending like a marker
    assert TrainLayout.open(ActStore.open(loc), "lay").n_rows == 30  # readers never see them
    res = _check(loc)
    (half,) = attempts(loc, "lay", "half")
    assert res.exit_code == 1 and f"orphaned     layouts/lay/segments/{half.name}/" in res.output
    assert "temporary    layouts/lay/committed/.tmp-x1  temp file" in res.output
    assert "temporary    layouts/lay/committed/.tmp-x2.json" in res.output
    res = _cli("gc", "--store", str(loc), "--no-cache")  # dry run, and too young anyway
    assert "kept (too recent) orphaned segment" in res.output and half.exists()
    res = _cli("gc", "--apply", "--min-age", "0", "--no-cache", "--store", str(loc))
    assert not half.exists()
    assert not (loc / "layouts/lay/committed/.tmp-x1").exists()
    assert not (loc / "layouts/lay/committed/.tmp-x2.json").exists()
    res = _check(loc)
    assert res.exit_code == 0 and "no problems" in res.output, res.output
    assert TrainLayout.open(ActStore.open(loc), "lay").n_rows == 30


def test_abort_and_rewrite_of_a_segment(tmp_path: Path) -> None:
    loc = tmp_path / "s.zarr"
    store = ActStore.open(loc, create=True)
    rows = Rows(np.zeros(5, np.int32), np.zeros(5, np.int64), np.arange(5, dtype=np.int32))
    with pytest.raises(RuntimeError), SegmentWriter(store, "lay", "a", [SITE], 4, "float32") as w:
        w.append({SITE: np.ones((5, 4), np.float32)}, rows)
        raise RuntimeError("the producer failed")
    assert not attempts(loc, "lay", "a")  # the with block aborted it
    w = SegmentWriter(store, "lay", "a", [SITE], 4, "float32")
    w.append({SITE: np.full((5, 4), 2, np.float32)}, rows)
    w.commit()
    with pytest.raises(Exception, match="already committed"):
        SegmentWriter(store, "lay", "a", [SITE], 4, "float32")
    b = SegmentWriter(store, "lay", "b", [SITE], 4, "float32")
    with pytest.raises(Exception, match="dtype"):
        b.append({SITE: np.ones((5, 4))}, rows)  # float64 is not the store dtype: refused, not cast
    assert f"orphaned     layouts/lay/segments/{attempts(loc, 'lay', 'b')[0].name}/" in _check(loc).output
    b.abort()
    assert _check(loc).exit_code == 0


def test_two_attempts_at_one_segment_never_mix(tmp_path: Path) -> None:
    """A task retried while its first attempt still runs: both write, both commit; the
    last marker wins whole, the other attempt is an orphan gc removes."""
    loc = tmp_path / "s.zarr"
    store = ActStore.open(loc, create=True)
    rows = Rows(np.arange(40, dtype=np.int32), np.zeros(40, np.int64), np.arange(40, dtype=np.int32))
    first = SegmentWriter(store, "lay", "unit7", [SITE], 4, "float32", chunk_rows=16)
    second = SegmentWriter(store, "lay", "unit7", [SITE], 4, "float32", chunk_rows=16)
    first.append({SITE: np.full((40, 4), 1, np.float32)}, rows)
    second.append({SITE: np.full((40, 4), 2, np.float32)}, rows)
    first.commit()
    second.commit()
    assert len(attempts(loc, "lay", "unit7")) == 2
    lay = TrainLayout.open(ActStore.open(loc), "lay")
    assert lay.n_rows == 40 and (lay.read_site(SITE) == 2).all()  # one attempt, whole
    res = _check(loc)
    assert res.exit_code == 1 and "orphaned" in res.output and "superseded" in res.output
    _cli("gc", "--apply", "--min-age", "0", "--no-cache", "--store", str(loc))
    assert attempts(loc, "lay", "unit7") == [folder(loc, "lay", "unit7")]
    assert _check(loc).exit_code == 0


def _materialize_proc(loc: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "actstore", "materialize", "all", "--store", str(loc),
                             "--name", "lay", "--layers", "0,1", "--chunk-rows", "16", "-q"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_materialize_leaves_no_visible_segment(tmp_path: Path, sig: int) -> None:
    loc = tmp_path / "s.zarr"
    store = ActStore.open(loc, create=True)
    for i in range(2):  # ~8,000 rows in chunks of 16: seconds of writing to land in
        write_synthetic_run(store, name=f"r{i}", n_layers=2, prompt_len=4000, n_steps=2, width=8, seed=i,
                            sources=("hidden_in",))  # fmt: skip
    segments = loc / "layouts/lay/segments"
    proc = _materialize_proc(loc)
    deadline = time.time() + 60
    while not (segments.is_dir() and any(p.is_dir() for p in segments.iterdir())) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()
    os.kill(proc.pid, sig)
    _out, err = proc.communicate(timeout=60)
    committed = {p.stem for p in (loc / "layouts/lay/committed").glob("*.json")}
    folders = {p.name.rsplit(".", 1)[0] for p in segments.iterdir() if p.is_dir()} if segments.is_dir() else set()
    assert len(committed) < 2  # it was killed mid-write
    if sig == signal.SIGTERM:  # interrupted: it removed its own half segment
        assert err.strip().splitlines() == ["interrupted"], err
        assert folders == committed
        assert _check(loc).exit_code == 0
    else:
        assert folders - committed  # the half-written segment is there...
        res = _check(loc)
        assert res.exit_code == 1 and "orphaned" in res.output
    if committed:
        assert {s.segment for s in TrainLayout.open(ActStore.open(loc), "lay").segments} == committed
    else:
        with pytest.raises(Exception, match="no committed layout"):
            TrainLayout.open(ActStore.open(loc), "lay")
    _cli("gc", "--apply", "--min-age", "0", "--no-cache", "--store", str(loc))
    res = _check(loc)
    assert res.exit_code == 0 and "no problems" in res.output, res.output
    res = _materialize_proc(loc).communicate(timeout=120)  # a rerun completes the layout
    assert TrainLayout.open(ActStore.open(loc), "lay").n_rows == 2 * 4001


@pytest.mark.slow
def test_layout_on_object_storage(s3_url: str, s3_options: dict[str, Any], tmp_path: Path) -> None:
    store = ActStore.open(s3_url, create=True, storage_options=s3_options)
    write_synthetic_run(store, n_layers=2, prompt_len=70, n_steps=3, width=8, store_dtype="bfloat16")
    from actstore.store.materialize import materialize

    materialize(store, ["all"], "lay", "hidden_out", [1], chunk_rows=16)
    run = store.run("latest")
    want = np.asarray(run.array("hidden_out")[1].compute())
    ds = ActivationDataset(s3_url, "lay", batch_size=10, storage_options=s3_options, seed=2)
    batches = list(ds)
    got = torch_cat([b["hidden_out.1"] for b in batches]).float().numpy()
    pos = np.concatenate([b["position"].numpy() for b in batches])
    assert np.array_equal(got[np.argsort(pos)], want)
    res = CliRunner().invoke(main, ["check", "-q", "--store", s3_url,
                                    *[f"--storage-option={k}={v}" for k, v in s3_options.items()]])  # fmt: skip
    assert res.exit_code == 0 and "1 layout segments" in res.output, res.output


def torch_cat(parts: list[Any]) -> Any:
    import torch

    return torch.cat(parts)


def test_check_names_an_array_chunked_unlike_its_marker(tmp_path: Path) -> None:
    """An array of a segment whose rows or chunking differ from what the commit marker
    records (a hand edit, a writer of another version) is named with both sides' figures."""
    import json

    loc = tmp_path / "s.zarr"
    id_layout(loc, [40], chunk_rows=16, name="lay")
    meta_file = folder(loc, "lay", "seg000") / "sites/hidden_out.3/zarr.json"
    meta = json.loads(meta_file.read_text())
    assert meta["chunk_grid"]["configuration"]["chunk_shape"] == [16, 4]
    meta["chunk_grid"]["configuration"]["chunk_shape"] = [8, 4]
    meta_file.write_text(json.dumps(meta))
    res = _check(loc)
    assert res.exit_code == 1
    [line] = [ln for ln in res.output.splitlines() if "hidden_out.3/zarr.json" in ln]
    assert line.startswith("inconsistent")
    assert "array of 40 rows in chunks of 8, the marker says 40 in chunks of 16" in line



def test_opening_a_missing_layout_says_which_exist_and_how_to_make_one(tmp_path: Path) -> None:
    from actstore.errors import StoreError

    empty = ActStore.open(tmp_path / "empty.zarr", create=True)
    with pytest.raises(StoreError) as e:
        TrainLayout.open(empty, "lay")
    assert str(e.value).endswith("no committed layout 'lay' (the store has no layouts; make one with "
                                 "`actstore materialize`)")  # fmt: skip
    store = id_layout(tmp_path / "s.zarr", [8], chunk_rows=4, name="ids")
    with pytest.raises(StoreError) as e:
        TrainLayout.open(store, "lay")
    assert str(e.value).endswith("no committed layout 'lay' (layouts here: ids; make one with `actstore materialize`)")


def test_a_missing_chunk_on_object_storage_is_damage_not_zeros() -> None:
    """Off a local disk every chunk is read through zarr's store: a chunk object deleted
    from a committed segment is named as missing, never read as the fill value (zeros)."""
    import fsspec

    from actstore.errors import DamagedRunError

    fs = fsspec.filesystem("memory")
    if fs.exists("/lay-missing"):
        fs.rm("/lay-missing", recursive=True)
    url = "memory://lay-missing/s.zarr"
    id_layout(url, [40], chunk_rows=16, name="lay")  # type: ignore[arg-type]
    marker = json.loads(fs.cat("/lay-missing/s.zarr/layouts/lay/committed/seg000.json"))
    key = f"layouts/lay/segments/{marker['folder']}/sites/{SITE[0]}.{SITE[1]}/c/1/0"
    assert fs.exists(f"/lay-missing/s.zarr/{key}")
    fs.rm(f"/lay-missing/s.zarr/{key}")
    layout = TrainLayout.open(ActStore.open(url), "lay")
    assert not layout.local
    with pytest.raises(DamagedRunError, match=f"stored object {key} is missing"):
        layout.read_site(SITE)
    fs.rm("/lay-missing", recursive=True)
