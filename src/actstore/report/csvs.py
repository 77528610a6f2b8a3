"""The seed's four CSV files, with its file names and columns, from :class:`ReportData`.

=========================  ==========================================================
comparison_report.csv      state, pair, run_a, run_b, generated_a, generated_b,
                           prompt_a, prompt_b, source, <summary columns>
comparison_cosines.csv     state, pair, run_a, run_b, generated_a, generated_b,
                           source, layer, cosine, MAE, overlap
intra_run_report.csv       run, generated, prompt, source, <summary columns>
intra_run_cosines.csv      run, source, layer, cosine, MAE, overlap
=========================  ==========================================================

Summary columns are ``actstore.query.compare.SUMMARY_COLUMNS`` (the seed's). Values keep
full precision (the seed rounded to 4 decimals). With a single run the two comparison
files hold their header only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from actstore.query.compare import SUMMARY_COLUMNS
from actstore.report.gather import ReportData

INTRA_REPORT_COLUMNS = ["run", "generated", "prompt", "source", *SUMMARY_COLUMNS]
INTRA_COSINES_COLUMNS = ["run", "source", "layer", "cosine", "MAE", "overlap"]
PAIR_COLUMNS = ["state", "pair", "run_a", "run_b", "generated_a", "generated_b"]
COMPARISON_REPORT_COLUMNS = [*PAIR_COLUMNS, "prompt_a", "prompt_b", "source", *SUMMARY_COLUMNS]
COMPARISON_COSINES_COLUMNS = [*PAIR_COLUMNS, "source", "layer", "cosine", "MAE", "overlap"]
CSV_FILES = {
    "comparison_report.csv": COMPARISON_REPORT_COLUMNS,
    "comparison_cosines.csv": COMPARISON_COSINES_COLUMNS,
    "intra_run_report.csv": INTRA_REPORT_COLUMNS,
    "intra_run_cosines.csv": INTRA_COSINES_COLUMNS,
}
_METRIC_NAMES = {"cosine": "cosine", "mae": "MAE", "jaccard": "overlap"}


def prompt_text(run: Any) -> str:
    """The conversation as ``role: content`` lines (the rendered chat, minus the template)."""
    messages = run.scenario.get("prompt", {}).get("messages", [])
    return "\n".join(f"{m.get('role', '?')}: {m.get('content', '')}" for m in messages)


def generated_text(run: Any) -> str:
    return " ".join(str(run.generated_text()).split())


def short_generated(run: Any) -> str:
    """The seed's short label of a run: its first 40 generated characters, else its id."""
    return generated_text(run)[:40] or run.id


def pair_name(a: str, b: str) -> str:
    return f"{a}  vs  {b}"


def intra_report(data: ReportData) -> pd.DataFrame:
    runs = {r.run.id: r.run for r in data.runs}
    df = data.intra_summary.copy()
    df.insert(1, "generated", df["run"].map(lambda i: generated_text(runs[i])))
    df.insert(2, "prompt", df["run"].map(lambda i: prompt_text(runs[i])))
    return df[INTRA_REPORT_COLUMNS]


def intra_cosines(data: ReportData) -> pd.DataFrame:
    df = data.intra.rename(columns=_METRIC_NAMES)
    return df[INTRA_COSINES_COLUMNS].reset_index(drop=True)


def _pair_columns(df: pd.DataFrame, data: ReportData) -> pd.DataFrame:
    runs = {r.run.id: r.run for r in data.runs}
    out = df.copy()
    out.insert(0, "pair", [pair_name(a, b) for a, b in zip(out["run_a"], out["run_b"], strict=True)])
    out["generated_a"] = out["run_a"].map(lambda i: short_generated(runs[i]))
    out["generated_b"] = out["run_b"].map(lambda i: short_generated(runs[i]))
    out["prompt_a"] = out["run_a"].map(lambda i: prompt_text(runs[i]))
    out["prompt_b"] = out["run_b"].map(lambda i: prompt_text(runs[i]))
    return out


def comparison_report(data: ReportData) -> pd.DataFrame:
    if not len(data.inter_summary):
        return pd.DataFrame(columns=COMPARISON_REPORT_COLUMNS)
    return _pair_columns(data.inter_summary, data)[COMPARISON_REPORT_COLUMNS]


def comparison_cosines(data: ReportData) -> pd.DataFrame:
    if not len(data.inter):
        return pd.DataFrame(columns=COMPARISON_COSINES_COLUMNS)
    df = _pair_columns(data.inter.rename(columns=_METRIC_NAMES), data)
    return df[COMPARISON_COSINES_COLUMNS].reset_index(drop=True)


def write_csvs(data: ReportData, out_dir: str | Path) -> dict[str, Path]:
    """Write the four CSVs into ``out_dir``; returns file name -> path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    frames = {
        "comparison_report.csv": comparison_report(data),
        "comparison_cosines.csv": comparison_cosines(data),
        "intra_run_report.csv": intra_report(data),
        "intra_run_cosines.csv": intra_cosines(data),
    }
    paths = {}
    for name, df in frames.items():
        paths[name] = out / name
        df.to_csv(paths[name], index=False)
    return paths
