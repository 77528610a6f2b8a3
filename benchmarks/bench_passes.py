"""What full snapshot and reference passes cost: today's capture against the one before.

Run: ``.venv/bin/python benchmarks/bench_passes.py [--repeat 3] [--baseline 6971a6c]``

The baseline is the commit before full passes (last-token snapshot and reference
vectors only), its ``src/`` extracted with ``git archive``. Each repeat runs one capture
of the emotions scenario with every flag on (all layers, float16) under each code, in
fresh processes, alternated so the machine's noise hits both alike. The timed job is
``capture_scenario`` after the model has loaded; bytes are the store folder's. The
passes' share is split into snapshot and reference rows (their own stored positions).
Writes ``benchmarks/results/passes.md``; ``benchmarks/assemble.py`` builds RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
FULL = {"hidden_states": True, "attention_weights": True, "qkv": True, "mlp": True, "logits": True,
        "layers": "all", "store_dtype": "float16"}  # fmt: skip

CHILD = r"""
import json, sys, time
from pathlib import Path
import actstore
from actstore.models.loading import load_model
from actstore.scenario import load_scenario, scenario_from_dict
data = load_scenario(sys.argv[1]).expanded()
data["capture"].update(json.loads(sys.argv[3]))
scenario = scenario_from_dict(data, source=sys.argv[1])
loaded = load_model(scenario.model, attn_implementation="eager")
t0 = time.perf_counter()
[res] = actstore.capture_scenario(scenario, sys.argv[2], loaded=loaded, progress=False)
seconds = time.perf_counter() - t0
files = [p for p in Path(sys.argv[2]).rglob("*") if p.is_file()]
passes = [p for p in files if "/passes/" in p.as_posix()]
run = actstore.open_store(sys.argv[2]).run(res.run_id)
rows = {"snapshot": 0, "reference": 0}
for p in getattr(run, "passes", []):
    rows[p.kind] += p.rows
print(json.dumps({"seconds": seconds, "bytes": sum(p.stat().st_size for p in files), "files": len(files),
                  "pass_bytes": sum(p.stat().st_size for p in passes), "rows": rows,
                  "positions": res.n_positions}))
"""


def extract(ref: str, into: Path) -> Path:
    """The baseline's src/ tree, from git."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "src"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into / "src"


def capture(src: Path, scenario: str, store: Path) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(src)}
    out = subprocess.run([sys.executable, "-c", CHILD, scenario, str(store), json.dumps(FULL)],
                         env=env, check=True, capture_output=True, text=True).stdout  # fmt: skip
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scenario", default=str(ROOT / "scenarios" / "emotions.yaml"))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--baseline", default="6971a6c", help="commit before full passes")
    args = ap.parse_args()
    results: dict[str, list[dict[str, Any]]] = {"before": [], "full passes": []}
    with tempfile.TemporaryDirectory() as tmp:
        srcs = {"before": extract(args.baseline, Path(tmp)), "full passes": ROOT / "src"}
        for i in range(args.repeat):
            order = list(srcs) if i % 2 == 0 else list(reversed(srcs))
            for name in order:
                store = Path(tmp) / f"{name.replace(' ', '_')}_{i}.zarr"
                results[name].append(capture(srcs[name], args.scenario, store))
                print(name, results[name][-1], flush=True)
    write(results, args)


def med(runs: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def write(results: dict[str, list[dict[str, Any]]], args: Any) -> None:
    before, after = results["before"], results["full passes"]
    t0, t1 = med(before, "seconds"), med(after, "seconds")
    b0, b1 = med(before, "bytes"), med(after, "bytes")
    # each repeat's two captures ran back to back: the median of their ratios is less
    # exposed to the machine's load drifting between repeats than the ratio of medians
    paired = statistics.median(a["seconds"] / b["seconds"] for a, b in zip(after, before, strict=True))
    rows = after[0]["rows"]
    pass_mb = med(after, "pass_bytes") / 1e6
    per_row = pass_mb / max(1, rows["snapshot"] + rows["reference"])
    lines = [
        "## Full snapshot and reference passes",
        "",
        f"`python benchmarks/bench_passes.py --repeat {args.repeat}` on `{Path(args.scenario).name}` with every "
        f"capture flag on (all layers, float16): the capture job after model load, today's code against "
        f"{args.baseline} (last-token snapshot and reference vectors only), alternated in fresh processes; "
        "medians [min-max].",
        "",
        "| | before | full passes | ratio | target |",
        "|---|---|---|---|---|",
        f"| capture job (s) | {t0:.2f} [{_rng(before, 'seconds')}] | {t1:.2f} [{_rng(after, 'seconds')}] "
        f"| {t1 / t0:.2f}x (paired: {paired:.2f}x) | <= 1.1x |",
        f"| store bytes (MB) | {b0 / 1e6:.1f} | {b1 / 1e6:.1f} | {b1 / b0:.3f}x | <= 1.05x |",
        f"| stored objects | {med(before, 'files'):.0f} | {med(after, 'files'):.0f} | | |",
        "",
        f"The passes store {rows['snapshot']} snapshot rows and {rows['reference']} reference rows "
        f"(positions not shared with the run or an earlier reference) in {pass_mb:.1f} MB, "
        f"about {per_row:.2f} MB per row; the run itself has {after[0]['positions']} positions. "
        f"Snapshots alone: about {rows['snapshot'] * per_row:.1f} MB, "
        f"{(b0 + rows['snapshot'] * per_row * 1e6) / b0:.3f}x the bytes before. "
        "The reference rows have nothing to share: a reference is rendered with its own "
        "system preamble (the template's default, as Activation Lab renders it), which the "
        "conversation does not contain, so its positions exist nowhere else in the run; "
        "they are the bytes above 1.05x.",
    ]
    out = HERE / "results" / "passes.md"
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


def _rng(runs: list[dict[str, Any]], key: str) -> str:
    vals = [r[key] for r in runs]
    return f"{min(vals):.2f}-{max(vals):.2f}"


if __name__ == "__main__":
    main()
