"""A bounded load test of ``actstore view``: 200 concurrent requests for its heaviest
view, the attention heatmap of a 4k-token prefill, over loopback, against a server in
its own process (started by the CLI, as a user would), whose memory is measured.

Every request must end answered: 200 at once, or 503 with ``Retry-After`` and 200 when
asked again. The server's peak RSS above its warmed-up size must stay under
:data:`RSS_GROWTH_BOUND`: it computes at most a few answers at a time (its slots), each
reading the 4064 x 4064 slice block by block into 512 x 512 bins, and keeps at most its
answer cache. Reading the whole slice as float64, as the viewer did before, took
4 heads x 4064^2 x 8 B = 528 MB per request by itself.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from actstore.store.store import ActStore
from query.synth import write_synthetic_run

psutil = pytest.importorskip("psutil")

N_REQUESTS = 200
PROMPT = 4064  # prefill positions; 32 decode steps make the run 4096 positions
HEADS = 4
RSS_GROWTH_BOUND = 300 * 2**20  # measured 150 MiB on a 2-core machine (pytest -s prints it)
# What one request asks for: the prefill's attention, the mean over heads or one head,
# signed or magnitudes (8 distinct answers: the server computes each once, at most two at
# a time, and serves the rest from its answer cache or its in-flight computation).
VARIANTS = [f"&head={h}&reduce={r}" for h in ("", "0", "1", "2") for r in ("signed", "abs")]


@pytest.fixture(scope="module")
def long_store(tmp_path_factory: Any) -> Path:
    folder = tmp_path_factory.mktemp("long") / "store.zarr"
    store = ActStore.open(folder, create=True)
    write_synthetic_run(store, name="long", n_layers=1, prompt_len=PROMPT, n_steps=33, width=64, sources=(),
                        n_snapshots=1, labels=("joy",), attention_heads=HEADS, step_chunk=512)  # fmt: skip
    return folder


class _Peak:
    """The child's peak RSS while running: sampled with psutil every 5 ms, and (Linux)
    the kernel's own high-water mark, reset at start."""

    def __init__(self, pid: int):
        self.proc = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._status = Path(f"/proc/{pid}/status")
        self.hwm_reset = False
        try:
            Path(f"/proc/{pid}/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            self.hwm_reset = True
        except OSError:
            pass
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.005)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        if self.hwm_reset:
            m = re.search(r"VmHWM:\s+(\d+) kB", self._status.read_text())
            if m:
                self.peak = max(self.peak, int(m.group(1)) * 1024)
        return self.peak


def _get(port: int, path: str) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


@pytest.mark.slow  # subprocesses, a browser or many captures: the full suite runs it
def test_200_concurrent_attention_heatmaps_of_a_4k_prefill(long_store: Path) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "actstore", "view", "--store", str(long_store), "--port", "0", "--no-browser"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        m = re.match(r"actstore view: http://127\.0\.0\.1:(\d+)/\?run=(\S+)&token=", line)
        assert m, line
        port, run = int(m.group(1)), m.group(2)
        # warm up: imports, the run opened, one (decode-step) heatmap through every layer of code
        for path in (f"/api/summary?run={run}", f"/api/heatmap?run={run}&source=attn_weights&layer=0&step=5"):
            assert _get(port, path)[0] == 200
        base_rss = psutil.Process(proc.pid).memory_info().rss
        peak = _Peak(proc.pid)

        results: list[tuple[int, int, int]] = [(0, 0, 0)] * N_REQUESTS  # status, 503s, bytes
        missing_retry_after: list[int] = []
        barrier = threading.Barrier(N_REQUESTS)
        deadline = time.monotonic() + 120

        def client(i: int) -> None:
            path = f"/api/heatmap?run={run}&source=attn_weights&layer=0&step=0{VARIANTS[i % len(VARIANTS)]}"
            busy = 0
            barrier.wait()
            while True:
                status, headers, body = _get(port, path)
                if status != 503 or time.monotonic() > deadline:
                    results[i] = (status, busy, len(body))
                    if status == 200 and i < len(VARIANTS):
                        h = json.loads(body)
                        assert h["block"] == [8, 8] and len(h["z"]) == PROMPT // 8 and h["shape"] == [PROMPT, PROMPT]
                    return
                busy += 1
                if "retry-after" not in headers:
                    missing_retry_after.append(i)
                time.sleep(float(headers.get("retry-after", "1")))

        started = time.monotonic()
        threads = [threading.Thread(target=client, args=(i,)) for i in range(N_REQUESTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.monotonic() - started
        growth = peak.stop() - base_rss

        statuses = [s for s, _, _ in results]
        busy = sum(b for _, b, _ in results)
        print(f"\n{N_REQUESTS} requests in {elapsed:.1f} s: {statuses.count(200)} answered 200, "
              f"{busy} 503s asked again (at most {max(b for _, b, _ in results)} for one request); "
              f"server RSS {base_rss / 2**20:.0f} MiB warm, peak growth {growth / 2**20:.0f} MiB "
              f"(bound {RSS_GROWTH_BOUND / 2**20:.0f} MiB)")  # fmt: skip
        assert statuses == [200] * N_REQUESTS, sorted(set(statuses))
        assert not missing_retry_after
        assert all(n > 1_000_000 for _, _, n in results)  # each a full 512 x 512 answer
        assert growth < RSS_GROWTH_BOUND
        assert psutil.Process(proc.pid).is_running()
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert "Traceback" not in err, err[-2000:]
