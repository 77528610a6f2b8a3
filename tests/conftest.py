"""Suite-wide pytest setup: the ``slow`` marker and one shared actstore cache.

The built-in model is de-quantized once (~25 s) into ``$ACTSTORE_CACHE``. When the caller
has not set it, the suite uses a folder inside pytest's own cache (``.pytest_cache``,
git-ignored), so the cost is paid once per checkout, not once per test or per session,
and the user's ``~/.cache/actstore`` is left alone.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest


def pytest_configure(config: pytest.Config) -> None:
    if getattr(config.option, "numprocesses", None) or os.environ.get("PYTEST_XDIST_WORKER"):
        # Parallel workers outnumber the cores: one torch (OpenMP) thread each, or idle
        # threads spin for cores the other workers need (test_full_passes.py beside a busy
        # machine: 80 s of CPU and 166 s of wall with two threads, 64 s and 74 s with one).
        # Set before torch is imported, so subprocesses the tests start inherit it too.
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    config.addinivalue_line(
        "markers", "slow: the real SmolLM2 model, subprocesses killed or racing, a browser driving a capture (seconds to a minute)"
    )
    # Subprocesses the tests start (the CLI, kill tests, dask workers) must run the copy of
    # actstore this process tests, not whatever the interpreter would import by default:
    # an installed release beside a checkout, or the source a mutation tool has copied.
    spec = importlib.util.find_spec("actstore")
    if spec is not None and spec.origin:
        here = str(Path(spec.origin).parents[1])
        os.environ["PYTHONPATH"] = os.pathsep.join([here, *filter(None, [os.environ.get("PYTHONPATH")])])
    if not os.environ.get("ACTSTORE_CACHE"):
        cache = getattr(config, "cache", None)  # absent under -p no:cacheprovider
        folder = (
            cache.mkdir("actstore")
            if cache is not None
            else Path(config.rootpath) / ".pytest_cache" / "actstore"
        )
        os.environ["ACTSTORE_CACHE"] = str(folder)


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny random llama (3 layers; model + tokenizer): a model id any process,
    the CLI's included, loads for real."""
    from actstore.testing import tiny_model

    folder = tmp_path_factory.mktemp("models") / "tiny-llama"
    model, tok = tiny_model("llama", seed=3)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
