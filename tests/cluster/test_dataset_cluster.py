"""A corpus capture into a store on (loopback) S3, one dask task per unit on the local
cluster; then resume on S3: a unit whose commit marker is gone is orphaned, a rerun
redoes only it, gc removes the leftover."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from zarr.core.sync import sync

from actstore import naming
from actstore.store.store import ActStore
from actstore.testing import topic_texts


@pytest.mark.slow
def test_dataset_on_s3_under_scheduler_then_resume(
    cluster: Any, tiny_folder: Path, tiny_loaded: Any, s3_url: str, s3_options: dict[str, Any], tmp_path: Path
) -> None:
    from actstore import capture_dataset
    from actstore.dataset import dataset_status
    from actstore.store.check import collect_garbage
    from actstore.store.rows import run_rows

    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": t, "topic": k}) + "\n" for k, t in topic_texts(8, max_chars=80)))
    opts = dict(name="d", model=str(tiny_folder), unit_size=2, batch_size=2, label_columns=["topic"],
                progress=False)  # fmt: skip
    r = capture_dataset(str(corpus), s3_url, storage_options=s3_options, scheduler=cluster.scheduler.address,
                        **opts)  # type: ignore[arg-type]  # fmt: skip
    assert r.captured == [0, 1, 2, 3]
    local = capture_dataset(str(corpus), str(tmp_path / "local.zarr"), loaded=tiny_loaded, **opts)  # type: ignore[arg-type]
    assert local.n_tokens == r.n_tokens

    s3 = ActStore.open(s3_url, storage_options=s3_options)
    disk = ActStore.open(tmp_path / "local.zarr")
    by_unit = {run.meta["dataset"]["unit"]: run for run in s3.runs(["d"])}
    for run in disk.runs(["d"]):
        other = by_unit[run.meta["dataset"]["unit"]]
        a, b = run_rows(run), run_rows(other)
        np.testing.assert_array_equal(a.token_ids, b.token_ids)
        np.testing.assert_array_equal(a.sequence_index, b.sequence_index)
        assert list(a.labels["topic"]) == list(b.labels["topic"])
        np.testing.assert_allclose(run.array("hidden_out").compute(), other.array("hidden_out").compute(),
                                   rtol=1e-3, atol=1e-3)  # fmt: skip

    # a unit killed before its commit: remove unit 2's catalog entry on S3
    victim = by_unit[2].id
    sync(s3.zstore.delete(naming.catalog_key(victim)))
    st = dataset_status(s3, "d")
    assert st.pending == [2] and st.orphaned == [victim]
    again = capture_dataset(str(corpus), s3_url, storage_options=s3_options, loaded=tiny_loaded, **opts)  # type: ignore[arg-type]
    assert again.captured == [2] and again.skipped == [0, 1, 3]
    found = collect_garbage(s3, apply=True, min_age=0)
    assert any(victim in g.where and g.removed for g in found)
    st = dataset_status(ActStore.open(s3_url, storage_options=s3_options), "d")
    assert st.complete and st.orphaned == [] and st.done == [0, 1, 2, 3]
