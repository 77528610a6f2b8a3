"""Capture benchmark: actstore against the plain loop and a seed-style capture, side by side.

Run: ``.venv/bin/python benchmarks/bench_capture.py [--repeat 3] [--scenario scenarios/emotions.yaml]``

Each configuration runs in its own subprocess (so its peak RSS is its own), loads the
model once (not timed), then times ``--repeat`` runs and reports the median:

* ``floor_sdpa`` / ``floor_eager``: prefill + greedy decode of the main prompt with a KV
  cache, no hooks: the fastest of the two is the floor.
* ``hidden``: actstore capture with hidden states only (generation, snapshots,
  references: the whole job).
* ``full``: actstore capture with every flag on, all layers, float16.
* ``seed_hidden`` / ``seed_full``: a seed-style capture written here: hooks that copy
  every tensor to host synchronously, ``np.savez_compressed`` per step into the seed's
  layout, one separate prefill per snapshot and per reference, eager attention always.

Writes ``benchmarks/results/capture.md``; ``benchmarks/assemble.py`` builds RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CONFIGS = ("floor_sdpa", "floor_eager", "hidden", "full", "seed_hidden", "seed_full")
TARGETS = {"hidden": 2.5, "full": 5.0}


def _scenario(path: str, flags: dict[str, Any]) -> Any:
    from actstore.scenario import load_scenario, scenario_from_dict

    data = load_scenario(path).expanded()
    data["capture"].update(flags)
    return scenario_from_dict(data, source=path)


HIDDEN_ONLY = {"hidden_states": True, "attention_weights": False, "qkv": False, "mlp": False, "logits": False}
FULL = {"hidden_states": True, "attention_weights": True, "qkv": True, "mlp": True, "logits": True,
        "layers": "all", "store_dtype": "float16"}  # fmt: skip


def dir_stats(path: Path, under: str | None = None) -> tuple[int, int]:
    """(bytes, files) under ``path`` (or only the files whose relative path has ``under``)."""
    total = files = 0
    for root, _dirs, names in os.walk(path):
        for n in names:
            p = Path(root) / n
            if under is None or under in str(p.relative_to(path)):
                total += p.stat().st_size
                files += 1
    return total, files


def run_one(config: str, scenario_path: str, repeat: int) -> dict[str, Any]:
    import torch

    from actstore.capture.prompts import as_dicts, render_ids
    from actstore.models.loading import load_model

    torch.set_num_threads(os.cpu_count() or 1)
    flags = HIDDEN_ONLY if config in ("hidden", "seed_hidden") else FULL
    sc = _scenario(scenario_path, flags)
    eager = config in ("floor_eager", "seed_hidden", "seed_full") or (config == "full")
    loaded = load_model(sc.model, attn_implementation="eager" if eager else None)
    prompt = render_ids(loaded.tokenizer, as_dicts(sc.prompt.messages))
    times, sizes = [], (0, 0, 0, 0)
    for _ in range(repeat):
        work = Path(tempfile.mkdtemp(prefix=f"bench-{config}-"))
        t0 = time.perf_counter()
        if config.startswith("floor"):
            plain_loop(loaded, prompt, sc.generation.max_new_tokens)
        elif config.startswith("seed"):
            seed_style(loaded, sc, work)
        else:
            from actstore.capture.runner import capture

            capture(sc, str(work / "store.zarr"), loaded=loaded, progress=False)
        times.append(time.perf_counter() - t0)
        if config.startswith("seed"):
            b, f = dir_stats(work)
            sb, sf = dir_stats(work, "tensors/")
            sizes = (b, f, sb, sf)
        elif not config.startswith("floor"):
            b, f = dir_stats(work)
            sb, sf = dir_stats(work, "/acts/")
            sizes = (b, f, sb, sf)
        shutil.rmtree(work, ignore_errors=True)
    return {
        "config": config,
        "median_s": statistics.median(times),
        "times": times,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "bytes": sizes[0],
        "files": sizes[1],
        "step_bytes": sizes[2],
        "step_files": sizes[3],
        "prompt_len": len(prompt),
    }


def plain_loop(loaded: Any, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Prefill + greedy decode with a KV cache, no hooks: the floor."""
    import torch

    from actstore.capture.prefixes import cache_of, forward

    model, device = loaded.model, loaded.device
    out_ids: list[int] = []
    with torch.inference_mode():
        ids, cache = prompt, None
        eos = loaded.tokenizer.eos_token_id
        for _ in range(max_new_tokens):
            out = forward(model, torch.tensor([ids], device=device), cache=cache)
            cache = cache_of(out)
            nxt = int(out.logits[0, -1].argmax())
            out_ids.append(nxt)
            if nxt == eos:
                break
            ids = [nxt]
    return out_ids


def seed_style(loaded: Any, sc: Any, out: Path) -> None:
    """The seed's capture strategy, re-created: synchronous copies, NPZ per step, and one
    full prefill per snapshot and per reference."""
    import numpy as np
    import torch

    from actstore.capture.prefixes import cache_of, forward
    from actstore.capture.prompts import as_dicts, render_ids
    from actstore.models.architectures import resolve_sites

    model, tok, device = loaded.model, loaded.tokenizer, loaded.device
    sites = resolve_sites(model)
    flags = sc.capture
    store: dict[str, np.ndarray] = {}
    handles = []

    def keep(name: str, t: torch.Tensor) -> None:
        store[name] = t.detach().to(torch.float16).cpu().numpy()  # synchronous copy per hook

    def out_hook(name: str) -> Any:
        return lambda _m, _a, o: keep(name, o[0] if isinstance(o, tuple) else o)

    for i, ls in enumerate(sites.layers):
        p = f"layer_{i:02d}/"
        if flags.hidden_states:
            handles.append(ls.block.register_forward_pre_hook(
                lambda _m, a, k, p=p: keep(p + "hidden_in", a[0] if a else k["hidden_states"]), with_kwargs=True))
            handles.append(ls.block.register_forward_hook(out_hook(p + "hidden_out")))
        handles.append(ls.o.register_forward_hook(out_hook(p + "attn_out")))
        handles.append(ls.down.register_forward_hook(out_hook(p + "mlp_down_out")))
        if flags.qkv and ls.q is not None:
            for n, m in (("q", ls.q), ("k", ls.k), ("v", ls.v)):
                handles.append(m.register_forward_hook(out_hook(p + n)))
        if flags.mlp:
            for n, m in (("mlp_gate", ls.gate), ("mlp_up", ls.up), ("mlp_act", ls.act)):
                if m is not None:
                    handles.append(m.register_forward_hook(out_hook(p + n)))
            handles.append(ls.down.register_forward_pre_hook(lambda _m, a, p=p: keep(p + "mlp_down_in", a[0])))
        if flags.attention_weights:
            handles.append(ls.attn.register_forward_hook(lambda _m, _a, o, p=p: keep(p + "attn_weights", o[1])))
    if flags.hidden_states:
        handles.append(sites.embed.register_forward_hook(out_hook("embeddings")))
    (out / "tensors").mkdir(parents=True)
    msgs = as_dicts(sc.prompt.messages)
    ids = render_ids(tok, msgs)
    steps = []
    try:
        with torch.inference_mode():
            cache = None
            for step in range(sc.generation.max_new_tokens):
                store.clear()
                o = forward(model, torch.tensor([ids], device=device), cache=cache, last_logits_only=False)
                if flags.logits:
                    keep("logits", o.logits)
                np.savez_compressed(out / "tensors" / f"step_{step:03d}.npz", **store)
                cache = cache_of(o)
                nxt = int(o.logits[0, -1].argmax())
                steps.append({"step": step, "generated_token_id": nxt})
                if nxt == tok.eos_token_id:
                    break
                ids = [nxt]
            (out / "steps.json").write_text(json.dumps({"steps": steps}))
            for sub, seqs in (
                ("conversation_snapshots", [msgs[: k + 1] for k in range(len(msgs))]),
                ("references", [as_dicts(r.messages) for r in sc.reference_states]),
            ):
                (out / sub).mkdir()
                for k, m in enumerate(seqs):
                    store.clear()
                    model(input_ids=torch.tensor([render_ids(tok, m)], device=device))
                    last = {key: v[0, -1] for key, v in store.items()
                            if key.endswith(("hidden_in", "hidden_out", "attn_out", "mlp_down_out"))}  # fmt: skip
                    np.savez_compressed(out / sub / f"{k:02d}.npz", **last)
    finally:
        for h in handles:
            h.remove()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scenario", default=str(HERE.parent / "scenarios" / "emotions.yaml"))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--one", choices=CONFIGS)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--render-log", help="re-render the table from a log of a previous run's JSON lines")
    args = ap.parse_args()
    if args.render_log:
        lines = [json.loads(x) for x in Path(args.render_log).read_text().splitlines() if x.startswith("{")]
        md = render({v["config"]: v for v in lines}, args.scenario)
        (HERE / "results").mkdir(exist_ok=True)
        (HERE / "results" / "capture.md").write_text(md)
        print(md)
        return
    if args.one:
        print(json.dumps(run_one(args.one, args.scenario, args.repeat)))
        return
    results = {}
    for config in args.configs.split(","):
        repeat = args.repeat if not config.startswith("seed") else max(1, min(2, args.repeat))
        print(f"running {config} x{repeat} ...", file=sys.stderr, flush=True)
        proc = subprocess.run(
            [sys.executable, __file__, "--one", config, "--scenario", args.scenario, "--repeat", str(repeat)],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if proc.returncode != 0:
            sys.exit(f"{config} failed:\n{proc.stderr[-4000:]}")
        results[config] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(json.dumps(results[config]), file=sys.stderr)
    md = render(results, args.scenario)
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "capture.md").write_text(md)
    print(md)


def render(r: dict[str, dict[str, Any]], scenario: str) -> str:
    floors = [r[c]["median_s"] for c in ("floor_sdpa", "floor_eager") if c in r]
    floor = min(floors) if floors else float("nan")
    best_floor = min((min(r[c]["times"]) for c in ("floor_sdpa", "floor_eager") if c in r), default=float("nan"))
    lines = [
        "## Capture",
        "",
        f"Scenario `{Path(scenario).name}` on the embedded SmolLM2-135M-Instruct, "
        f"{r.get('floor_sdpa', r[next(iter(r))])['prompt_len']} prompt tokens, CPU. "
        f"Wall time excludes model load (median); floor = fastest plain loop = {floor:.2f} s.",
        "",
        "| configuration | median s | x floor | best s | best x best floor | all runs s | peak RSS MB | bytes on disk | files | step-tensor bytes | step-tensor files |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c, v in r.items():
        lines.append(
            f"| {c} | {v['median_s']:.2f} | {v['median_s'] / floor:.2f} | {min(v['times']):.2f} | "
            f"{min(v['times']) / best_floor:.2f} | {', '.join(f'{t:.1f}' for t in v['times'])} | {v['peak_rss_mb']:.0f} | "
            f"{v['bytes'] / 1e6:.1f} MB | {v['files']} | {v['step_bytes'] / 1e6:.1f} MB | {v['step_files']} |"
        )
    lines.append("")
    for c, target in TARGETS.items():
        if c in r:
            x = r[c]["median_s"] / floor
            xb = min(r[c]["times"]) / best_floor
            lines.append(f"- {c} job: {x:.2f}x the floor by medians, {xb:.2f}x by best runs; target <= {target}x: "
                         f"{'met' if x <= target else 'NOT met'} by medians, {'met' if xb <= target else 'NOT met'} by best runs")
    if "full" in r and "seed_full" in r:
        br = r["full"]["step_bytes"] / max(1, r["seed_full"]["step_bytes"])
        fr = r["full"]["step_files"] / max(1, r["seed_full"]["step_files"])
        lines.append(f"- full-capture step tensors: {br:.2f}x the seed-style bytes (target <= 0.8x: "
                     f"{'met' if br <= 0.8 else 'NOT met'}), {fr:.2f}x its files (target <= 0.1x: "
                     f"{'met' if fr <= 0.1 else 'NOT met'})")  # fmt: skip
        lines.append(f"- speed-up of actstore full capture over the seed-style capture: "
                     f"{r['seed_full']['median_s'] / r['full']['median_s']:.1f}x")  # fmt: skip
    lines += ["", NOTES]
    return "\n".join(lines) + "\n"


# What the table cannot say: kept here so a rerun regenerates it with the numbers.
NOTES = """Measured with `python benchmarks/bench_capture.py --repeat 3` on a quiet 2-core machine
(the seed-style configurations run twice). The floor is the plain SDPA loop; the full
job needs eager attention for the weights. Step-tensor files count every stored object
of the step arrays: their shards and their metadata documents.

Why the two storage targets are not met:

- **Bytes (target 0.8x).** actstore stores nothing derivable (hidden_in/out once per
  layer boundary, mlp_down_in computed on read, no attention tile above the diagonal),
  but float16 activations barely compress. Measured once on an emotions run's arrays
  with numcodecs (inner-chunk sized pieces, one core; not rerun by this script): zstd-1 gives 1.07x (residual), 1.09-1.12x (MLP), 1.13x
  (logits), 1.46x (attention); zstd-3, blosc zstd-1/3 with byte shuffle and bit shuffle
  are within 0.02x of that and slower; blosc lz4 is worse. Deriving `mlp_act` from
  `mlp_gate` at read time would take the ratio to about 0.73x, but not bit for bit when
  the model runs in a wider dtype than the store (one extra float16 rounding), so it is
  left as a decision for later.
- **Files (target 0.1x).** Each source is its own array: its metadata plus one shard per
  block of positions (about 64 MiB raw each). The seed-style baseline writes one file
  per step, 50 here. A tenth (5 objects) would mean packing all sources of a width into
  one array: fewer, larger objects in exchange for the one-array-per-source layout."""


if __name__ == "__main__":
    main()
