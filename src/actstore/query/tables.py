"""The four tables of the seed's emotion experiment, from one run.

>>> from actstore.store.store import ActStore                     # doctest: +SKIP
>>> run = ActStore.open("stores/actstore.zarr").run("emotions")   # doctest: +SKIP
>>> tables = paper_tables(run)                                    # doctest: +SKIP
>>> tables["message_reference"]                                   # doctest: +SKIP

Data flow: one intra-run plan and one snapshots-vs-references plan are computed in a
single ``dask.compute`` (``plan.compute_plans``); the tables are pandas reshapes of
those two long frames:

1. ``intra_run_drift``: per source, cosine between the initial and final state across
   layers: mean, std, median, min and the layer of the min.
2. ``message_reference``: conversation message x reference, mean cosine over layers and
   the four residual sources, the best (highest) reference per message marked.
3. ``reference_source``: reference x source, mean cosine over messages and layers.
4. ``role_gap``: per source, mean cosine of user and of assistant snapshots (over
   references and layers) and their gap (user - assistant).

Tables 2-4 need conversation snapshots and reference states; a run without them gets
table 1 only.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from actstore import naming
from actstore.query.compare import compare_states_plan, run_sources, snapshots_vs_references_plan, summarize
from actstore.query.plan import Plan, compute_plans


def paper_tables(run: Any, layers: list[int] | None = None) -> dict[str, pd.DataFrame]:
    """The seed's four emotion-experiment tables (see the module docstring)."""
    sources = [s for s in naming.RESIDUAL_SOURCES if s in run.sources]
    plans: list[Plan] = [compare_states_plan(run, "initial", "final", sources, layers)]
    with_refs = bool(run.snapshot_index and run.reference_labels)
    if with_refs:
        plans.append(snapshots_vs_references_plan(run, run_sources(run, None), layers))
    frames = compute_plans(*plans)
    out = {"intra_run_drift": drift_table(frames[0])}
    if with_refs:
        out.update(reference_tables(frames[1], run))
    return out


def drift_table(intra: pd.DataFrame) -> pd.DataFrame:
    s = summarize(intra, by=["source"])
    cols = {"mean_cosine": "mean", "std_cosine": "std", "median_cosine": "median",
            "min_cosine": "min", "most_divergent_layer": "min_layer"}  # fmt: skip
    return s[["source", *cols]].rename(columns=cols)


def reference_tables(svr: pd.DataFrame, run: Any) -> dict[str, pd.DataFrame]:
    """Tables 2-4 from one snapshots-vs-references frame."""
    labels = list(run.reference_labels)
    # Average over layers within a source first, then over sources, so each source
    # weighs the same whatever its layer count.
    per_source = (
        svr.groupby(["message", "role", "reference", "source"], sort=False)["cosine"].mean().reset_index()
    )
    mr = (
        per_source.groupby(["message", "role", "reference"], sort=False)["cosine"].mean().unstack("reference")
    )
    mr = mr[labels].reset_index()
    previews = {s["index"]: s.get("content_preview", "") for s in run.snapshot_index}
    mr.insert(2, "preview", mr["message"].map(previews))
    # A message without a defined cosine to any reference (a zero vector) has no best one.
    cos = mr[labels]
    mr["best"] = cos.fillna(-np.inf).idxmax(axis=1).astype(object).where(cos.notna().any(axis=1), None)
    mr.columns.name = None

    rs = svr.groupby(["reference", "source"], sort=False)["cosine"].mean().unstack("source")
    rs = rs.loc[labels, [s for s in naming.RESIDUAL_SOURCES if s in rs.columns]].reset_index()
    rs.columns.name = None

    roles = svr[svr["role"].isin(["user", "assistant"])]
    rg = roles.groupby(["source", "role"], sort=False)["cosine"].mean().unstack("role")
    for role in ("user", "assistant"):
        if role not in rg:
            rg[role] = float("nan")
    rg = rg[["user", "assistant"]]
    rg["gap"] = rg["user"] - rg["assistant"]
    order = [s for s in naming.RESIDUAL_SOURCES if s in rg.index]
    rg = rg.loc[order].reset_index()
    rg.columns.name = None
    return {"message_reference": mr, "reference_source": rs, "role_gap": rg}
