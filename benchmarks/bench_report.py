"""Report benchmark: ``build_report`` against a seed-style computation from NPZ files.

Run: ``.venv/bin/python benchmarks/bench_report.py [--repeat 3] [--runs 20]``

Workloads (captured once into ``benchmarks/_work/report.zarr`` with the embedded
SmolLM2, every capture flag on, float16, then exported with ``export_npz``; not timed):

* ``emotions``: one run of ``scenarios/emotions.yaml`` (20 messages, 9 references).
* ``N runs``: the emotions scenario with ``run_at_each_message`` (the seed's multi-run
  mode): one run per prefix messages[:1..N], 8 generated tokens each, the 9 emotion
  references; hidden states, q/k/v/attn_out and MLP captured, no attention weights or
  logits (no report reads them; leaving them out keeps the one-time capture short).

Approaches, each in its own subprocess (so peak RSS is its own), timed ``--repeat``
times (median; the first, cold run is reported too):

* ``actstore``: ``build_report`` end to end: queries, charts, HTML, timestamped copy, CSVs.
* ``seed_all``: what the brief calls seed-style: load every NPZ of every run (every
  member of every step, snapshot and reference file), then compute the report's numbers
  with vectorised NumPy: initial-vs-final, every pair of runs at both states, every
  snapshot against every reference (+ role averages), the cross-layer matrix and the
  layer discrimination. Numbers only: no HTML, no CSV.
* ``seed_lazy``: the seed's own access pattern (``notebooks/compare_runs.py``): only
  the NPZ members it needs, but one member per layer and source, re-read for every pair
  of runs; same NumPy numbers.

Writes ``benchmarks/results/report.md``.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORK = HERE / "_work"
STORE = WORK / "report.zarr"
NPZ = WORK / "report_npz"
SOURCES = ("hidden_in", "hidden_out", "attn_out", "mlp_down_out")
APPROACHES = ("actstore", "seed_all", "seed_lazy")
TARGET = 5.0
# The prefix runs skip what no report reads (attention weights, logits) to keep setup
# short; the emotions run keeps every flag of its scenario.
SHORT_CAPTURE = {"attention_weights": False, "logits": False}


# ---- workloads (setup, not timed) ----------------------------------------------------
def prefix_scenarios(n: int) -> list[Any]:
    """The emotions conversation with ``run_at_each_message``: one run per prefix
    messages[:1..n] (the seed's multi-run mode), 8 generated tokens each."""
    from actstore.scenario import load_scenario, scenario_from_dict

    data = load_scenario(str(ROOT / "scenarios" / "emotions.yaml")).expanded()
    data["name"] = "report_bench_prefixes"
    data["prompt"] = {**data["prompt"], "run_at_each_message": True}
    data["prompt"]["messages"] = data["prompt"]["messages"][:n]
    data["generation"] = {**data["generation"], "max_new_tokens": 8}
    data["capture"] = {**data["capture"], **SHORT_CAPTURE}
    return list(scenario_from_dict(data).runs())


def prepare(n_runs: int) -> dict[str, list[str]]:
    """Capture what is missing; export NPZ; return workload -> run ids."""
    from actstore.capture.runner import attn_implementation, capture
    from actstore.models.loading import load_model
    from actstore.scenario import load_scenario
    from actstore.store.npz import export_npz
    from actstore.store.store import ActStore

    store = ActStore.open(STORE, create=True)
    emo = load_scenario(str(ROOT / "scenarios" / "emotions.yaml"))
    prefixes = prefix_scenarios(n_runs)
    have = {e["scenario"]: e["id"] for e in store.catalog_entries() if e["scenario"] == "emotions"}
    many = [e["id"] for e in store.catalog_entries() if e["scenario"] == prefixes[0].name][:n_runs]
    todo = ([emo] if "emotions" not in have else []) + prefixes[len(many) :]
    if todo:
        loaded = load_model(emo.model, attn_implementation=attn_implementation(emo))
        for sc in todo:
            t = time.perf_counter()
            [res] = capture(sc, store, loaded=loaded, progress=False)
            print(f"captured {res.run_id} in {time.perf_counter() - t:.1f}s", file=sys.stderr)
            if sc is emo:
                have["emotions"] = res.run_id
            else:
                many.append(res.run_id)
    for run_id in [have["emotions"], *many]:
        if not (NPZ / run_id / "steps.json").exists():
            export_npz(store.run(run_id), NPZ / run_id, quiet=True, overwrite=True)
    return {"emotions": [have["emotions"]], f"{n_runs} runs": many}


# ---- the seed-style computation -------------------------------------------------------
def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-12)


def _top(x: np.ndarray, frac: float = 0.01) -> np.ndarray:
    k = max(1, int(x.shape[-1] * frac))
    idx = np.argpartition(np.abs(x), x.shape[-1] - k, axis=-1)[..., -k:]
    mask = np.zeros(x.shape, dtype=bool)
    np.put_along_axis(mask, idx, True, axis=-1)
    return mask


def metrics(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(3, ...) cosine, MAE, top-1% Jaccard by magnitude over the last axis (broadcasting)."""
    ma, mb = _top(a), _top(b)
    jac = (ma & mb).sum(-1) / (ma | mb).sum(-1)
    return np.stack(np.broadcast_arrays(_cos(a, b), np.abs(a - b).mean(-1), jac))


def _stats(v: np.ndarray) -> list[float]:
    return [v.mean(), v.std(), np.median(v), v.min(), v.max(), float(v.argmin()), float(v.argmax())]


def _role_mean(v: np.ndarray, rows: np.ndarray) -> np.ndarray | None:
    return v[:, rows].mean(1) if rows.any() else None


class NpzRun:
    """One exported run: states and stacks as (L, H) / (rows, L, H) float32 arrays."""

    def __init__(self, path: Path, load_all: bool):
        self.path, self.load_all = path, load_all
        self.meta = json.loads((path / "run.json").read_text())
        self.steps = json.loads((path / "steps.json").read_text())["steps"]
        self.n_layers = int(self.meta["model"]["arch"]["num_layers"])

    def _load(self, file: Path, last: bool) -> dict[str, np.ndarray]:
        with np.load(file) as npz:
            if self.load_all:  # every member in memory, as a loader of whole files does
                members = {k: npz[k] for k in npz.files}
            else:  # the seed: read each needed member on its own
                members = {
                    f"layer_{la:02d}/{s}": npz[f"layer_{la:02d}/{s}"]
                    for la in range(self.n_layers)
                    for s in SOURCES
                }
            out = {}
            for s in SOURCES:
                rows = [
                    np.asarray(members[f"layer_{la:02d}/{s}"], dtype=np.float32)
                    for la in range(self.n_layers)
                ]
                out[s] = np.stack([r[0, -1] if last else r for r in rows])
            return out

    def state(self, which: str) -> dict[str, np.ndarray]:
        step = self.steps[0] if which == "initial" else self.steps[-1]
        return self._load(self.path / step["tensors_file"], last=True)

    def load_every_step(self) -> None:
        for st in self.steps[1:-1]:  # the rest of the run's files (first and last are read as states)
            with np.load(self.path / st["tensors_file"]) as npz:
                for k in npz.files:
                    npz[k]

    def stacks(self) -> tuple[list[dict[str, Any]], dict[str, np.ndarray], dict[str, np.ndarray]]:
        index = json.loads((self.path / "conversation_snapshots" / "index.json").read_text())
        labels = json.loads((self.path / "references" / "index.json").read_text())["labels"]
        snaps = [self._load(self.path / "conversation_snapshots" / f"snapshot_{s['index']:02d}_{s['role']}.npz", False)
                 for s in index]  # fmt: skip
        refs = [self._load(self.path / "references" / f"ref_{lab}.npz", False) for lab in labels]
        return (
            index,
            {s: np.stack([x[s] for x in snaps]) for s in SOURCES},
            {s: np.stack([x[s] for x in refs]) for s in SOURCES},
        )


def seed_report(paths: list[Path], load_all: bool) -> dict[str, Any]:
    runs = [NpzRun(p, load_all) for p in paths]
    out: dict[str, Any] = {"intra": {}, "inter": {}, "svr": {}, "cross": {}, "discr": {}}
    states: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    for r in runs:
        if load_all:
            r.load_every_step()
        a, b = r.state("initial"), r.state("final")
        states[(r.path.name, "initial")], states[(r.path.name, "final")] = a, b
        out["intra"][r.path.name] = {s: [_stats(v) for v in metrics(a[s], b[s])] for s in SOURCES}
        h = b["hidden_out"]
        out["cross"][r.path.name] = _cos(h[:, None], h[None, :])
        index, snaps, refs = r.stacks()
        roles = np.array([s["role"] for s in index])
        per = {s: metrics(snaps[s][:, None], refs[s][None, :]) for s in SOURCES}  # (3, M, R, L)
        out["svr"][r.path.name] = {s: (v, _role_mean(v, roles == "user"), _role_mean(v, roles == "assistant"))
                                   for s, v in per.items()}  # fmt: skip
        d = {}
        for s in SOURCES:
            dist = 1 - _cos(refs[s][:, None], refs[s][None, :])  # (R, R, L)
            iu, ju = np.triu_indices(dist.shape[0], 1)
            within = (1 - per[s][0]).min(axis=1).mean(axis=0)
            with np.errstate(divide="ignore", invalid="ignore"):
                d[s] = (dist[iu, ju].mean(0), dist[iu, ju].min(0), dist[iu, ju].mean(0) / within)
        out["discr"][r.path.name] = d
    for ra, rb in combinations(runs, 2):
        for state in ("initial", "final"):
            if load_all:  # every file was loaded once; pairs reuse the states in memory
                a, b = states[(ra.path.name, state)], states[(rb.path.name, state)]
            else:  # the seed's compare_pair: both states read again for every pair
                a, b = ra.state(state), rb.state(state)
            out["inter"][(ra.path.name, rb.path.name, state)] = {s: metrics(a[s], b[s]) for s in SOURCES}
    return out


# ---- one measurement (child process) -------------------------------------------------
def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(approach: str, run_ids: list[str], repeat: int) -> dict[str, Any]:
    if approach == "actstore":
        from actstore.report.build import build_report
        from actstore.store.store import ActStore

        store = ActStore.open(STORE)
        tmp = Path(tempfile.mkdtemp(prefix="bench-report-"))

        def work() -> Any:
            return build_report(store, run_ids, tmp, progress=False)
    else:
        paths = [NPZ / r for r in run_ids]

        def work() -> Any:
            return seed_report(paths, load_all=approach == "seed_all")

    base = _rss_mb()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        work()
        times.append(time.perf_counter() - t)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out = {"first_s": times[0], "median_s": statistics.median(times), "times": times,
           "peak_rss_mb": peak, "peak_over_start_mb": peak - base}  # fmt: skip
    if approach == "actstore":  # one more pass, split into its phases
        from actstore.report.build import render_html
        from actstore.report.gather import gather

        t0 = time.perf_counter()
        data = gather(store.runs(run_ids))
        t1 = time.perf_counter()
        render_html(data, str(store.location), progress=False)
        out["phases"] = {"queries": t1 - t0, "charts_and_html": time.perf_counter() - t1}
    return out


def measure(approach: str, run_ids: list[str], repeat: int) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", approach, "--ids", ",".join(run_ids), "--repeat", str(repeat)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def write_markdown(results: dict[str, dict[str, Any]], repeat: int, path: Path) -> str:
    import platform

    lines = [
        "## Report", "",
        f"`benchmarks/bench_report.py --repeat {repeat}` on {platform.processor() or platform.machine()}, "
        f"{__import__('os').cpu_count()} CPU cores (no GPU used), load average {__import__('os').getloadavg()[0]:.1f} at "
        f"the end. Each approach runs in its own process; time is the median of {repeat} runs (one run for the "
        "seed-style passes over many runs; first = cold, incl. first use of imports and template compilation); peak "
        "RSS is the process's maximum resident memory, 'over start' that minus the RSS after imports.", "",
        "| workload | approach | first (s) | median (s) | peak RSS (MB) | over start (MB) | speed-up vs actstore |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]  # fmt: skip
    for workload, per in results.items():
        ours = per["actstore"]["median_s"]
        for approach, r in per.items():
            speed = "" if approach == "actstore" else f"{r['median_s'] / ours:.1f}x"
            lines.append(f"| {workload} | {approach} | {r['first_s']:.2f} | {r['median_s']:.2f} | "
                         f"{r['peak_rss_mb']:.0f} | {r['peak_over_start_mb']:.0f} | {speed} |")  # fmt: skip
    lines += [
        "",
        f"Target: actstore at least {TARGET:.0f}x faster than the seed-style approach (`seed_all`).",
        "",
    ]
    for workload, per in results.items():
        s = per["seed_all"]["median_s"] / per["actstore"]["median_s"]
        lines.append(f"* {workload}: {s:.1f}x vs seed_all ({'met' if s >= TARGET else 'NOT met'}), "
                     f"{per['seed_lazy']['median_s'] / per['actstore']['median_s']:.1f}x vs seed_lazy.")  # fmt: skip
    for workload, per in results.items():
        ph = per["actstore"].get("phases")
        if ph:
            lines.append(f"* {workload}, where actstore's time goes (one extra pass): queries (gather: every "
                         f"query-layer plan in one compute, then pandas) {ph['queries']:.2f} s, charts and HTML "
                         f"{ph['charts_and_html']:.2f} s, the rest writing files.")  # fmt: skip
    lines += ["", "actstore's time covers the whole report (queries, charts, HTML with plotly.js inlined, its "
              "timestamped copy, four CSVs); the seed-style times cover loading and NumPy numbers only.", ""]  # fmt: skip
    text = "\n".join(lines)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--child", choices=APPROACHES)
    ap.add_argument("--ids", default="")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.ids.split(","), args.repeat)))
        return
    workloads = prepare(args.runs)
    results: dict[str, dict[str, Any]] = {}
    for workload, ids in workloads.items():
        results[workload] = {}
        for approach in APPROACHES:
            # the seed-style passes over many runs take minutes: one pass is enough there
            repeat = args.repeat if approach == "actstore" or len(ids) == 1 else 1
            results[workload][approach] = r = measure(approach, ids, repeat)
            print(f"{workload:>10} {approach:>9}: median {r['median_s']:.2f}s, peak {r['peak_rss_mb']:.0f} MB",
                  file=sys.stderr)  # fmt: skip
    print(write_markdown(results, args.repeat, HERE / "results" / "report.md"))


if __name__ == "__main__":
    main()
