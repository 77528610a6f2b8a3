"""What ``export hf-dataset`` costs next to reading the same values and writing them plainly.

Run: ``.venv/bin/python benchmarks/bench_hf_export.py [--positions 32768] [--repeat 3]``

One synthetic run (the real writer; one layer, SmolLM2's width 576, float16) of
``--positions`` positions; one hook (``blocks.0.hook_resid_post``), ``--context 128``.
Alternated in one process, ``--repeat`` times each, medians reported:

* ``zarr read``: the layer's (T, 576) array read whole from Zarr (the floor: decoding);
* ``export hf-dataset``: :func:`actstore.store.hf_dataset.export_hf_dataset`, everything
  (read, window, Arrow file, ``save_to_disk``, rename);
* ``from_dict + save_to_disk``: the already-read array written the way SAELens's
  ``CacheActivationsRunner`` writes its shards (``Dataset.from_dict`` in memory, then
  ``save_to_disk``), without the read.

Writes ``benchmarks/results/hf_export.md``; ``benchmarks/assemble.py`` builds RESULTS.md.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
HOOK, WIDTH = "blocks.0.hook_resid_post", 576


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--positions", type=int, default=32768)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    import datasets
    import numpy as np
    import zarr

    from actstore.store.hf_dataset import export_hf_dataset
    from actstore.store.store import ActStore

    sys.path.insert(0, str(ROOT / "tests"))
    from query.synth import write_synthetic_run

    tmp = Path(tempfile.mkdtemp(prefix="bench_hf_"))
    try:
        store = ActStore.open(tmp / "store.zarr", create=True)
        run_id = write_synthetic_run(store, n_layers=1, prompt_len=args.positions, n_steps=1, width=WIDTH,
                                     sources=("hidden_in",), n_snapshots=0, labels=())  # fmt: skip
        run = store.run(run_id)
        g = zarr.open_group(store=run.group.store, path=run.group.path, mode="r")
        boundary = run.meta["residual_boundaries"].index(1)  # leaving layer 0
        n_win = args.positions // args.context

        def zarr_read() -> np.ndarray:
            return np.asarray(g["acts/residual"][boundary])

        def export() -> None:
            export_hf_dataset(run, tmp / "ds", [HOOK], args.context, quiet=True, overwrite=True)

        values = zarr_read()

        def plain() -> None:
            feats = datasets.Features({
                HOOK: datasets.Array2D(shape=(args.context, WIDTH), dtype="float16"),
                "token_ids": datasets.Sequence(datasets.Value("int32"), length=args.context),
            })  # fmt: skip
            ds = datasets.Dataset.from_dict({
                HOOK: values[: n_win * args.context].reshape(n_win, args.context, WIDTH),
                "token_ids": np.zeros((n_win, args.context), dtype=np.int32),
            }, features=feats)  # fmt: skip
            shutil.rmtree(tmp / "plain", ignore_errors=True)
            ds.save_to_disk(str(tmp / "plain"))

        datasets.disable_progress_bars()
        cases = {"zarr read": zarr_read, "export hf-dataset": export, "from_dict + save_to_disk": plain}
        times: dict[str, list[float]] = {k: [] for k in cases}
        for _ in range(args.repeat):
            for name, fn in cases.items():
                times[name].append(timed(fn))
        exported = datasets.load_from_disk(str(tmp / "ds"))
        assert len(exported) == n_win
        mb = values[: n_win * args.context].nbytes / 1e6
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    lines = [
        "## Hugging Face dataset export",
        "",
        f"One synthetic run, {args.positions:,} positions x {WIDTH} float16 ({mb:.1f} MB of activations "
        f"in {n_win:,} windows of {args.context}), one hook; median of {args.repeat}, alternated in one process.",
        "Command: `python benchmarks/bench_hf_export.py "
        f"--positions {args.positions} --context {args.context} --repeat {args.repeat}`",
        "",
        "| what | median s | MB/s |",
        "|---|---|---|",
    ]
    for name, ts in times.items():
        med = statistics.median(ts)
        lines.append(f"| {name} | {med:.3f} | {mb / med:.0f} |")
    out = HERE / "results" / "hf_export.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
