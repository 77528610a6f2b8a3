"""The per-run card: conversation, initial-vs-final charts, summary, references, top-k,
layer discrimination and the cross-layer matrix.

:func:`run_card` turns one :class:`RunResult` (numbers from the query layer) into a
plain dict for ``templates/_run.html.j2``; every chart is registered in ``figs``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from actstore.query.compare import SUMMARY_COLUMNS
from actstore.query.tokens import display_token
from actstore.report import figures as F
from actstore.report.cells import Cell, Table, frame_table, num_cell, span, text_cell
from actstore.report.frames import dense, quiet_nanmean
from actstore.report.gather import RunResult

METRIC_TITLES = {"cosine": "Cosine similarity", "mae": "MAE", "jaccard": "Top-1% overlap (Jaccard)"}
ROLE_SHORT = {"system": "sys", "user": "usr", "assistant": "ast"}
METRICS = ("cosine", "mae", "jaccard")
SUMMARY_COLOR = {
    "mean_cosine": (0.5, 1.0, False), "median_cosine": (0.5, 1.0, False), "min_cosine": (0.5, 1.0, False),
    "mean_overlap": (0.0, 1.0, False), "median_overlap": (0.0, 1.0, False), "min_overlap": (0.0, 1.0, False),
}  # fmt: skip


def sources_of(df: pd.DataFrame) -> list[str]:
    """The sources of a long frame, in order of appearance."""
    return [str(s) for s in pd.unique(df["source"].to_numpy(dtype=object))]


def metric_charts(df: pd.DataFrame, figs: F.Figures, title: str) -> list[str]:
    """Three charts (cosine, MAE, overlap per layer), one line per source, from a long
    frame with source, layer and the three metric columns."""
    sources, layers = sources_of(df), sorted(set(df["layer"]))
    cube = dense(df, [("source", sources), ("layer", layers)], METRICS)
    return cube_metric_charts(cube, sources, layers, figs, title)


def cube_metric_charts(
    cube: np.ndarray, sources: list[str], layers: list[int], figs: F.Figures, title: str
) -> list[str]:
    """The same from a ``(metric, source, layer)`` cube."""
    out = []
    for m, (metric, mtitle) in enumerate(METRIC_TITLES.items()):
        series = [(s, cube[m, i], F.SOURCE_COLORS.get(s, F.color(i))) for i, s in enumerate(sources)]
        out.append(figs.add(F.line(layers, series, title=f"{mtitle} — {title}", ytitle=metric)))
    return out


def summary_table(summary: pd.DataFrame, keys: list[str]) -> Table:
    return frame_table(summary[[*keys, *SUMMARY_COLUMNS]], SUMMARY_COLOR)


def message_label(index: Any, role: Any, generated: bool = False) -> str:
    # The generated reply is an assistant turn too; its label says it is the model's.
    return f"{index}·gen" if generated else f"{index}·{ROLE_SHORT.get(str(role), str(role)[:3])}"


def generated_messages(run: Any) -> set[int]:
    """Snapshot indexes marked as the generated reply (Activation Lab's last snapshot)."""
    return {int(s["index"]) for s in run.snapshot_index if s.get("generated")}


def message_texts(run: Any) -> dict[int, str]:
    """Each snapshot's whole message when the run has it (the scenario's messages, the
    generated text for the reply), else its 80-character preview."""
    snaps = run.snapshot_index
    contents = [m.get("content", "") for m in run.scenario.get("prompt", {}).get("messages", [])]
    given = [s for s in snaps if not s.get("generated")]
    full = len(contents) == len(given)
    out = {int(s["index"]): str(s.get("content_preview", "")) for s in snaps}
    for k, s in enumerate(given):
        if full:
            out[int(s["index"])] = contents[k]
    for s in snaps:
        if s.get("generated") and run.meta.get("generated_text") is not None:
            out[int(s["index"])] = str(run.meta["generated_text"])
    return out


def reference_block(rr: RunResult, figs: F.Figures) -> dict[str, Any]:
    """Line charts per source, message x reference heatmap, summary, per-message
    charts and the user / assistant averages."""
    run, c = rr.run, rr.cube
    assert c is not None
    labels, sources, layers, msg_ids = c.labels, c.sources, c.layers, c.messages
    colors = [F.color(i) for i in range(len(labels))]
    snaps = run.snapshot_index
    gen = generated_messages(run)
    xlabels = [message_label(m, r, m in gen) for m, r in zip(c.messages, c.roles, strict=True)]
    cube = c.values  # (metric, message, reference, source, layer)
    over_layers = quiet_nanmean(cube, axis=-1)  # (metric, message, reference, source)
    line_charts = [
        figs.add(
            F.line(
                msg_ids,
                [(lab, over_layers[0, :, r, si], colors[r]) for r, lab in enumerate(labels)],
                title=f"{source}: mean cosine over layers",
                xtitle="message",
                ytitle="cosine",
                markers=True,
                xlabels=xlabels,
            )
        )  # fmt: skip
        for si, source in enumerate(sources)
    ]
    mr = rr.message_reference
    assert mr is not None
    z = mr[labels].to_numpy(dtype=float)
    finite = z[np.isfinite(z)]
    heat = figs.add(F.heatmap(
        z, labels, [message_label(m, r, m in gen) for m, r in zip(mr["message"], mr["role"], strict=True)],
        title="Message × reference: mean cosine over layers and sources", xtitle="reference", ytitle="message",
        zmin=float(finite.min()) if finite.size else None, zmax=float(finite.max()) if finite.size else None,
    ))  # fmt: skip
    best = dict(zip(mr["message"], mr["best"], strict=True))
    texts = message_texts(run)
    messages = [
        {"index": m, "role": snap["role"], "preview": texts.get(m, ""), "generated": bool(snap.get("generated")),
         "closest": best.get(m),
         "charts": layer_reference_charts(cube[0, k], labels, colors, sources, layers, figs, f"message {m}")}
        for k, (m, snap) in enumerate(zip(msg_ids, snaps, strict=True))
    ]  # fmt: skip
    roles = []
    for role in ("user", "assistant"):
        mean = c.role_mean(role)  # (metric, reference, source, layer)
        if mean is None:
            continue
        roles.append({
            "role": role, "n": c.roles.count(role),
            "table": reference_source_table(quiet_nanmean(mean, axis=-1), labels, sources),
            "charts": layer_reference_charts(mean[0], labels, colors, sources, layers, figs, f"{role} average"),
        })  # fmt: skip
    summary = reference_source_table(quiet_nanmean(over_layers, axis=1), labels, sources)
    return {"labels": labels, "line_charts": line_charts, "heatmap": heat, "summary": summary,
            "messages": messages, "roles": roles}  # fmt: skip


def layer_reference_charts(
    cos: np.ndarray, labels: list[str], colors: list[str], sources: list[str], layers: list[int], figs: F.Figures,
    what: str,
) -> list[str]:  # fmt: skip
    """Four charts (one per source): cosine per layer, one line per reference.
    ``cos`` is (reference, source, layer)."""
    return [
        figs.add(
            F.line(
                layers,
                [(lab, cos[r, si], colors[r]) for r, lab in enumerate(labels)],
                title=f"{source} — {what}",
                ytitle="cosine",
                height=260,
            )
        )  # fmt: skip
        for si, source in enumerate(sources)
    ]


def reference_source_table(means: np.ndarray, labels: list[str], sources: list[str]) -> Table:
    """Reference rows; for each source the mean cosine, MAE and overlap.
    ``means`` is (metric, reference, source)."""
    lo, hi = span(means[0].ravel())
    rows = []
    for r, lab in enumerate(labels):
        row = [text_cell(lab, "label")]
        for si in range(len(sources)):
            row += [
                num_cell(means[0, r, si], lo, hi),
                num_cell(means[1, r, si]),
                num_cell(means[2, r, si], 0.0, 1.0),
            ]
        rows.append(row)
    columns = ["reference"] + ["cos", "MAE", "overlap"] * len(sources)
    return Table(columns, rows, [("", 1)] + [(s, 3) for s in sources])


def topk_explorer(run: Any) -> dict[str, Any] | None:
    """The seed's generation explorer: per step, the top-k next tokens and probabilities."""
    steps = []
    for st in run.steps:
        top = st.get("top_k") or []
        if not top:
            return None
        steps.append({
            "step": st["step"], "kind": st.get("kind", ""),
            "generated": display_token(st.get("generated_token") or ""),
            "top": [[display_token(t.get("token") or str(t.get("id"))), round(float(np.exp(t["logprob"])), 5)] for t in top],
        })  # fmt: skip
    return {"steps": steps, "k": max(len(s["top"]) for s in steps)} if steps else None


def discrimination_block(rr: RunResult, figs: F.Figures) -> dict[str, Any] | None:
    df = rr.discrimination
    if df is None or df.empty:
        return None
    series = [
        (s, g.sort_values("layer")["separation"].to_numpy(), F.SOURCE_COLORS.get(s, F.color(i)))
        for i, (s, g) in enumerate(df.groupby("source", sort=False))
    ]
    chart = figs.add(F.line(
        sorted(set(df["layer"])), series, title="How far apart the references are, per layer (mean cosine distance)",
        ytitle="separation (1 − cos)",
    ))  # fmt: skip
    return {"chart": chart, "table": ranking_table(df)}


def ranking_table(df: pd.DataFrame, top: int = 5) -> Table:
    """Rank rows x source columns: the layer at that rank and its separation."""
    sources = sources_of(df)
    at = {
        (src, int(rank)): f"layer {int(layer)} ({float(sep):.3f})"
        for src, rank, layer, sep in df[["source", "rank", "layer", "separation"]].to_numpy(dtype=object)
    }
    rows = [
        [Cell(str(rank), None, "label"), *(Cell(at.get((s, rank), "–"), None, "num") for s in sources)]
        for rank in range(1, top + 1)
    ]
    return Table(["rank", *sources], rows)


def cross_layer_chart(rr: RunResult, figs: F.Figures) -> str | None:
    df = rr.cross
    if df is None or df.empty:
        return None
    mat = df.pivot(index="layer_a", columns="layer_b", values="cosine")
    z = mat.to_numpy(dtype=float)
    return figs.add(F.heatmap(
        z, mat.columns.tolist(), mat.index.tolist(), title="Cross-layer cosine of hidden_out at the final state",
        xtitle="layer", ytitle="layer", colorscale="Viridis", zmin=float(np.nanmin(z)), zmax=1.0,
        height=460,
    ))  # fmt: skip


def run_card(rr: RunResult, figs: F.Figures, open_: bool) -> dict[str, Any]:
    """Everything ``_run.html.j2`` needs for one run."""
    run = rr.run
    model = run.meta.get("model", {})
    messages = run.scenario.get("prompt", {}).get("messages", [])
    card: dict[str, Any] = {
        "label": rr.label, "id": run.id, "open": open_, "scenario": run.scenario.get("name", ""),
        "model": model.get("id", ""), "created_at": str(run.meta.get("created_at", ""))[:19].replace("T", " "),
        "n_layers": len(run.layers), "n_steps": run.n_steps, "prompt_len": run.prompt_len,
        "messages": messages, "generated": run.generated_text(), "notes": rr.notes,
        "intra_charts": metric_charts(rr.intra, figs, "initial → final") if len(rr.intra) else [],
        "intra_table": summary_table(rr.intra_summary, ["source"]),
        "refs": reference_block(rr, figs) if rr.cube is not None else None,
        "topk": topk_explorer(run), "discrimination": discrimination_block(rr, figs),
        "cross": cross_layer_chart(rr, figs),
    }  # fmt: skip
    return card


__all__ = ["METRICS", "cube_metric_charts", "message_label", "metric_charts", "run_card", "summary_table"]
