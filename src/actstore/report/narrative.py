"""The report's first screen: what the runs show, in plain words.

Every sentence is derived from query results already in :class:`ReportData`: the
initial-vs-final drift (``intra_run``), the message x reference cosines
(``snapshots_vs_references``, tabled by ``query.tables.reference_tables``), the user and
assistant averages (``role_averages``), the layer ranking (``layer_discrimination``)
and, with several runs, the pair summaries (``inter_run``).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import pandas as pd

from actstore.report.cells import Cell, Table, num_cell, text_cell
from actstore.report.frames import best_labels, quiet_nanmean
from actstore.report.gather import ReportData, RunResult
from actstore.report.run_section import generated_messages, message_label, message_texts

FULL_DETAIL_RUNS = 3  # above this many runs the first screen is one table row per run
PREFERRED_SOURCE = "hidden_out"


def _pick_source(sources: list[str]) -> str | None:
    if PREFERRED_SOURCE in sources:
        return PREFERRED_SOURCE
    return sources[0] if sources else None


def drift(rr: RunResult) -> dict[str, Any] | None:
    """Mean cosine initial -> final and the most divergent layer, for one source."""
    s = rr.intra_summary
    source = _pick_source(list(s["source"]))
    if source is None:
        return None
    row = s[s["source"] == source].iloc[0]
    return {"source": source, "mean": float(row["mean_cosine"]), "layer": row["most_divergent_layer"],
            "min": float(row["min_cosine"])}  # fmt: skip


def best_layer(rr: RunResult) -> dict[str, Any] | None:
    """The most discriminative layer (rank 1 by separation) of the preferred source."""
    df = rr.discrimination
    if df is None or df.empty:
        return None
    source = _pick_source(list(dict.fromkeys(df["source"])))
    sub = df[df["source"] == source].sort_values("rank")
    top = sub.iloc[0]
    avg = float(sub["separation"].mean())
    return {"source": source, "layer": int(top["layer"]), "separation": float(top["separation"]),
            "ratio": float(top["separation"]) / avg if avg > 0 else float("nan"),
            "next": [int(v) for v in sub["layer"].iloc[1:3]]}  # fmt: skip


def closest_references(rr: RunResult) -> pd.DataFrame | None:
    """Per message: closest reference (mean cosine over layers and sources) and the
    reference it leans toward most relative to that reference's average over messages."""
    mr = rr.message_reference
    if mr is None or mr.empty:
        return None
    labels = list(rr.run.reference_labels)
    z = mr[labels].to_numpy(dtype=float)
    # A reference with no direction, or a message with none (zero vectors), has no cosine:
    # NaN, left out of the averages and maxima; NaN or None where nothing is defined.
    rel = z - quiet_nanmean(z, axis=0)
    out = mr[["message", "role", "preview", "best"]].copy()
    texts = message_texts(rr.run)  # the whole message, not the 80-character preview
    out["preview"] = [texts.get(int(m), p) for m, p in zip(out["message"], out["preview"], strict=True)]
    gen = generated_messages(rr.run)
    out["generated"] = [int(m) in gen for m in out["message"]]
    out["best_cosine"] = _row_max(z)
    out["leans"] = pd.Series(best_labels(rel, labels), index=out.index, dtype=object)
    out["lean"] = _row_max(rel)
    return out


def _row_max(x: np.ndarray) -> np.ndarray:
    """Per row, the largest defined value; NaN for a row with none (without NumPy's
    all-NaN warning)."""
    filled = np.where(np.isnan(x), -np.inf, x).max(axis=1)
    return np.where(np.isfinite(filled), filled, np.nan)


def _closest_counts(cr: pd.DataFrame | None) -> Counter[str]:
    """How many messages each reference is closest to (messages with none left out)."""
    return Counter(b for b in cr["best"] if b is not None) if cr is not None else Counter()


def role_gap(rr: RunResult) -> dict[str, Any] | None:
    """Mean cosine of user and of assistant snapshots (over references and layers)."""
    c = rr.cube
    if c is None:
        return None
    source = _pick_source(c.sources)
    user, assistant = c.role_mean("user"), c.role_mean("assistant")
    if source is None or user is None or assistant is None:
        return None
    si = c.sources.index(source)
    u, a = user[0, :, si], assistant[0, :, si]
    if np.isnan(u).all() or np.isnan(a).all():  # a role whose snapshots have no cosine: no gap to tell
        return None
    return {"source": source, "user": float(np.nanmean(u)), "assistant": float(np.nanmean(a))}


def run_points(rr: RunResult) -> list[str]:
    """Plain sentences about one run."""
    points = []
    run = rr.run
    n_msgs = len(run.scenario.get("prompt", {}).get("messages", []))
    text = " ".join(run.generated_text().split())
    if text:
        short = text if len(text) <= 160 else text[:157] + "…"
        points.append(
            f"A {n_msgs}-message conversation; the model answered in {run.n_steps} tokens: “{short}”"
        )
    d = drift(rr)
    if d:
        points.append(
            f"From the last prompt token to the last generated token, the residual stream ({d['source']}) keeps a "
            f"mean cosine of {d['mean']:.2f} across layers; it changes most at layer {d['layer']} (cosine {d['min']:.2f})."
        )
    cr = closest_references(rr)
    counts = _closest_counts(cr)
    if cr is not None and counts:
        first, n = counts.most_common(1)[0]
        rest = ", ".join(f"{lab} ({k})" for lab, k in counts.most_common()[1:])
        undefined = len(cr) - sum(counts.values())
        points.append(
            f"Averaged over layers and sources, {n} of {len(cr)} messages are closest to “{first}”"
            + (f"; the others to {rest}" if rest else "")
            + (f"; {undefined} {'has' if undefined == 1 else 'have'} no cosine with any reference (a zero vector)"
               if undefined else "")
            + "."
        )
        if len(counts) < 3 and len(rr.run.reference_labels) > 2:
            points.append(
                "Raw closeness is dominated by a few references, so the table below also shows which reference "
                "each message leans toward relative to that reference's average over the conversation."
            )
    g = role_gap(rr)
    if g:
        closer = "user" if g["user"] > g["assistant"] else "assistant"
        points.append(
            f"{closer.capitalize()} turns sit closer to the references ({g['source']}: user {g['user']:.3f} vs "
            f"assistant {g['assistant']:.3f} mean cosine over references and layers)."
        )
    b = best_layer(rr)
    if b:
        nxt = f", then {', '.join(map(str, b['next']))}" if b["next"] else ""
        points.append(
            f"The most discriminative layer is {b['layer']}{nxt} ({b['source']}): there the reference states are "
            f"furthest apart (mean cosine distance {b['separation']:.3f}, {b['ratio']:.1f}× the average layer)."
        )
    points.extend(rr.notes)
    return points


def message_table(cr: pd.DataFrame) -> Table:
    rows = [
        [text_cell(message_label(m, r, g), "label"), text_cell(p, "preview"), text_cell(b, "ref"), num_cell(c),
         text_cell(lean if d > 0 else "–", "ref"), num_cell(d if d > 0 else None, digits=3)]
        for m, r, g, p, b, c, lean, d in cr[["message", "role", "generated", "preview", "best", "best_cosine",
                                             "leans", "lean"]].itertuples(index=False, name=None)
    ]  # fmt: skip
    return Table(["message", "text", "closest", "cosine", "leans toward", "Δ vs its mean"], rows)


def pair_points(data: ReportData) -> list[str]:
    s = data.inter_summary
    if not len(s):
        return []
    source = _pick_source(list(dict.fromkeys(s["source"])))
    sub = s[(s["state"] == "final") & (s["source"] == source)].sort_values("mean_cosine")
    if sub.empty:
        return []
    lab = data.labels
    hi, lo = sub.iloc[-1], sub.iloc[0]
    return [
        f"At the final state ({source}), the most similar runs are {lab[hi['run_a']]} and {lab[hi['run_b']]} "
        f"(mean cosine {hi['mean_cosine']:.3f} over layers); the least similar are {lab[lo['run_a']]} and "
        f"{lab[lo['run_b']]} ({lo['mean_cosine']:.3f})."
    ]


def compact_table(data: ReportData) -> Table:
    rows = []
    for rr in data.runs:
        d, b, cr = drift(rr), best_layer(rr), closest_references(rr)
        top = next(iter(_closest_counts(cr).most_common(1)), None)
        rows.append([
            Cell(rr.label, None, "label"), text_cell(rr.run.scenario.get("name", "")),
            num_cell(d["mean"] if d else None), text_cell(d["layer"] if d else None),
            text_cell(f"{top[0]} ({top[1]}/{len(cr)})" if top and cr is not None else None),
            text_cell(b["layer"] if b else None),
        ])  # fmt: skip
    return Table(
        [
            "run",
            "scenario",
            "drift: mean cos",
            "most changed layer",
            "closest reference",
            "most discriminative layer",
        ],
        rows,
    )


def first_screen(data: ReportData) -> dict[str, Any]:
    """``{"runs": [{label, title, points, messages}], "compact": Table|None, "pairs": [...]}``."""
    runs = []
    if len(data.runs) <= FULL_DETAIL_RUNS:
        for rr in data.runs:
            cr = closest_references(rr)
            runs.append({"label": rr.label, "id": rr.run.id, "points": run_points(rr),
                         "messages": message_table(cr) if cr is not None else None})  # fmt: skip
    compact = compact_table(data) if len(data.runs) > FULL_DETAIL_RUNS else None
    return {"runs": runs, "compact": compact, "pairs": pair_points(data), "notes": data.notes}
