"""Queries and captures on a real dask.distributed cluster (2 local worker processes)
over a store on loopback S3."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import dask.array as da
import numpy as np
import pandas as pd
import pytest
from distributed import get_task_stream

from actstore.capture.runner import capture
from actstore.distributed import ClusterError, gpu_resources, scheduler, worker_location
from actstore.query.compare import compare_states_plan, inter_run_plan, snapshots_vs_references_plan
from actstore.query.plan import compute_plans
from actstore.store.store import ActStore

from .helpers import make_scenario, run_cli, write_scenario


@pytest.fixture(scope="module")
def study(tiny_folder: Path, tiny_loaded: Any, s3_endpoint: str) -> str:
    """Three captured runs of two scenarios on S3; returns the store URL."""
    import boto3

    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="cluster-study")
    url = "s3://cluster-study/acts.zarr"
    opts = {"endpoint_url": s3_endpoint}
    for name, tokens in (("calm", 5), ("storm", 7), ("calm", 3)):
        sc = make_scenario(tiny_folder, name, tokens, logits=False, attention_weights=False)
        capture(sc, url, loaded=tiny_loaded, storage_options=opts, progress=False)
    return url


def _queries(runs: list[Any]) -> list[pd.DataFrame]:
    plans = [
        compare_states_plan(runs, "initial", "final"),
        inter_run_plan(runs),
        snapshots_vs_references_plan(runs),
    ]
    return compute_plans(*plans)


def test_query_on_cluster_equals_local(cluster: Any, study: str, s3_options: dict[str, Any]) -> None:
    runs = ActStore.open(study, storage_options=s3_options).runs()
    with scheduler(None) as none:
        assert none is None
        local = _queries(runs)
    with scheduler(cluster.scheduler.address) as client, get_task_stream(client) as ts:
        remote = _queries(runs)  # the graph (zarr arrays on S3 inside) travels to the workers
    workers = set(cluster.scheduler_info()["workers"])
    assert ts.data and {t["worker"] for t in ts.data} <= workers
    for a, b in zip(local, remote, strict=True):
        assert len(a) > 0
        pd.testing.assert_frame_equal(a, b)


def _slow_query(runs: list[Any]) -> da.Array:
    """Sum of squares per run and layer, with a slow task per chunk (a kill lands mid-way)."""
    # A lambda, so it travels by value: the workers cannot import this test module.
    slow = lambda block: (time.sleep(0.25), block)[1]  # noqa: E731
    parts = []
    for run in runs:
        x = run.array("hidden_out")
        parts.append((x.map_blocks(slow, dtype=x.dtype).astype("f8") ** 2).sum(axis=(1, 2)))
    return da.stack(parts)


def test_worker_killed_mid_query_keeps_the_answer(
    cluster: Any, study: str, s3_options: dict[str, Any]
) -> None:
    runs = ActStore.open(study, storage_options=s3_options).runs()
    expected = _slow_query(runs).compute(scheduler="threads")
    with scheduler(cluster.scheduler.address) as client:
        assert client is not None
        future = client.compute(_slow_query(runs))
        deadline = time.time() + 60
        while not all(client.processing().values()) and time.time() < deadline:
            time.sleep(0.02)  # until both workers run tasks
        victim = next(w for w, keys in client.processing().items() if keys)
        pid = client.run(os.getpid, workers=[victim])[victim]
        os.kill(pid, signal.SIGKILL)
        got = future.result(timeout=180)
        assert not future.status == "error"
    np.testing.assert_array_equal(got, expected)
    cluster.wait_for_workers(2, timeout=120)  # the nanny replaced the killed worker
    assert pid not in cluster.run(os.getpid).values()


@pytest.mark.slow  # subprocesses, a browser or many captures: the full suite runs it
def test_cli_capture_folder_and_query_on_cluster(
    cluster: Any, tiny_folder: Path, tiny_loaded: Any, s3_url: str, s3_endpoint: str, tmp_path: Path
) -> None:
    names = ["alpha", "beta", "gamma"]
    for i, name in enumerate(names):
        write_scenario(
            tmp_path / "scenarios", tiny_folder, name, 3 + i, logits=False, attention_weights=False
        )
    address = cluster.scheduler.address
    opts = ["--store", s3_url, "--storage-option", f"endpoint_url={s3_endpoint}"]
    out = run_cli("capture", str(tmp_path / "scenarios"), *opts, "--scheduler", address, "-q")
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [ln.split("\t") for ln in out.stdout.strip().splitlines()]
    assert sorted(ln[0].split("_")[0] for ln in lines) == names and {ln[1] for ln in lines} == {s3_url}

    store = ActStore.open(s3_url, storage_options={"endpoint_url": s3_endpoint})
    assert sorted(e["scenario"] for e in store.catalog_entries()) == names
    # A worker's run holds the numbers of the same scenario captured here, on local disk.
    sc = make_scenario(tiny_folder, "beta", 4, logits=False, attention_weights=False)
    [here] = capture(sc, str(tmp_path / "local.zarr"), loaded=tiny_loaded, progress=False)
    mine, theirs = ActStore.open(tmp_path / "local.zarr").run(here.run_id), store.run("latest:beta")
    for source in ("hidden_out", "q", "mlp_down_out"):
        np.testing.assert_allclose(
            theirs.array(source).compute(), mine.array(source).compute(), rtol=1e-5, atol=1e-6
        )

    # query via the CLI on the cluster (env var) == the library on the local scheduler
    env_run = run_cli("query", "cosine", "--runs", "all", *opts, "--format", "csv",
                      env={**os.environ, "ACTSTORE_SCHEDULER": address})  # fmt: skip
    assert env_run.returncode == 0, env_run.stderr[-3000:]
    local = run_cli("query", "cosine", "--runs", "all", *opts, "--format", "csv")
    assert local.returncode == 0 and local.stdout == env_run.stdout


def test_unreachable_scheduler_is_one_clear_error() -> None:
    with pytest.raises(ClusterError, match="cannot reach a Dask scheduler"):
        with scheduler("tcp://127.0.0.1:9", timeout=1):
            pass


def test_gpu_resources_and_worker_locations() -> None:
    def fake(resources: list[dict[str, float]]) -> Any:
        info = {"workers": {f"tcp://10.0.0.{i}:1": {"resources": r} for i, r in enumerate(resources)}}
        return SimpleNamespace(scheduler_info=lambda n_workers=-1: info)

    assert gpu_resources(fake([{}, {}])) is None
    assert gpu_resources(fake([{}, {"GPU": 1}])) == {"GPU": 1}
    assert worker_location("s3://b/acts.zarr") == "s3://b/acts.zarr"
    assert worker_location("stores/a.zarr") == os.path.abspath("stores/a.zarr")
    assert worker_location("file:///data/a.zarr") == "/data/a.zarr"
