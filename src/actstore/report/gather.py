"""Every number the report shows, from the query layer, in as few computes as possible.

Data flow::

    runs --plans--> compare_states_plan (initial vs final, all runs)
                    inter_run_plan        (per group of runs of one model, >= 2 runs;
                                           the same reads as the intra plan: read once)
                    snapshots_vs_references_plan (runs with snapshots and references)
                    cross_layer_plan      (per run: hidden_out at the final state)
                    reference_cosines_plan (per run with >= 2 references)
         --compute_plans: ONE dask.compute--> long DataFrames
         --summarize; SvrCube (the snapshots-vs-references answer as one NumPy cube, whose
           reductions equal role_averages, reference_tables and the discrimination's
           ``within``); discrimination --> ReportData

No array is loaded here: the query layer selects the few vectors each comparison needs
and reduces them lazily. Jaccard overlap follows the seed's report: the top 1% of
dimensions by magnitude (``magnitude=True``), unless the caller says otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from actstore.errors import SelectionError
from actstore.query import metrics as M
from actstore.query.analyses import cross_layer_plan
from actstore.query.compare import (
    compare_states_plan,
    inter_run_plan,
    run_sources,
    snapshots_vs_references_plan,
    summarize,
)
from actstore.query.plan import Plan, compute_plans
from actstore.query.states import reference_stack
from actstore.report.frames import SvrCube

INTRA_KEYS = ["run", "source"]
INTER_KEYS = ["run_a", "run_b", "state", "source"]


@dataclass
class RunResult:
    """One run's numbers. ``label`` is the short name (R1, R2...) used in matrices."""

    run: Any
    label: str
    intra: pd.DataFrame
    intra_summary: pd.DataFrame
    svr: pd.DataFrame | None = None
    cube: SvrCube | None = None  # svr as (metric, message, reference, source, layer)
    message_reference: pd.DataFrame | None = None  # query.tables.reference_tables' table
    cross: pd.DataFrame | None = None
    discrimination: pd.DataFrame | None = None
    notes: list[str] = field(default_factory=list)


@dataclass
class ReportData:
    runs: list[RunResult]
    intra: pd.DataFrame
    intra_summary: pd.DataFrame
    inter: pd.DataFrame
    inter_summary: pd.DataFrame
    frac: float
    magnitude: bool
    notes: list[str] = field(default_factory=list)

    @property
    def labels(self) -> dict[str, str]:
        """run id -> short label."""
        return {r.run.id: r.label for r in self.runs}


def model_groups(runs: list[Any]) -> list[list[Any]]:
    """Runs that can be compared with each other: same model and hidden size."""
    groups: dict[tuple[Any, ...], list[Any]] = {}
    for run in runs:
        model = run.meta.get("model", {})
        key = (model.get("id"), model.get("arch", {}).get("hidden_size"))
        groups.setdefault(key, []).append(run)
    return list(groups.values())


def gather(
    runs: list[Any], *, frac: float = M.DEFAULT_FRAC, magnitude: bool = True, cross_layer: bool = True
) -> ReportData:
    """Compute the report's numbers for ``runs`` (see the module docstring)."""
    if not runs:
        raise SelectionError("no runs to report on")
    opts = {"frac": frac, "magnitude": magnitude}
    notes: list[str] = []
    plans: dict[str, Plan] = {"intra": compare_states_plan(runs, "initial", "final", **opts)}  # type: ignore[arg-type]
    by_model = model_groups(runs)
    groups = [g for g in by_model if len(g) > 1]  # a run alone with its model is in no pair
    if len(by_model) > 1:
        notes.append(
            "The runs come from more than one model; only runs of the same model are compared with each other."
        )
    for i, group in enumerate(groups):
        plans[f"inter{i}"] = inter_run_plan(group, frac=frac, magnitude=magnitude)
    with_refs = [r for r in runs if r.snapshot_index and r.reference_labels]
    if with_refs:
        plans["svr"] = snapshots_vs_references_plan(with_refs, **opts)  # type: ignore[arg-type]
    for run in runs:
        if cross_layer and "hidden_out" in run.sources:
            plans[f"cross:{run.id}"] = cross_layer_plan(run, "hidden_out", "final")
        if len(run.reference_labels) >= 2:
            plans[f"refcos:{run.id}"] = reference_cosines_plan(run)
    values = dict(zip(plans, compute_plans(*plans.values()), strict=True))

    intra = values["intra"]
    intra_summary = summarize(intra, by=INTRA_KEYS)
    inter_frames = [values[k] for k in values if k.startswith("inter")]
    inter = pd.concat(inter_frames, ignore_index=True) if inter_frames else _empty_inter()
    inter_summary = summarize(inter, by=INTER_KEYS) if len(inter) else pd.DataFrame(columns=INTER_KEYS)
    svr_all = values.get("svr")

    results = []
    for i, run in enumerate(runs):
        rr = RunResult(
            run=run,
            label=f"R{i + 1}",
            intra=intra[intra["run"] == run.id].reset_index(drop=True),
            intra_summary=intra_summary[intra_summary["run"] == run.id].reset_index(drop=True),
            cross=values.get(f"cross:{run.id}"),
        )
        if svr_all is not None and run in with_refs:
            rr.svr = svr_all[svr_all["run"] == run.id].reset_index(drop=True)
            rr.cube = SvrCube(rr.svr, run)
            rr.message_reference = rr.cube.message_reference()
        elif not run.reference_labels:
            rr.notes.append("This run has no reference states, so there is no reference comparison.")
        if f"refcos:{run.id}" in values:
            rr.discrimination = discrimination(run, values[f"refcos:{run.id}"], rr.cube)
        results.append(rr)
    return ReportData(results, intra, intra_summary, inter, inter_summary, frac, magnitude, notes)


def reference_cosines_plan(run: Any) -> Plan:
    """Cosine between every pair of the run's reference states, per source and layer:
    ``{source: (R, R, L)}``, from ``reference_stack`` and ``metrics.cosine``."""
    pieces: dict[Any, Any] = {}
    for source in run_sources(run, None):
        r = reference_stack(run, source).rechunk({0: -1})
        pieces[source] = M.cosine(r[:, None], r[None, :])
    return Plan(pieces, lambda values: values)


def discrimination(run: Any, ref_cos: dict[str, np.ndarray], cube: SvrCube | None) -> pd.DataFrame:
    """``query.analyses.layer_discrimination(run)`` from pieces the report computes in
    its single compute anyway (instead of one more compute per run).

    Same definitions and columns (separation, min_separation, within, fisher; rank by
    separation): separation and min_separation from the reference x reference cosines,
    ``within`` (mean over snapshots of the distance to the closest reference) from the
    snapshots-vs-references answer. ``tests/report/test_gather.py`` checks the result
    equals ``layer_discrimination``. (Worth a ``layer_discrimination_plan`` in
    ``query.analyses``.)
    """
    lay = list(run.layers)
    iu, ju = np.triu_indices(len(run.reference_labels), 1)
    within_all = cube.within() if cube is not None else None
    frames = []
    for source, cos in ref_cos.items():
        d = 1 - np.asarray(cos, dtype=np.float64)[iu, ju]  # (pairs, L)
        within = np.full(len(lay), np.nan)
        if within_all is not None and cube is not None and source in cube.sources:
            by_layer = dict(zip(cube.layers, within_all[cube.sources.index(source)], strict=True))
            within = np.asarray([by_layer.get(la, np.nan) for la in lay])
        fisher = d.mean(0) / np.where(within == 0, np.nan, within)
        frames.append(pd.DataFrame({"run": run.id, "source": source, "layer": lay, "separation": d.mean(0),
                                    "min_separation": d.min(0), "within": within, "fisher": fisher}))  # fmt: skip
    df = pd.concat(frames, ignore_index=True)
    df["rank"] = df.groupby("source")["separation"].rank(ascending=False, method="first").astype("Int64")
    return df.sort_values(["source", "rank"], kind="stable", ignore_index=True)


def _empty_inter() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=object) for c in ["run_a", "run_b", "state", "source", "layer"]}
                        | {m: pd.Series(dtype=float) for m in M.METRICS})  # fmt: skip
