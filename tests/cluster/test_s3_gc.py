"""``check`` and ``gc`` on a (loopback) S3 store: the findings, and the sizes gc reports,
against the object listing boto3 gives (not the store's own listing)."""

from __future__ import annotations

from typing import Any

import boto3

from actstore import naming
from actstore.store.check import check_store, collect_garbage
from actstore.store.store import ActStore
from query.synth import write_synthetic_run


def test_gc_on_s3_finds_orphans_and_temp_files_with_their_sizes(s3_url: str, s3_options: dict[str, Any],
                                                                 s3_endpoint: str) -> None:  # fmt: skip
    store = ActStore.open(s3_url, create=True, storage_options=s3_options)
    write_synthetic_run(store, n_layers=2, prompt_len=8, n_steps=3, width=16)
    committed = store.run_ids()
    bucket, prefix = s3_url.removeprefix("s3://").split("/", 1)
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    orphan = f"{naming.RUNS_PREFIX}/killed_20260101T000000_aaaaaa"
    s3.put_object(Bucket=bucket, Key=f"{prefix}/{orphan}/zarr.json", Body=b"{}")
    s3.put_object(Bucket=bucket, Key=f"{prefix}/{orphan}/acts/blob", Body=b"\0" * 5000)
    s3.put_object(Bucket=bucket, Key=f"{prefix}/{naming.CATALOG_PREFIX}/.tmp-abc", Body=b"x" * 123)

    result = check_store(ActStore.open(s3_url, storage_options=s3_options), progress=False)
    assert {(f.problem, f.key) for f in result.findings} == {
        ("orphaned", f"{orphan}/"), ("temporary", f"{naming.CATALOG_PREFIX}/.tmp-abc")}
    listed = s3.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/{naming.RUNS_PREFIX}/{committed[0]}/")
    assert result.objects == sum("/c/" in o["Key"] or o["Key"].endswith("/c") for o in listed["Contents"])

    found = {g.where: g for g in collect_garbage(ActStore.open(s3_url, storage_options=s3_options), min_age=0)}
    assert (found[f"{orphan}/"].what, found[f"{orphan}/"].bytes) == ("orphaned run", 5002)
    temp = found[f"{naming.CATALOG_PREFIX}/.tmp-abc"]
    assert (temp.what, temp.bytes, temp.removable) == ("temp file", 123, True)
    collect_garbage(ActStore.open(s3_url, storage_options=s3_options), apply=True, min_age=0)
    left = s3.list_objects_v2(Bucket=bucket, Prefix=prefix)["Contents"]
    assert not any(orphan in o["Key"] or ".tmp-abc" in o["Key"] for o in left)
    assert ActStore.open(s3_url, storage_options=s3_options).run_ids() == committed
