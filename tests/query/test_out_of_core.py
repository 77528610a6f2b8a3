"""Out of core: a query reads only the bytes its answer needs, and runs in bounded memory.

(a) A counting store proves a single-vector query touches at most one stored object
    (shard) per source, and that its bytes are a small fraction of the array.
(b) A query over a store several times larger than an address-space limit
    (``RLIMIT_AS``) set in a subprocess, just above the interpreter's own footprint,
    succeeds; loading the same arrays eagerly under that limit fails.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr

from actstore.query import states
from actstore.store.store import ActStore

from .helpers import RESIDUAL, counting_store, np_cos, raw
from .synth import write_synthetic_run

HERE = Path(__file__).parent


def _store_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


@pytest.fixture(scope="module")
def mid_store(tmp_path_factory: Any) -> Path:
    path = tmp_path_factory.mktemp("mid") / "store.zarr"
    store = ActStore.open(path, create=True)
    write_synthetic_run(store, n_layers=8, prompt_len=290, n_steps=11, width=256, sources=RESIDUAL)
    return path


def test_single_vector_touches_one_object_per_source(mid_store: Path) -> None:
    store, cs = counting_store(mid_store)
    run = store.run("latest")
    arr = run.group["acts/residual"]
    inner = int(np.prod(arr.chunks)) * arr.dtype.itemsize  # one inner chunk, uncompressed
    for source in RESIDUAL:
        nbytes = run.group["acts/residual" if source.startswith("hidden") else f"acts/{source}"].nbytes
        for layers in ([5], None):
            cs.reset()
            v = states.state_vectors(run, "final", source, layers).compute()
            reads = cs.data_reads()
            n_layers = 1 if layers else len(run.layers)
            assert len({k for k, _ in reads}) <= 1, reads  # one shard spans every layer
            got = sum(n for _, n in reads)
            index = 16 * int(np.prod(np.array(arr.shards) // np.array(arr.chunks))) + 4
            assert got <= n_layers * inner * 1.1 + index, (source, layers, got)
            assert got < nbytes / 10
            np.testing.assert_array_equal(
                v.astype(np.float64), raw(run, source)[[5] if layers else slice(None), -1]
            )


def test_many_states_read_only_their_chunks(mid_store: Path) -> None:
    store, cs = counting_store(mid_store)
    run = store.run("latest")
    cs.reset()
    from actstore.query.compare import intra_run

    intra_run(run)
    read = sum(n for _, n in cs.data_reads())
    total = sum(run.group[p].nbytes for p in ("acts/residual", "acts/attn_out", "acts/mlp_down_out"))
    assert read < total / 4


CHILD = textwrap.dedent(
    """
    import json, resource, sys, threading
    # Address space, not memory, is what RLIMIT_AS counts: keep the fixed reservations
    # of threads started later (zarr's I/O pool grows on demand) small.
    threading.stack_size(1 << 20)
    import numpy as np, dask, dask.array as da, zarr, pandas
    from actstore.store.store import ActStore
    from actstore.query import intra_run, residual_decomposition, cosine, norm
    from actstore.cli import main

    def vm():
        for line in open("/proc/self/status"):
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024

    store = ActStore.open(sys.argv[1])
    runs = store.runs(["all"])
    # warm-up on the small run: thread pools, codecs and caches exist before the baseline
    small = runs[1]
    intra_run([small])
    cosine(small.array("hidden_in"), small.array("hidden_out")).mean(axis=1).compute()
    try:  # and the export below: what it imports (torch among it) is loaded before the limit
        main(["export", "npz", small.id, "--store", sys.argv[1], "--out", sys.argv[3] + "-small", "--layout", "readme", "-q"])
    except SystemExit as e:
        assert e.code == 0, e.code
    baseline = vm()
    limit = baseline + int(sys.argv[2])
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    out = {"baseline": baseline, "limit": limit}
    run = runs[0]
    # Streams every stored byte of the run through a reduction, chunk by chunk.
    pieces = {
        "cos_in_out": cosine(run.array("hidden_in"), run.array("hidden_out")).mean(axis=1),
        "norm_attn": norm(run.array("attn_out")).mean(axis=1),
        "norm_mlp": norm(run.array("mlp_down_out")).mean(axis=1),
    }
    (vals,) = dask.compute(pieces)
    out.update({k: v.tolist() for k, v in vals.items()})
    out["intra_rows"] = len(intra_run(runs))
    out["decomposition_rows"] = len(residual_decomposition(run))
    out["peak_over_baseline"] = vm() - baseline
    try:
        da.stack([run.array(s) for s in ("hidden_out", "attn_out", "mlp_down_out")]).compute()
        out["eager_failed"] = False
    except MemoryError:
        out["eager_failed"] = True
    # a command that reads too much at once: one line and exit 1, not a traceback, and
    # never "damaged" (a compressor that cannot allocate says nothing about the bytes)
    import contextlib, io
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            main(["export", "npz", run.id, "--store", sys.argv[1], "--out", sys.argv[3], "--layout", "readme", "-q"])
    except SystemExit as e:
        out["export_exit"] = e.code
    out["export_err"] = err.getvalue()
    print(json.dumps(out))
    """
)


def test_query_over_store_larger_than_memory_limit(tmp_path: Path) -> None:
    path = tmp_path / "big.zarr"
    store = ActStore.open(path, create=True)
    write_synthetic_run(store, n_layers=12, prompt_len=3200, n_steps=2, width=1024, n_snapshots=2,
                        sources=RESIDUAL, step_chunk=500)  # fmt: skip
    write_synthetic_run(store, n_layers=2, prompt_len=64, n_steps=2, width=1024, sources=RESIDUAL, seed=1)
    size = _store_bytes(path)
    headroom = 80 * 2**20
    assert size > 2.5 * headroom
    env = {**os.environ, "MALLOC_ARENA_MAX": "1"}  # glibc reserves 64 MiB of address space per extra arena
    export = tmp_path / "export"
    proc = subprocess.run([sys.executable, "-c", CHILD, str(path), str(headroom), str(export)],
                          capture_output=True, text=True, timeout=600, env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["eager_failed"], "the limit should be too small to load the arrays eagerly"
    lines = out["export_err"].splitlines()
    assert out["export_exit"] == 1 and len(lines) == 1 and lines[0].startswith("error: "), out["export_err"]
    assert "out of memory" in lines[0] and "damaged" not in lines[0], lines[0]
    assert not export.exists()  # nothing half-written
    assert out["intra_rows"] == 4 * (12 + 2) and out["decomposition_rows"] == 2 * 12
    # spot-check the streamed reductions against direct zarr reads of layer 0
    run = store.runs(["all"])[0]
    res = zarr.open_array(store=run.group.store, path=f"{run.group.path}/acts/residual", mode="r")
    hin, hout = res[0].astype(np.float64), res[1].astype(np.float64)
    expected = np.mean([np_cos(a, b) for a, b in zip(hin, hout, strict=True)])
    assert out["cos_in_out"][0] == pytest.approx(expected, rel=1e-9)
