"""Scale benchmark: 1,000 small runs on local disk and on loopback S3.

Run: ``/work/venv/bin/python benchmarks/bench_scale.py [--runs 1000] [--positions 64]``

Writes one store of ``--runs`` synthetic runs on local disk and one on a moto S3 server
(``moto_server`` as a child process on 127.0.0.1, stopped at the end), both through the
real writer (RunWriter, ArrayPlan, layout specs, consolidated metadata, commit). A run is
SmolLM2-shaped: 30 layers x ``--positions`` positions x 576 hidden, float16, residual
stream + attn_out + mlp_down_out, 4 conversation snapshots and 2 references. Activations
are windows of a random pool (no RNG cost per run; different bytes per run).

Measured, on each store: writing, ``actstore ls`` (catalog listing: with and without the
catalog snapshot), and one query across all runs (initial vs final hidden_out, cosine /
MAE / Jaccard, every run and layer) on the local threaded scheduler and on a
LocalCluster of 2 worker processes. S3 request counts are counted in this process
(s3fs calls); the cluster's workers are not counted. Writes benchmarks/results/scale.md.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from zarr.core.sync import sync

HERE = Path(__file__).resolve().parent
L, H, SNAPSHOTS, REFERENCES = 30, 576, 4, ("joy", "fear")
STORED = ("attn_out", "mlp_down_out")  # besides the residual stream (hidden_in/out)
REQUESTS: collections.Counter[str] = collections.Counter()


def count_s3_requests() -> None:
    """Count every S3 API call this process makes (by operation)."""
    import s3fs.core

    orig = s3fs.core.S3FileSystem._call_s3

    async def counted(self: Any, method: str, *args: Any, **kwargs: Any) -> Any:
        REQUESTS[method] += 1
        return await orig(self, method, *args, **kwargs)

    s3fs.core.S3FileSystem._call_s3 = counted


def start_moto() -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = Path(sys.executable).parent / "moto_server"
    proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("moto_server did not start")


# ---- a synthetic run through the real writer --------------------------------------------------
class Pool:
    """Random float16 activations; each run reads a window at its own offset."""

    def __init__(self, positions: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.span = 8 * positions
        self.res = rng.standard_normal((L + 1, self.span + positions, H), dtype=np.float32).astype(np.float16)
        self.src = {s: rng.standard_normal((L, self.span + positions, H), dtype=np.float32).astype(np.float16)
                    for s in STORED}  # fmt: skip


def write_run(store: Any, pool: Pool, i: int, positions: int, prompt_len: int) -> str:
    import torch

    from actstore import naming
    from actstore.store import layout
    from actstore.store.writer import ArrayPlan, RunWriter, write_rows, write_run_meta, write_small_array

    f16 = np.dtype("float16")
    layers, bounds = list(range(L)), layout.residual_boundaries(list(range(L)))
    attrs = {"actstore_dtype": "float16"}
    plans = [ArrayPlan(naming.RESIDUAL_ARRAY, layout.vector_spec(naming.RESIDUAL_ARRAY, len(bounds), positions, H, f16),
                       tuple(("residual", b) for b in bounds), {**attrs, "boundaries": bounds})]  # fmt: skip
    plans += [ArrayPlan(s, layout.vector_spec(s, L, positions, H, f16), tuple((s, la) for la in layers),
                        {**attrs, "layers": layers}) for s in STORED]  # fmt: skip
    run_id = store.new_run_id(f"scale{i % 10}")
    group = store.create_run_group(run_id)
    writer = RunWriter(group, plans)
    off = (i * 7919) % pool.span
    position, steps = 0, []
    for step in range(positions - prompt_len + 1):  # a prefill, then one position per decode step
        n = prompt_len if step == 0 else 1
        w = slice(off + position, off + position + n)
        tensors = {("residual", b): torch.from_numpy(pool.res[b, w]) for b in bounds}
        tensors.update({(s, la): torch.from_numpy(pool.src[s][la, w]) for s in STORED for la in layers})
        writer.submit(position, tensors)
        steps.append({"step": step, "kind": "prefill" if step == 0 else "decode", "seq_len": n,
                      "positions": [position, position + n], "generated_token_id": 1, "top_k": []})  # fmt: skip
        position += n
    writer.finish(position)
    write_small_array(group, naming.TOKENS_ARRAY, np.arange(position, dtype=np.int64))
    write_small_array(group, naming.POSITION_STEP_ARRAY,
                      np.asarray([0] * prompt_len + list(range(1, position - prompt_len + 1)), dtype=np.int32))  # fmt: skip
    for where, rows in ((naming.SNAPSHOTS_GROUP, SNAPSHOTS), (naming.REFERENCES_GROUP, len(REFERENCES))):
        for k, s in enumerate(naming.RESIDUAL_SOURCES):  # one object per stack, as the capture writes them
            src = pool.res if s.startswith("hidden") else pool.src[STORED[k % 2]]
            write_rows(group, f"{where}/{s}", src[k % 2 : k % 2 + rows, off : off + L], "float16", layers)
    served = [s for s in naming.ALL_SOURCES if s in ("hidden_in", "hidden_out", *STORED)]
    meta = {"scenario": {"name": f"scale{i % 10}"}, "model": {"id": "synthetic-smollm2-shape"},
            "created_at": datetime.now(UTC).isoformat(), "prompt_len": prompt_len, "n_positions": position,
            "layers": layers, "sources": served, "residual_boundaries": bounds, "gated_mlp": True,
            "store_dtype": "float16", "steps": steps, "generated_text": "",
            "snapshots": [{"index": k, "role": ("system", "user", "assistant")[min(k, 1) + (k > 0 and k % 2 == 0)],
                           "content_preview": f"m{k}"} for k in range(SNAPSHOTS)],
            "references": list(REFERENCES)}  # fmt: skip
    write_run_meta(group, meta)  # as a capture writes it: step records in their own array
    store.commit(run_id, {"scenario": meta["scenario"]["name"], "model": meta["model"]["id"],
                          "created_at": meta["created_at"], "prompt_len": prompt_len, "n_steps": len(steps),
                          "n_positions": position, "n_layers": L, "layers": layers, "sources": served,
                          "n_snapshots": SNAPSHOTS, "n_references": len(REFERENCES), "store_dtype": "float16",
                          "generated_text": ""})  # fmt: skip
    return run_id


def write_store(
    location: str, opts: dict[str, Any], runs: range, positions: int, pool: Pool, threads: int
) -> float:
    from actstore.store.store import ActStore

    store = ActStore.open(location, create=True, storage_options=opts)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as ex:  # independent runs: several writers at once
        list(ex.map(lambda i: write_run(store, pool, i, positions, positions - 16), runs))
    return time.perf_counter() - t0


def upload_runs(local: Path, url: str, opts: dict[str, Any], n: int) -> float:
    """Copy the first ``n`` committed runs of the local store (the writer's own bytes:
    groups, arrays, catalog entries) to S3, concurrently. Faster than writing them again:
    moto serves ~250 requests/s, and a run is ~31 objects."""
    import s3fs

    from actstore.store.store import ActStore

    ids = ActStore.open(local).run_ids()[:n]
    files = [local / "zarr.json", local / "runs" / "zarr.json"]
    for rid in ids:
        files += [p for p in (local / "runs" / rid).rglob("*") if p.is_file()]
        files.append(local / "catalog" / f"{rid}.json")
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **opts)
    base = url.removeprefix("s3://")
    t0 = time.perf_counter()
    fs.put(
        [str(p) for p in files], [f"{base}/{p.relative_to(local).as_posix()}" for p in files], batch_size=64
    )
    return time.perf_counter() - t0


# ---- measurements -----------------------------------------------------------------------------
def timed(fn: Any) -> tuple[float, Any, dict[str, int]]:
    REQUESTS.clear()
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out, dict(REQUESTS)


def listing(location: str, opts: dict[str, Any]) -> dict[str, Any]:
    """`actstore ls`'s library call, three ways: entry by entry (no snapshot), the first
    listing that writes the snapshot, and a listing that uses it."""
    from actstore.store import remote
    from actstore.store.store import ActStore

    store = ActStore.open(location, storage_options=opts)
    sync(store.zstore.delete(remote.SNAPSHOT_KEY))
    out: dict[str, Any] = {}
    out["no_snapshot"] = timed(lambda: sync(remote.read_catalog(store.zstore, write_snapshot=False)))
    out["writes_snapshot"] = timed(store.catalog)
    out["with_snapshot"] = timed(store.catalog)
    return out


def query(
    location: str, opts: dict[str, Any], address: str | None, n_runs: int, threads: int | None
) -> tuple[Any, ...]:
    """Initial vs final hidden_out over the first ``n_runs`` runs, every layer:
    (seconds, rows, requests, seconds to open the runs)."""
    import dask

    from actstore.distributed import scheduler
    from actstore.query.compare import compare_states_plan
    from actstore.store.store import ActStore

    with scheduler(address), dask.config.set(num_workers=threads):
        REQUESTS.clear()
        t0 = time.perf_counter()
        store = ActStore.open(location, storage_options=opts)
        runs = store.runs(store.run_ids()[:n_runs])
        t_open = time.perf_counter() - t0
        df = compare_states_plan(runs, "initial", "final", sources=["hidden_out"]).compute()
        return time.perf_counter() - t0, len(df), dict(REQUESTS), t_open


def dir_bytes(path: Path) -> tuple[int, int]:
    files = [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files), len(files)


def cli_ls(location: str, endpoint: str | None) -> float:
    """Wall time of the real command, interpreter start included."""
    args = [str(Path(sys.executable).parent / "actstore"), "ls", "--store", location, "--format", "csv"]
    args += ["--storage-option", f"endpoint_url={endpoint}"] if endpoint else []
    t0 = time.perf_counter()
    out = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=1000)
    ap.add_argument("--positions", type=int, default=32, help="positions per run (prompt = positions - 16)")
    ap.add_argument(
        "--s3-query-runs", type=int, default=150, help="runs the S3 queries cover (moto: ~250 GET/s)"
    )
    ap.add_argument("--s3-direct-runs", type=int, default=100,
                    help="runs written into S3 through the writer; the rest are copied from the local store")  # fmt: skip
    ap.add_argument("--threads", type=int, default=4, help="runs written at once")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "scale.md")
    args = ap.parse_args()
    os.environ.update(
        {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
    )
    os.environ.pop("AWS_ENDPOINT_URL", None)
    count_s3_requests()
    work = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    moto, endpoint = start_moto()
    cluster = None
    r: dict[str, Any] = {}
    t_all = time.perf_counter()
    try:
        import boto3
        from distributed import LocalCluster

        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="scale")
        pool = Pool(args.positions)
        local, s3 = work / "scale.zarr", "s3://scale/scale.zarr"
        where = {"local disk": (str(local), {}), "loopback S3": (s3, {"endpoint_url": endpoint})}
        r["write", "local disk"] = (
            args.runs,
            write_store(str(local), {}, range(args.runs), args.positions, pool, args.threads),
            {},
        )
        print("local written", r["write", "local disk"], flush=True)
        n_copy = args.runs - args.s3_direct_runs
        r["upload"] = (n_copy, upload_runs(local, s3, where["loopback S3"][1], n_copy))
        print("uploaded", r["upload"], flush=True)
        REQUESTS.clear()
        direct = range(args.runs, args.runs + args.s3_direct_runs)
        t = write_store(s3, where["loopback S3"][1], direct, args.positions, pool, args.threads)
        r["write", "loopback S3"] = (args.s3_direct_runs, t, dict(REQUESTS))
        print("S3 written", r["write", "loopback S3"], flush=True)
        for name, (loc, opts) in where.items():
            r[name, "list"] = listing(loc, opts)
            r[name, "cli ls"] = cli_ls(loc, opts.get("endpoint_url"))
            print(name, "listed", r[name, "cli ls"], flush=True)
        r["disk"] = dir_bytes(work / "scale.zarr")
        cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
        plan = [("local disk", args.runs, "local threads (2)", None, None),
                ("local disk", args.runs, "LocalCluster 2 x 1", cluster.scheduler_address, None),
                ("loopback S3", args.s3_query_runs, "local threads (2)", None, None),
                ("loopback S3", args.s3_query_runs, "LocalCluster 2 x 1", cluster.scheduler_address, None)]  # fmt: skip
        for name, n, sched, address, threads in plan:
            loc, opts = where[name]
            r["query", name, sched] = (n, *query(loc, opts, address, n, threads))
            print(name, n, sched, r["query", name, sched][:3], flush=True)
    finally:
        if cluster is not None:
            cluster.close()
        moto.kill()
        moto.wait()
        shutil.rmtree(work, ignore_errors=True)
    text = render(r, args, time.perf_counter() - t_all)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


_SHORT = {"get_object": "GET", "put_object": "PUT", "head_object": "HEAD", "list_objects_v2": "LIST",
          "delete_object": "DELETE", "delete_objects": "DELETE"}  # fmt: skip


def _req(d: dict[str, int]) -> str:
    if not d:
        return "-"
    parts = ", ".join(f"{_SHORT.get(k, k)} {v:,}" for k, v in sorted(d.items()))
    return f"{sum(d.values()):,} ({parts})"


def render(r: dict[Any, Any], args: argparse.Namespace, total: float) -> str:
    n = args.runs
    size, files = r["disk"]
    lines = [
        "## Scale",
        "",
        f"{n:,} synthetic runs written through the real writer, each 30 layers x {args.positions} positions x 576 "
        f"hidden, float16: residual stream (31 boundaries) + attn_out + mlp_down_out, 4 snapshots, 2 references. "
        f"On local disk: {size / 2**30:.2f} GiB in {files:,} files ({size / n / 2**20:.2f} MiB, {files / n:.0f} "
        f"files per run). Loopback S3 is a moto server process on 127.0.0.1 (every request is a Python HTTP "
        f"round trip of a few ms: slower than local disk, faster than real S3's ~20-50 ms first byte). "
        f"{args.threads} runs written at once. 2 CPU cores; whole benchmark {total / 60:.1f} min.",
        "",
        "| store | runs written through the writer | time | per run | S3 requests (this process) |",
        "|---|---|---|---|---|",
    ]
    for name in ("local disk", "loopback S3"):
        runs, t, req = r["write", name]
        per = f"; {sum(req.values()) / runs:.0f} per run" if req else ""
        lines.append(f"| {name} | {runs:,} | {t:.1f} s | {1000 * t / runs:.0f} ms | {_req(req)}{per} |")
    lines += [
        "",
        f"The other {r['upload'][0]:,} runs of the S3 store are the local store's first runs, copied "
        f"object by object (64 PUTs in flight): {r['upload'][1]:.1f} s. Both stores hold {n:,} runs.",
    ]
    lines += ["", "Listing the catalog (`ActStore.catalog()`, what `actstore ls` calls):", "",
              "| store | entry by entry (64 concurrent GETs) | first listing (writes the snapshot) | with the snapshot | `actstore ls` command, process start included |",
              "|---|---|---|---|---|"]  # fmt: skip
    for name in ("local disk", "loopback S3"):
        ls = r[name, "list"]
        cells = [f"{ls[k][0]:.2f} s, {_req(ls[k][2])} requests" if ls[k][2] else f"{ls[k][0]:.2f} s"
                 for k in ("no_snapshot", "writes_snapshot", "with_snapshot")]  # fmt: skip
        lines.append(f"| {name} | {' | '.join(cells)} | {r[name, 'cli ls']:.1f} s |")
    lines += ["", "One query across all runs: initial vs final `hidden_out`, cosine + MAE + top-1% Jaccard, every "
              "run and layer (`compare_states_plan(runs, 'initial', 'final', sources=['hidden_out'])`), from "
              "opening the store to the DataFrame:", "",
              "| store | scheduler | runs | total | per run | of which opening the runs | rows | S3 requests (this process) |",
              "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for key, (runs, t, rows, req, t_open) in ((k, v) for k, v in r.items() if k[0] == "query"):
        per = f"; {sum(req.values()) / runs:.0f} per run" if req else ""
        lines.append(
            f"| {key[1]} | {key[2]} | {runs:,} | {t:.1f} s | {1000 * t / runs:.0f} ms | {t_open:.1f} s | {rows:,} | {_req(req)}{per} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
