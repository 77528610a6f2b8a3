"""``--layout train``: corpus units written straight into the token-major train layout.

Checked against the same capture with the default layout, read straight from Zarr: every
site's rows bit for bit (the residual boundaries, q, the MLP and the derived
``mlp_down_in``), and the row facts and labels; a unit redone after its run was lost
rewrites its own segment (each token once); ``--force`` replaces the layout; the layout
reads through ActivationDataset's batch iterator."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr

from actstore.testing import topic_texts

from .conftest import write_jsonl

SITES_FROM = {"hidden_in": ("residual", 0), "hidden_out": ("residual", 1)}  # boundary offset of a layer


def _capture(corpus: Path, store: Path, loaded: Any, **kw: Any) -> Any:
    from actstore import capture_dataset

    return capture_dataset(str(corpus), str(store), name="d", model="tiny", loaded=loaded, unit_size=3, batch_size=2,
                           capture=("hidden_states", "qkv", "mlp"), progress=False, **kw)  # fmt: skip


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    texts = topic_texts(7, max_chars=90)
    return write_jsonl(tmp_path / "c.jsonl", [{"text": t, "topic": k, "n": i} for i, (k, t) in enumerate(texts)])


def _unit_groups(store: Path) -> list[Any]:
    root = zarr.open_group(store, mode="r")
    entries = [json.loads(p.read_text()) for p in (store / "catalog").glob("*.json") if not p.name.startswith(".")]
    entries.sort(key=lambda e: e["dataset"]["unit"])
    return [root[f"runs/{e['id']}"] for e in entries]


def _site_rows(groups: list[Any], source: str, layer: int, gated: bool) -> np.ndarray:
    """One site's rows over every unit of a default-layout capture, from Zarr alone."""
    parts = []
    for g in groups:
        layers = list(g.attrs["run"]["layers"])
        if source in SITES_FROM:
            res = g["acts/residual"]
            bounds = list(res.attrs["boundaries"])
            parts.append(res[bounds.index(layer + SITES_FROM[source][1])])
        elif source == "mlp_down_in":
            act, up = g["acts/mlp_act"][layers.index(layer)], g["acts/mlp_up"][layers.index(layer)]
            parts.append(act * up if gated else act)
        else:
            parts.append(g[f"acts/{source}"][layers.index(layer)])
    return np.concatenate(parts)


def test_train_layout_holds_the_runs_bits(tmp_path: Path, corpus: Path, tiny_model_loaded: Any) -> None:
    from actstore.store.store import ActStore
    from actstore.store.train_read import TrainLayout

    runs, train = tmp_path / "runs.zarr", tmp_path / "train.zarr"
    _capture(corpus, runs, tiny_model_loaded, label_columns=("topic", "n"))
    r = _capture(corpus, train, tiny_model_loaded, label_columns=("topic", "n"), layout="train")
    assert r.captured == [0, 1, 2]
    lay = TrainLayout.open(ActStore.open(train), "d")
    groups = _unit_groups(runs)
    gated = bool(groups[0].attrs["run"]["gated_mlp"])
    assert gated  # the tiny llama: mlp_down_in is derived from act * up
    n = sum(g["rows/token_ids"].shape[0] for g in groups)
    assert lay.n_rows == n and len(lay.sites) == 11 * 3  # 11 per-layer vector sources x 3 layers
    for source, layer in lay.sites:
        got = lay.read_site((source, layer))
        assert np.array_equal(got, _site_rows(groups, source, layer, gated)), (source, layer)
    rows = lay.read_rows()
    for name in ("token_ids", "sequence_index", "position"):
        want = np.concatenate([g[f"rows/{name}"][...] for g in groups])
        assert np.array_equal(rows[name], want), name
    assert np.array_equal(rows["n"], np.concatenate([g["rows/labels/n"][...] for g in groups]))
    assert list(rows["topic"]) == [str(t) for g in groups for t in g["rows/labels/topic"][...]]
    # the unit runs of a train capture hold the row facts and no activations
    for g in _unit_groups(train):
        assert g.attrs["run"]["sources"] == [] and "acts" not in g
        assert g.attrs["run"]["dataset"]["layout"]["segment"].startswith("d.u")


def test_a_redone_unit_rewrites_its_segment(tmp_path: Path, corpus: Path, tiny_model_loaded: Any) -> None:
    """The unit's run is its commit: lost after the segment committed (a kill between the
    two), the rerun redoes the unit into the same segment, and the layout holds each
    token once."""
    from actstore.store.store import ActStore
    from actstore.store.train_read import TrainLayout

    store = tmp_path / "s.zarr"
    _capture(corpus, store, tiny_model_loaded, layout="train")
    before = TrainLayout.open(ActStore.open(store), "d").read_rows()
    lost = sorted((store / "catalog").glob("d.u00001_*.json"))
    assert len(lost) == 1
    lost[0].unlink()  # unit 1 no longer committed; its segment is
    again = _capture(corpus, store, tiny_model_loaded, layout="train")
    assert again.captured == [1] and again.skipped == [0, 2]
    after = TrainLayout.open(ActStore.open(store), "d").read_rows()
    assert np.array_equal(after["sequence_index"], before["sequence_index"])
    assert np.array_equal(after["token_ids"], before["token_ids"])
    # the lost unit's run group and its segment's first folder are what check calls
    # orphaned, and gc removes them
    from actstore.store.check import check_store, collect_garbage

    found = check_store(ActStore.open(store)).findings
    assert [f.problem for f in found] == ["orphaned", "orphaned"]
    assert sorted(f.key.split("/")[0] for f in found) == ["layouts", "runs"]
    assert all("d.u00001" in f.key for f in found)
    collect_garbage(ActStore.open(store), apply=True, min_age=0)
    assert check_store(ActStore.open(store)).ok


def test_force_replaces_the_layout(tmp_path: Path, corpus: Path, tiny_model_loaded: Any) -> None:
    from actstore.store.store import ActStore
    from actstore.store.train_read import TrainLayout
    from actstore.torch import ActivationDataset

    store = tmp_path / "s.zarr"
    _capture(corpus, store, tiny_model_loaded, layout="train")
    _capture(corpus, store, tiny_model_loaded, layout="train", layers="1", force=True)
    lay = TrainLayout.open(ActStore.open(store), "d")
    assert {layer for _, layer in lay.sites} == {1}
    batches = list(ActivationDataset(str(store), "d", [("hidden_out", 1)], batch_size=5, seed=1))
    seen = np.concatenate([b["sequence_index"].numpy() for b in batches])
    assert sorted(seen.tolist()) == sorted(lay.read_rows()["sequence_index"].tolist())
