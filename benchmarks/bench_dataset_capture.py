"""Corpus capture benchmark: capture-dataset against a plain HF loop, and flat memory.

Run: ``.venv/bin/python benchmarks/bench_dataset_capture.py [--repeat 3] [--sequences 48]
[--memory 1000,20000]``  (about 15 minutes on 2 shared cores)

* Throughput, side by side in one process (SmolLM2-135M-Instruct, float32 on the CPU,
  loaded once, not timed): ``plain`` is ``model(**batch, output_hidden_states=True)``
  over the same left-padded batches (attention mask, position ids from it), outputs
  discarded; ``capture`` is ``capture_dataset`` of the same corpus and batches with every
  layer's residual stream kept (hidden_states) into a fresh local store, float16,
  tokenization, writing and commits included. Runs alternate; medians of ``--repeat``.
* Memory: ``capture_dataset`` of 1,000 and of 20,000 short sequences, each in a fresh
  subprocess that reports its own peak RSS: the tiny random llama of actstore.testing
  (hidden 64, 3 layers; SmolLM2 would take ~30 min for 20,000 sequences on 2 shared
  cores, and its 1.5 GB load peak would hide any growth of the capture's own memory),
  hidden_states of layers 0-1, sequences cut to 8 tokens (--context 8), batch 64,
  units of 256 sequences.

Writes ``benchmarks/results/dataset_capture.md``; ``benchmarks/assemble.py`` builds RESULTS.md.
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
TARGET = 0.8  # capture throughput / plain-loop throughput
MEMORY_TOLERANCE = 0.10
BATCH = 16


def _corpus(path: Path, n: int, max_chars: int) -> Path:
    from actstore.testing import topic_texts

    with open(path, "w") as f:
        for _, text in topic_texts(n, min_chars=max_chars // 2, max_chars=max_chars):
            f.write(json.dumps({"text": text}) + "\n")
    return path


def _load() -> Any:
    import torch

    from actstore.models.loading import load_model
    from actstore.scenario import ModelConfig

    torch.set_num_threads(os.cpu_count() or 1)
    return load_model(ModelConfig(id="smollm2", dtype="float32", device="cpu"))


def _plain(loaded: Any, seqs: list[list[int]]) -> float:
    """The plain loop over the batches capture makes; returns seconds."""
    import torch

    model, pad = loaded.model, loaded.tokenizer.pad_token_id or 0
    t0 = time.perf_counter()
    with torch.inference_mode():
        for start in range(0, len(seqs), BATCH):
            batch = seqs[start : start + BATCH]
            width = max(len(s) for s in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for i, s in enumerate(batch):
                ids[i, width - len(s) :] = torch.tensor(s)
                mask[i, width - len(s) :] = 1
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            model(input_ids=ids, attention_mask=mask, position_ids=pos, output_hidden_states=True)
    return time.perf_counter() - t0


def _capture(loaded: Any, corpus: Path, n: int) -> float:
    from actstore import capture_dataset

    work = Path(tempfile.mkdtemp(prefix="bench-dataset-"))
    try:
        t0 = time.perf_counter()
        capture_dataset(str(corpus), str(work / "s.zarr"), name="bench", model="smollm2", loaded=loaded,
                        batch_size=BATCH, unit_size=n, progress=False)  # fmt: skip
        return time.perf_counter() - t0
    finally:
        shutil.rmtree(work, ignore_errors=True)


def throughput(n: int, repeat: int) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="bench-dataset-corpus-"))
    try:
        corpus = _corpus(work / "c.jsonl", n, 400)
        loaded = _load()
        seqs = [list(loaded.tokenizer(json.loads(line)["text"])["input_ids"]) for line in corpus.open()]
        tokens = sum(len(s) for s in seqs)
        _plain(loaded, seqs[:BATCH])  # warm up kernels and allocator
        plain, capture = [], []
        for _ in range(repeat):
            plain.append(_plain(loaded, seqs))
            capture.append(_capture(loaded, corpus, n))
        return {"sequences": n, "tokens": tokens, "plain_s": statistics.median(plain),
                "capture_s": statistics.median(capture), "plain_all": plain, "capture_all": capture}  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _peak_rss_kib() -> int:
    """This process's peak RSS: VmHWM, which starts afresh at exec (ru_maxrss would carry
    the parent's peak, SmolLM2 loaded, across fork and exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # not Linux: KiB or bytes


def memory_child(n: int) -> None:
    """In a fresh process: capture ``n`` short sequences, print peak RSS and seconds."""
    import torch

    from actstore import capture_dataset
    from actstore.models.loading import load_model
    from actstore.scenario import ModelConfig
    from actstore.testing import tiny_model

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="bench-dataset-mem-"))
    try:
        corpus = _corpus(work / "c.jsonl", n, 60)
        model, tok = tiny_model("llama", seed=0)
        model.save_pretrained(work / "tiny")
        tok.save_pretrained(work / "tiny")
        del model
        loaded = load_model(ModelConfig(id=str(work / "tiny"), dtype="float32", device="cpu"))
        loaded_rss = _peak_rss_kib()
        t0 = time.perf_counter()
        r = capture_dataset(str(corpus), str(work / "s.zarr"), name="mem", model="tiny", loaded=loaded,
                            layers="0-1", context=8, batch_size=64, unit_size=256, progress=False)  # fmt: skip
        seconds = time.perf_counter() - t0
        peak = _peak_rss_kib()
        print(json.dumps({"sequences": n, "tokens": r.n_tokens, "units": r.n_units, "peak_rss_kib": peak,
                          "after_load_rss_kib": loaded_rss, "seconds": seconds}))  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)


def memory(sizes: list[int]) -> list[dict[str, Any]]:
    out = []
    for n in sizes:
        proc = subprocess.run([sys.executable, __file__, "--memory-child", str(n)], capture_output=True,
                              text=True, timeout=1800, check=True)  # fmt: skip
        out.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"memory {n}: {out[-1]}", file=sys.stderr)
    return out


def write_results(tp: dict[str, Any], mem: list[dict[str, Any]], repeat: int) -> Path:
    ratio = tp["plain_s"] / tp["capture_s"]
    lines = [
        "## Corpus capture (capture-dataset)",
        "",
        f"Throughput: SmolLM2-135M-Instruct float32 on {os.cpu_count()} CPU cores, {tp['sequences']} pydoc help "
        f"texts ({tp['tokens']} tokens), batches of {BATCH}, left-padded; median of {repeat} alternating runs.",
        "",
        "| | seconds | tokens/s | vs plain |",
        "|---|---|---|---|",
        f"| plain `model(**batch, output_hidden_states=True)`, outputs discarded | {tp['plain_s']:.2f} | "
        f"{tp['tokens'] / tp['plain_s']:.0f} | 1.00x |",
        f"| capture-dataset, hidden_states of all 30 layers, float16, stored and committed | {tp['capture_s']:.2f} | "
        f"{tp['tokens'] / tp['capture_s']:.0f} | {ratio:.2f}x (target >= {TARGET}x: "
        f"{'met' if ratio >= TARGET else 'NOT met'}) |",
        "",
        "The plain loop computes logits for every position (what `model(**batch)` does); the "
        "capture asks for the last position's only (it stores no logits), which is part of "
        "why it keeps up while also tokenizing, gathering the kept rows and writing them.",
        "",
        "Peak memory (peak RSS of a fresh process: imports, model and capture; the tiny "
        "random llama, so the capture's own memory is not hidden under a model's; "
        "hidden_states of layers 0-1, sequences cut to 8 tokens, batch 64, units of 256 sequences):",
        "",
        "| sequences | tokens stored | units | RSS after load | peak RSS | seconds |",
        "|---|---|---|---|---|---|",
    ]
    for m in mem:
        lines.append(f"| {m['sequences']} | {m['tokens']} | {m['units']} | {m['after_load_rss_kib'] / 1024:.0f} MiB "
                     f"| {m['peak_rss_kib'] / 1024:.0f} MiB | "
                     f"{m['seconds']:.1f} |")  # fmt: skip
    if len(mem) >= 2:
        lo, hi = mem[0]["peak_rss_kib"], mem[-1]["peak_rss_kib"]
        growth = hi / lo - 1
        lines += ["", f"{mem[-1]['sequences']} vs {mem[0]['sequences']} sequences: peak RSS {growth:+.1%} "
                      f"(target within {MEMORY_TOLERANCE:.0%}: {'met' if abs(growth) <= MEMORY_TOLERANCE else 'NOT met'})."]  # fmt: skip
    lines += ["", "Command: `.venv/bin/python benchmarks/bench_dataset_capture.py`", ""]
    out = HERE / "results" / "dataset_capture.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text("\n".join(lines))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--sequences", type=int, default=48)
    ap.add_argument("--memory", default="1000,20000")
    ap.add_argument("--memory-child", type=int, default=None)
    args = ap.parse_args()
    if args.memory_child is not None:
        memory_child(args.memory_child)
        return
    mem = memory([int(x) for x in args.memory.split(",") if x])  # first: no model in this process yet
    tp = throughput(args.sequences, args.repeat)
    print(f"throughput: {tp}", file=sys.stderr)
    print(f"wrote {write_results(tp, mem, args.repeat)}")


if __name__ == "__main__":
    main()
