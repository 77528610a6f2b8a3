"""``ActivationDataset``: every token exactly once per epoch (any worker count, simulated
ranks), an order decorrelated from the stored one, exact resumption, the stored
statistics. Row identities come from values written through the segment writer
(helpers.id_layout), never from the loader's own bookkeeping."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from actstore.store.train_read import Chunk
from actstore.store.train_shuffle import EpochPlan, iter_batches
from actstore.torch import ActivationDataset
from train.helpers import SITE, folder, id_layout

SIZES = [100, 37, 260, 5, 90]  # 492 rows, segments not multiples of the chunk
CHUNK = 16


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return id_layout(tmp_path_factory.mktemp("lay") / "s.zarr", SIZES, chunk_rows=CHUNK, labels=True)


def _all_ids() -> list[int]:
    return sorted(s * 1_000_000 + r for s, n in enumerate(SIZES) for r in range(n))


def _ids(batches: list[dict[str, Any]]) -> list[int]:
    """Row ids read from the values (column 2) after checking them against the rows."""
    out: list[int] = []
    for b in batches:
        values = b["hidden_out.3"].numpy()
        ids = values[:, 2].astype(np.int64)
        assert np.array_equal(ids, b["token_ids"].numpy())  # rows stay aligned with their values
        assert np.array_equal(values[:, 1].astype(np.int64) % 3, b["cls"].numpy())  # and labels
        assert np.array_equal(values[:, 0].astype(np.int64), b["sequence_index"].numpy())
        out += ids.tolist()
    return out


@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # 4 workers on a 2-core machine
@pytest.mark.parametrize("workers", [0, 2, 4])
def test_every_token_once_per_epoch(store: Any, workers: int) -> None:
    ds = ActivationDataset(store, "ids", batch_size=24, buffer_chunks=3, seed=5)
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        got = _ids(list(ds.loader(num_workers=workers)))
        assert sorted(got) == _all_ids()  # each exactly once: no repeat, no loss
        assert got != _all_ids()  # and shuffled


def test_two_ranks_split_the_epoch(store: Any) -> None:
    per_rank = []
    for rank in (0, 1):
        ds = ActivationDataset(store, "ids", batch_size=24, buffer_chunks=2, rank=rank, world_size=2, seed=1)
        per_rank.append(_ids(list(ds.loader(num_workers=2))))
    assert set(per_rank[0]).isdisjoint(per_rank[1]) and min(map(len, per_rank)) > 100
    assert sorted(per_rank[0] + per_rank[1]) == _all_ids()


def test_seeded_epochs_same_seed_same_order(store: Any) -> None:
    def order(seed: int, epoch: int) -> list[int]:
        ds = ActivationDataset(store, "ids", batch_size=50, buffer_chunks=4, seed=seed)
        ds.set_epoch(epoch)
        return _ids(list(ds))

    assert order(3, 0) == order(3, 0)
    assert order(3, 0) != order(3, 1) and order(3, 0) != order(4, 0)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_without_repeats_or_losses(store: Any, workers: int) -> None:
    ds = ActivationDataset(store, "ids", batch_size=20, buffer_chunks=3, seed=9)
    ds.set_epoch(2)
    first: list[dict[str, Any]] = []
    for b in ds.loader(num_workers=workers):
        first.append(b)
        if len(first) == 9:  # stop mid-buffer, mid-epoch
            break
    state = ds.state_dict()
    assert sum(state["consumed"].values()) == 9 * 20
    fresh = ActivationDataset(store, "ids", batch_size=20, buffer_chunks=3, seed=0)
    fresh.load_state_dict(state)
    rest = list(fresh.loader(num_workers=workers))
    got = _ids(first) + _ids(rest)
    assert sorted(got) == _all_ids()
    # and the same rows as an uninterrupted epoch, reader by reader
    whole = ActivationDataset(store, "ids", batch_size=20, buffer_chunks=3, seed=9)
    whole.set_epoch(2)
    assert sorted(_ids(list(whole.loader(num_workers=workers)))) == sorted(got)


def test_resume_needs_the_same_worker_count(store: Any) -> None:
    ds = ActivationDataset(store, "ids", batch_size=20, seed=9)
    it = iter(ds.loader(num_workers=2))
    next(it)
    state = ds.state_dict()
    fresh = ActivationDataset(store, "ids", batch_size=20)
    fresh.load_state_dict(state)
    with pytest.raises(Exception, match="same num_workers"):
        list(fresh.loader(num_workers=0))


def test_stats_and_dtypes(store: Any) -> None:
    ds = ActivationDataset(store, "ids", batch_size=1000)
    (batch,) = list(ds)
    x = batch["hidden_out.3"].numpy().astype(np.float64)
    assert batch["hidden_out.3"].dtype == torch.float32 and len(x) == sum(SIZES)
    np.testing.assert_allclose(ds.stats().mean, x.mean(0))
    np.testing.assert_allclose(ds.stats().mean_norm, np.linalg.norm(x, axis=1).mean())
    half = ActivationDataset(store, "ids", batch_size=1000, dtype=torch.float16)
    assert next(iter(half))["hidden_out.3"].dtype == torch.float16


class _IdLayout:
    """A layout of ``n_chunks`` chunks of ``rows`` rows whose only column is the row's
    stored index: the real shuffle code at a scale no test store could reach fast."""

    local = True

    def __init__(self, n_chunks: int, rows: int):
        self.chunks = [Chunk(0, i, i * rows, (i + 1) * rows) for i in range(n_chunks)]

    def empty(self, sites: Any, n_rows: int) -> dict[str, np.ndarray]:
        return {"token_ids": np.empty(n_rows, np.int64)}

    def read_into(self, chunk: Chunk, sites: Any, out: dict[str, np.ndarray], offset: int) -> None:
        out["token_ids"][offset : offset + chunk.n_rows] = np.arange(chunk.start, chunk.stop)


def test_order_is_decorrelated_from_storage() -> None:
    lay = _IdLayout(n_chunks=2**17, rows=4)  # 524,288 rows; Spearman's sd ~ 1/sqrt(chunks) = 0.003
    plan = EpochPlan(seed=0, epoch=0, reader=0, readers=1, buffer_chunks=64)
    got = np.concatenate([b["token_ids"] for b in iter_batches(lay, [], plan, 4096)])  # type: ignore[arg-type]
    assert np.array_equal(np.sort(got), np.arange(2**19))
    rho = spearmanr(np.arange(len(got)), got).statistic
    assert abs(rho) < 0.01, rho
    # within a buffer, neighbours in the output are not neighbours in storage
    assert np.mean(np.abs(np.diff(got)) == 1) < 0.01


def test_read_damage_is_named(tmp_path: Path) -> None:
    from actstore.errors import DamagedRunError

    store = id_layout(tmp_path / "s.zarr", [40], chunk_rows=16, name="lay")
    chunk = folder(tmp_path / "s.zarr", "lay", "seg000") / "sites/hidden_out.3/c/1/0"
    data = bytearray(chunk.read_bytes())
    data[3] ^= 0xFF
    chunk.write_bytes(bytes(data))
    with pytest.raises(DamagedRunError, match="lay/seg000"):
        list(ActivationDataset(store, "lay", batch_size=8))
    chunk.unlink()
    with pytest.raises(DamagedRunError, match="missing"):
        list(ActivationDataset(store, "lay", batch_size=8))


def test_every_codec_chain_reads_the_same(tmp_path: Path) -> None:
    """Uncompressed (the default), zstd, and a chain only zarr decodes: same rows."""
    from zarr.codecs import GzipCodec, ZstdCodec

    from actstore.store.integrity import checksummed
    from actstore.store.rows import Rows
    from actstore.store.store import ActStore
    from actstore.store.train_read import TrainLayout
    from actstore.store.train_writer import SegmentWriter

    store = ActStore.open(tmp_path / "s.zarr", create=True)
    values = np.random.default_rng(0).standard_normal((50, 6)).astype(np.float16)
    rows = Rows(np.arange(50, dtype=np.int32), np.zeros(50, np.int64), np.arange(50, dtype=np.int32))
    chains = {"raw": ["bytes", "crc32c"], "zstd": ["bytes", "zstd", "crc32c"], "gzip": ["bytes", "gzip"]}
    for name, codecs in (("raw", None), ("zstd", checksummed(ZstdCodec(level=1))), ("gzip", [GzipCodec()])):
        w = SegmentWriter(store, name, "s", [SITE], 6, "float16", chunk_rows=16, codecs=codecs)
        w.append({SITE: values}, rows)
        w.commit()
        lay = TrainLayout.open(store, name)
        assert np.array_equal(lay.read_site(SITE), values), name
        assert np.array_equal(lay.read_rows()["token_ids"], np.arange(50)), name
        # the chain asked for is the one stored (its array's own metadata, read as JSON)
        meta = next((tmp_path / "s.zarr" / "layouts" / name / "segments").glob(f"*/sites/{SITE[0]}.{SITE[1]}/zarr.json"))
        assert [c["name"] for c in json.loads(meta.read_text())["codecs"]] == chains[name], name


def test_a_chunk_may_hold_one_row_but_not_none(tmp_path: Path) -> None:
    from actstore.errors import SelectionError
    from actstore.store.rows import Rows
    from actstore.store.store import ActStore
    from actstore.store.train_read import TrainLayout
    from actstore.store.train_writer import SegmentWriter

    store = ActStore.open(tmp_path / "s.zarr", create=True)
    values = np.arange(15, dtype=np.float32).reshape(5, 3)
    w = SegmentWriter(store, "one", "s", [SITE], 3, "float32", chunk_rows=1)
    w.append({SITE: values}, Rows(np.arange(5, dtype=np.int32), np.zeros(5, np.int64), np.arange(5, dtype=np.int32)))
    w.commit()
    lay = TrainLayout.open(store, "one")
    assert len(lay.chunks) == 5 and np.array_equal(lay.read_site(SITE), values)
    with pytest.raises(SelectionError, match="chunk_rows must be >= 1, not 0"):
        SegmentWriter(store, "none", "s", [SITE], 3, "float32", chunk_rows=0)


def test_text_labels_ride_along(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from actstore.cli import main
    from actstore.store.rows import Rows
    from actstore.store.store import ActStore
    from actstore.store.train_writer import SegmentWriter

    loc = tmp_path / "s.zarr"
    store = ActStore.open(loc, create=True)
    words = np.array(["joy", "fear", "calm"])[np.arange(40) % 3]
    rows = Rows(np.arange(40, dtype=np.int32), np.zeros(40, np.int64), np.arange(40, dtype=np.int32),
                {"topic": words})  # fmt: skip
    w = SegmentWriter(store, "lay", "s", [SITE], 2, "float32", labels={"topic": words.dtype}, chunk_rows=16)
    w.append({SITE: np.zeros((40, 2), np.float32)}, rows)
    w.commit()
    got = {}
    for b in ActivationDataset(store, "lay", batch_size=7, buffer_chunks=2):
        got.update(zip(b["token_ids"].tolist(), list(b["topic"]), strict=True))
    assert got == dict(enumerate(words.tolist()))
    res = CliRunner().invoke(main, ["check", "-q", "--store", str(loc)])
    assert res.exit_code == 0, res.output


def test_two_sites_stay_row_aligned(tmp_path: Path) -> None:
    from actstore.store.rows import Rows
    from actstore.store.store import ActStore
    from actstore.store.train_writer import SegmentWriter

    store = ActStore.open(tmp_path / "s.zarr", create=True)
    other = ("mlp_act", 1)
    n = 100
    ids = np.arange(n, dtype=np.float32)
    w = SegmentWriter(store, "two", "s", [SITE, other], {SITE: 2, other: 3}, "float32", chunk_rows=8)
    w.append({SITE: np.stack([ids, ids], 1), other: np.stack([-ids, -ids, -ids], 1)},
             Rows(np.arange(n, dtype=np.int32), np.zeros(n, np.int64), np.arange(n, dtype=np.int32)))  # fmt: skip
    w.commit()
    ds = ActivationDataset(store, "two", batch_size=9, buffer_chunks=3)
    seen = []
    for b in ds:
        a, m = b["hidden_out.3"].numpy(), b["mlp_act.1"].numpy()
        assert a.shape[1] == 2 and m.shape[1] == 3
        assert np.array_equal(a[:, 0], -m[:, 0]) and np.array_equal(a[:, 0], b["token_ids"].numpy())
        seen += a[:, 0].astype(int).tolist()
    assert sorted(seen) == list(range(n))
    with pytest.raises(Exception, match="name a site"):
        ds.stats()
    assert ds.stats(other).mean.tolist() == [-(n - 1) / 2] * 3


def test_a_chunk_read_holds_the_sites_then_the_row_columns(tmp_path: Path) -> None:
    """``columns``, ``empty`` and ``read_chunk`` by default carry the row facts (token id,
    sequence, position, labels, segment) beside the sites; ``rows=False`` the sites only.
    The oracle is id_layout's construction: row r of segment s has token id s * 10^6 + r."""
    from actstore.store import train_layout as tl
    from actstore.store.train_read import TrainLayout

    store = id_layout(tmp_path / "s.zarr", [10, 6], chunk_rows=4, labels=True)
    lay = TrainLayout.open(store, "ids")
    site = tl.site_name(SITE)
    assert [name for name, _ in lay.columns([SITE])] == [site, "token_ids", "sequence_index", "position", "cls"]
    assert [name for name, _ in lay.columns([SITE], rows=False)] == [site]
    assert set(lay.empty([SITE], 3)) == {site, "token_ids", "sequence_index", "position", "cls", "segment"}
    assert set(lay.empty([SITE], 3, rows=False)) == {site}
    chunk = next(c for c in lay.chunks if lay.segments[c.segment].segment == "seg001")
    got = lay.read_chunk(chunk, [SITE])
    r = got["position"].astype(np.int64)
    assert list(r) == list(range(r[0], r[0] + chunk.n_rows))  # one chunk: consecutive rows
    np.testing.assert_array_equal(got["token_ids"], 1_000_000 + r)
    np.testing.assert_array_equal(got["sequence_index"], np.ones(chunk.n_rows))
    np.testing.assert_array_equal(got["cls"], r % 3)
    np.testing.assert_array_equal(got["segment"], np.full(chunk.n_rows, chunk.segment))
    np.testing.assert_array_equal(got[site][:, 2], 1_000_000 + r)
    assert set(lay.read_chunk(chunk, [SITE], rows=False)) == {site}
