"""Sections over many runs: the intra-run overview and the inter-run comparison.

Inputs are the summaries and long per-layer frames of :class:`ReportData` (query
results); outputs are plain dicts and :class:`Table` objects for the templates, with
every chart registered in ``figs``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from actstore.report import figures as F
from actstore.report.cells import Cell, Table, num_cell, span, text_cell
from actstore.report.csvs import short_generated
from actstore.report.frames import dense
from actstore.report.gather import ReportData
from actstore.report.run_section import METRICS, cube_metric_charts, sources_of, summary_table

STATES = {
    "initial": "Initial state — prefill, last prompt token",
    "final": "Final state — last generation step, last token",
}
AGG_METRICS = (("cosine", "Cosine similarity"), ("MAE", "MAE"), ("overlap", "Top-1% overlap"))
MATRIX_METRICS = (
    ("mean_cosine", "mean cosine", False),
    ("mean_MAE", "mean MAE", True),
    ("mean_overlap", "mean overlap", False),
)


def overview_table(
    summary: pd.DataFrame, row_key: str | list[str], row_labels: dict[Any, list[Cell]], head: list[str]
) -> Table:
    """Rows (runs or pairs) x sources of mean cosine, then mean / std / median over sources."""
    keys = [row_key] if isinstance(row_key, str) else row_key
    sources = sources_of(summary)
    row_ids = list(row_labels)
    flat = summary[keys[0]].astype(str) if len(keys) == 1 else summary[keys].astype(str).agg("|".join, axis=1)
    names = [str(r) if isinstance(r, str) else "|".join(r) for r in row_ids]
    table = dense(summary.assign(_row=flat), [("_row", names), ("source", sources)], ["mean_cosine"])[0]
    lo, hi = span(table.ravel())
    rows = []
    for rid, v in zip(row_ids, table, strict=True):
        stats = [np.nanmean(v), np.nanstd(v), np.nanmedian(v)] if np.isfinite(v).any() else [np.nan] * 3
        rows.append(list(row_labels[rid]) + [num_cell(x, lo, hi) for x in v] + [num_cell(x) for x in stats])
    groups = [("", len(head)), ("Mean cosine per source", len(sources)), ("Across sources", 3)]
    return Table(head + sources + ["mean", "std", "median"], rows, groups)


def aggregate_table(summary: pd.DataFrame) -> Table:
    """Per source: mean ± std across rows of each row's mean / std / median, per metric."""
    rows = []
    for source, g in summary.groupby("source", sort=False):
        row = [text_cell(source, "label")]
        for metric, _ in AGG_METRICS:
            for stat in ("mean", "std", "median"):
                col = g[f"{stat}_{metric}"].astype(float)
                m, s = col.mean(), col.std(ddof=0)
                row.append(Cell(f"{m:.3f} ± {s:.3f}", None, "num", f"{float(m)!r} ± {float(s)!r}"))
        rows.append(row)
    columns = ["source"] + ["mean", "std", "median"] * len(AGG_METRICS)
    return Table(columns, rows, [("", 1)] + [(title + " (mean ± std)", 3) for _, title in AGG_METRICS])


def layer_heatmaps(
    df: pd.DataFrame, row_keys: list[str], row_label: Any, figs: F.Figures, what: str
) -> list[str]:
    """One heatmap per source: rows (runs or pairs) x layers, colour = cosine."""
    out = []
    for source in sources_of(df):
        sub = df[df["source"] == source]
        mat = sub.pivot_table(index=row_keys, columns="layer", values="cosine", sort=False)
        z = mat.to_numpy(dtype=float)
        lo = float(np.nanmin(z)) if np.isfinite(z).any() else 0.0
        out.append(figs.add(F.heatmap(
            z, mat.columns.tolist(), [row_label(i) for i in mat.index], title=f"{source} — cosine, {what}",
            xtitle="layer", zmin=min(lo, 0.999), zmax=1.0,
        )))  # fmt: skip
    return out


def run_label_cells(data: ReportData) -> dict[str, list[Cell]]:
    return {r.run.id: [Cell(r.label, None, "label"), Cell(r.run.id, None, "mono"), text_cell(short_generated(r.run))]
            for r in data.runs}  # fmt: skip


def intra_overview(data: ReportData, figs: F.Figures) -> dict[str, Any]:
    labels = data.labels
    return {
        "overview": overview_table(
            data.intra_summary, "run", run_label_cells(data), ["run", "id", "generated"]
        ),
        "aggregate": aggregate_table(data.intra_summary),
        "heatmaps": layer_heatmaps(
            data.intra, ["run"], lambda i: labels[i], figs, "initial → final, runs × layers"
        ),
    }


def pair_label(data: ReportData, a: str, b: str) -> str:
    return f"{data.labels[a]}–{data.labels[b]}"


def run_matrices(
    summary: pd.DataFrame, data: ReportData, figs: F.Figures, state: str
) -> list[dict[str, Any]]:
    """Per metric, one run x run heatmap per source (mean over layers)."""
    ids = [r.run.id for r in data.runs]
    names = [r.label for r in data.runs]
    sources = sources_of(summary)
    sub = summary[summary["state"] == state]
    cols = [c for c, _, _ in MATRIX_METRICS]
    cube = dense(sub, [("run_a", ids), ("run_b", ids), ("source", sources)], cols)  # (metric, A, B, source)
    cube = np.where(np.isnan(cube), cube.transpose(0, 2, 1, 3), cube)  # a pair fills both triangles
    out = []
    for m, (_col, title, reverse) in enumerate(MATRIX_METRICS):
        charts = []
        for si, source in enumerate(sources):
            z = cube[m, :, :, si]
            finite = z[np.isfinite(z)]
            charts.append(figs.add(F.heatmap(
                z, names, names, title=f"{source} — {title}", zlabel=title, reverse=reverse,
                zmin=float(finite.min()) if finite.size else None, zmax=float(finite.max()) if finite.size else None,
                height=int(min(560, 140 + 26 * len(ids))),
            )))  # fmt: skip
        out.append({"title": title, "charts": charts})
    return out


def inter_section(data: ReportData, figs: F.Figures) -> dict[str, Any] | None:
    """The inter-run section; None with fewer than two comparable runs."""
    if len(data.runs) < 2 or not len(data.inter):
        return None
    inter, summary = data.inter, data.inter_summary
    pair_cells = {
        (a, b): [Cell(pair_label(data, a, b), None, "label"), Cell(f"{a} vs {b}", None, "mono small")]
        for a, b in summary[["run_a", "run_b"]].drop_duplicates().itertuples(index=False, name=None)
    }
    states = []
    for state, title in STATES.items():
        s_sum = summary[summary["state"] == state]
        s_df = inter[inter["state"] == state]
        if s_sum.empty:
            continue
        states.append({
            "state": state, "title": title,
            "overview": overview_table(s_sum, ["run_a", "run_b"], pair_cells, ["pair", "runs"]),
            "aggregate": aggregate_table(s_sum),
            "matrices": run_matrices(summary, data, figs, state),
            "heatmaps": layer_heatmaps(s_df, ["run_a", "run_b"], lambda p: pair_label(data, *p), figs,
                                       f"{state} state, pairs × layers"),
        })  # fmt: skip
    pairs = []
    keys = list(summary[["run_a", "run_b"]].drop_duplicates().itertuples(index=False, name=None))
    sources, layers, states_ = sources_of(inter), sorted(set(inter["layer"])), list(STATES)
    key = inter["run_a"].astype(str) + "|" + inter["run_b"].astype(str)  # run ids never hold "|"
    # (metric, pair, state, source, layer), filled once; each card takes a slice
    cube = dense(inter.assign(pair=key), [("pair", [f"{a}|{b}" for a, b in keys]), ("state", states_),
                                          ("source", sources), ("layer", layers)], METRICS)  # fmt: skip
    # every pair's summary rows formatted in one pass, then handed out by group
    all_rows = summary_table(summary, ["source"])
    groups = summary.reset_index(drop=True).groupby(["run_a", "run_b", "state"], sort=False).indices
    tables = {k: Table(all_rows.columns, [all_rows.rows[i] for i in idx]) for k, idx in groups.items()}
    for p, (a, b) in enumerate(keys):
        blocks = []
        for si, (state, title) in enumerate(STATES.items()):
            if (a, b, state) not in tables:
                continue
            charts = cube_metric_charts(
                cube[:, p, si], sources, layers, figs, f"{pair_label(data, a, b)}, {state}"
            )
            blocks.append({"title": title, "charts": charts, "table": tables[(a, b, state)]})
        pairs.append({"label": pair_label(data, a, b), "a": a, "b": b, "blocks": blocks})
    legend = Table(["run", "id", "scenario", "generated"], [
        [Cell(r.label, None, "label"), Cell(r.run.id, None, "mono"), text_cell(r.run.scenario.get("name", "")),
         text_cell(short_generated(r.run))] for r in data.runs
    ])  # fmt: skip
    return {"legend": legend, "states": states, "pairs": pairs, "n_pairs": len(pairs)}
