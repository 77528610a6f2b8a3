"""A real ``actstore export hf-dataset`` process killed while it writes leaves nothing at --out.

The child interpreter exports a synthetic run big enough to be caught mid-write: it is
signalled as soon as bytes appear in its staging folder (``.<out>.arrow-*``, the Arrow
file being filled) or its temporary dataset folder (``.<out>.partial-*``). SIGTERM: the command
removes both and exits with one ``interrupted`` line, no traceback. SIGKILL: hidden
temporary folders may stay (nothing can remove them), but --out never exists, and the
next export writes it whole. Slow: a fresh interpreter per signal.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from actstore.store.store import ActStore
from query.synth import write_synthetic_run

HOOK = "blocks.0.hook_resid_post"


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_killed_export_leaves_no_dataset(tmp_path: Path, sig: int) -> None:
    store_path = tmp_path / "store.zarr"
    store = ActStore.open(store_path, create=True)
    run_id = write_synthetic_run(store, n_layers=1, prompt_len=49152, n_steps=1, width=576,
                                 sources=("hidden_in",), n_snapshots=0, labels=())  # fmt: skip
    out = tmp_path / "exports" / "ds"
    out.parent.mkdir()  # a folder the export did not make: it must clean inside it
    args = ["export", "hf-dataset", run_id, "--store", str(store_path), "--out", str(out),
            "--hook", HOOK, "--context", "64", "-q"]  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "actstore", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip

    def temporary() -> list[Path]:
        return list(out.parent.glob(f".{out.name}.*")) if out.parent.is_dir() else []

    def writing() -> bool:  # bytes in the Arrow file or the dataset folder: caught mid-write
        return any(f.is_file() and f.stat().st_size > 0 for t in temporary() for f in t.rglob("*"))

    deadline = time.monotonic() + 120
    while not writing():
        assert proc.poll() is None, f"the export ended before it was caught writing: {proc.communicate()}"
        assert time.monotonic() < deadline, "the export never started writing"
        time.sleep(0.002)
    os.kill(proc.pid, sig)
    _, err = proc.communicate(timeout=60)

    assert not out.exists()
    if sig == signal.SIGTERM:
        assert proc.returncode != 0 and "Traceback" not in err, err
        assert "interrupted" in err and err.strip().count("\n") == 0, err
        assert temporary() == [], "a SIGTERM left a temporary folder behind"
    else:
        assert proc.returncode == -signal.SIGKILL
    done = subprocess.run(
        [sys.executable, "-m", "actstore", *args], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0 and done.stdout.strip() == str(out), done.stderr
    assert (out / "dataset_info.json").is_file() and (out / "state.json").is_file()
