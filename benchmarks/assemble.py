"""Assemble benchmarks/RESULTS.md from the sections each benchmark wrote.

Run: ``.venv/bin/python benchmarks/assemble.py`` after any of bench_capture.py,
bench_query.py, bench_report.py, bench_scale.py, bench_view.py, bench_train_reads.py (each writes
benchmarks/results/<name>.md).
"""

from __future__ import annotations

import platform
from pathlib import Path

HERE = Path(__file__).resolve().parent
ORDER = ("capture", "query", "report", "scale", "integrity", "view", "train_reads")


def main() -> None:
    parts = [
        "# Benchmark results",
        "",
        "Measured figures, side by side in one run per section. Regenerate a section with its",
        "script in benchmarks/, then `python benchmarks/assemble.py`.",
        f"Machine of the last assembly: {platform.machine()}, {platform.python_version()}; "
        "timings on a shared 2-core machine are noisy: compare ratios within one section.",
        "",
    ]
    results = HERE / "results"
    names = [n for n in ORDER if (results / f"{n}.md").exists()]
    names += sorted(p.stem for p in results.glob("*.md") if p.stem not in ORDER)
    for name in names:
        parts += [(results / f"{name}.md").read_text().rstrip(), ""]
    (HERE / "RESULTS.md").write_text("\n".join(parts))
    print(f"wrote {HERE / 'RESULTS.md'} ({', '.join(names) or 'no sections yet'})")


if __name__ == "__main__":
    main()
