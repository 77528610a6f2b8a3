"""Real parts on loopback for the cluster tests: a moto S3 server, a 2-process Dask
LocalCluster, and a tiny random llama saved as a model folder (so every process, the
CLI and the Dask workers load it through the real ``load_model`` path).

Only 127.0.0.1 is used; the server and the cluster are started once per session and
stopped after. Credentials are fake and set before the cluster spawns its workers (they
inherit them); the endpoint is NOT put in the environment, so tests pass it as a
storage option unless they test the environment variable on purpose.
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

FAKE_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """http://127.0.0.1:PORT of a moto S3 server in this process (a thread)."""
    from moto.server import ThreadedMotoServer

    saved = {k: os.environ.get(k) for k in [*FAKE_CREDENTIALS, "AWS_ENDPOINT_URL"]}
    os.environ.update(FAKE_CREDENTIALS)
    os.environ.pop("AWS_ENDPOINT_URL", None)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def s3_options(s3_endpoint: str) -> dict[str, Any]:
    return {"endpoint_url": s3_endpoint}


@pytest.fixture
def s3_url(s3_endpoint: str) -> str:
    """``s3://<fresh bucket>/studies/acts.zarr``: a store URL nothing has written yet."""
    import boto3

    bucket = f"acts-{secrets.token_hex(4)}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
    return f"s3://{bucket}/studies/acts.zarr"


@pytest.fixture(scope="session")
def cluster(s3_endpoint: str) -> Iterator[Any]:
    """A LocalCluster of 2 worker processes (1 thread each) and a Client connected to it."""
    from distributed import Client, LocalCluster

    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None
    ) as lc, Client(lc, set_as_default=False) as client:  # fmt: skip
        client.wait_for_workers(2, timeout=120)
        yield client


@pytest.fixture(scope="session")
def tiny_loaded(tiny_folder: Path) -> Any:
    """The saved tiny model loaded once (eager attention) for in-process captures."""
    from actstore.models.loading import load_model
    from actstore.scenario import ModelConfig

    return load_model(
        ModelConfig(id=str(tiny_folder), dtype="float32", device="cpu"), attn_implementation="eager"
    )
