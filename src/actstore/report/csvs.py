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


def _texts(data: ReportData) -> dict[str, dict[str, str]]:
    """Per run id, once: the prompt, generated text and short label (not once per row)."""
    return {
        r.run.id: {
            "prompt": prompt_text(r.run),
            "generated": generated_text(r.run),
            "short": short_generated(r.run),
        }
        for r in data.runs
    }


def intra_report(data: ReportData) -> pd.DataFrame:
    texts = _texts(data)
    df = data.intra_summary.copy()
    df.insert(1, "generated", df["run"].map({k: v["generated"] for k, v in texts.items()}))
    df.insert(2, "prompt", df["run"].map({k: v["prompt"] for k, v in texts.items()}))
    return df[INTRA_REPORT_COLUMNS]


def intra_cosines(data: ReportData) -> pd.DataFrame:
    df = data.intra.rename(columns=_METRIC_NAMES)
    return df[INTRA_COSINES_COLUMNS].reset_index(drop=True)


def _pair_columns(df: pd.DataFrame, data: ReportData, prompts: bool) -> pd.DataFrame:
    texts = _texts(data)
    short = {k: v["short"] for k, v in texts.items()}
    out = df.copy()
    pair = out["run_a"].astype(str) + "  vs  " + out["run_b"].astype(str)  # the seed's pair key
    out.insert(0, "pair", pair)
    out["generated_a"] = out["run_a"].map(short)
    out["generated_b"] = out["run_b"].map(short)
    if prompts:
        prompt = {k: v["prompt"] for k, v in texts.items()}
        out["prompt_a"] = out["run_a"].map(prompt)
        out["prompt_b"] = out["run_b"].map(prompt)
    return out


def comparison_report(data: ReportData) -> pd.DataFrame:
    if not len(data.inter_summary):
        return pd.DataFrame(columns=COMPARISON_REPORT_COLUMNS)
    return _pair_columns(data.inter_summary, data, prompts=True)[COMPARISON_REPORT_COLUMNS]


def comparison_cosines(data: ReportData) -> pd.DataFrame:
    if not len(data.inter):
        return pd.DataFrame(columns=COMPARISON_COSINES_COLUMNS)
    df = _pair_columns(data.inter.rename(columns=_METRIC_NAMES), data, prompts=False)
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
