"""The seed's comparisons as lazy queries that return long pandas DataFrames.

>>> from actstore.store.store import ActStore                         # doctest: +SKIP
>>> runs = ActStore.open("stores/actstore.zarr").runs(["all"])        # doctest: +SKIP
>>> df = intra_run(runs, layers=[29])                                 # doctest: +SKIP
>>> summarize(df, by=["run", "source"])                               # doctest: +SKIP

Data flow: select states (``states``), reduce them with the three metrics
(``metrics``) into small lazy ``(3, ...)`` arrays, one per (run, state, source), then
compute every piece of a comparison in one ``dask.compute`` (``plan``) and lay the
values out long: one row per run/state/source/layer(/message/reference).

``sources=None`` means the residual-stream sources (hidden_in, hidden_out, attn_out,
mlp_down_out) that a run captured; a source asked for by name must exist.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import dask.array as da
import numpy as np
import pandas as pd

from actstore import naming
from actstore.errors import SelectionError
from actstore.query import metrics as M
from actstore.query.plan import Plan, concat_frames, long_frame
from actstore.query.states import (
    POSITIONAL,
    State,
    check_layer_source,
    parse_state,
    reference_stack,
    select_many,
    snapshot_stack,
    state_position,
    state_vectors,
)

METRICS = M.METRICS
_CHUNK_BYTES = 64 * 2**20  # cap on one block of an all-pairs answer


def as_runs(runs: Any) -> list[Any]:
    """A run reader or an iterable of them, as a list."""
    return [runs] if hasattr(runs, "group") else list(runs)


def run_sources(run: Any, sources: Sequence[str] | None) -> list[str]:
    if sources is not None:
        return [check_layer_source(s) for s in sources]
    return [s for s in naming.RESIDUAL_SOURCES if s in run.sources]


# ---- state vs state in each run -----------------------------------------------------------
def compare_states_plan(
    runs: Any,
    a: State | str = "initial",
    b: State | str = "final",
    sources: Sequence[str] | None = None,
    layers: list[int] | None = None,
    frac: float = M.DEFAULT_FRAC,
    magnitude: bool = False,
) -> Plan:
    sa = parse_state(a) if isinstance(a, str) else a
    sb = parse_state(b) if isinstance(b, str) else b
    # Runs that agree on (source, layers, width) are stacked and reduced together: one
    # graph layer per group instead of one per run keeps 100-run queries cheap to build.
    groups: dict[tuple[str, tuple[int, ...], int], list[tuple[str, Any, Any]]] = {}
    for run in as_runs(runs):
        srcs = run_sources(run, sources)
        if sa.kind in POSITIONAL and sb.kind in POSITIONAL:
            # Both states in one read per stored array (hidden_in/out share theirs).
            pos = [state_position(run, sa), state_position(run, sb)]
            both = select_many(run, srcs, pos, layers)
            pairs = {s: (both[s][:, 0], both[s][:, 1]) for s in srcs}
        else:
            pairs = {s: (state_vectors(run, sa, s, layers), state_vectors(run, sb, s, layers)) for s in srcs}
        lay = tuple(layers if layers is not None else run.layers)
        for source, (va, vb) in pairs.items():
            groups.setdefault((source, lay, va.shape[-1]), []).append((run.id, va, vb))
    pieces: dict[Any, Any] = {
        key: M.metrics_stack(
            da.stack([x[1] for x in items]), da.stack([x[2] for x in items]), frac, magnitude
        )
        for key, items in groups.items()
    }

    def finish(values: dict[Any, Any]) -> pd.DataFrame:
        frames = [
            long_frame(
                values[key],
                [("run", [x[0] for x in groups[key]]), ("layer", list(key[1]))],
                {"state_a": str(sa), "state_b": str(sb), "source": key[0]},
            )
            for key in groups
        ]
        df = concat_frames(frames, ["run", "state_a", "state_b", "source", "layer", *METRICS])
        order = {
            rid: i for i, rid in enumerate(dict.fromkeys(x[0] for items in groups.values() for x in items))
        }
        # run-major order, as a per-run loop would give
        return df.sort_values("run", key=lambda c: c.map(order), kind="stable", ignore_index=True)

    return Plan(pieces, finish)


def compare_states(runs: Any, a: State | str, b: State | str, **kwargs: Any) -> pd.DataFrame:
    """Metrics between two states of each run: run, state_a, state_b, source, layer, metrics."""
    return compare_states_plan(runs, a, b, **kwargs).compute()


def intra_run(
    runs: Any,
    sources: Sequence[str] | None = None,
    layers: list[int] | None = None,
    frac: float = M.DEFAULT_FRAC,
    magnitude: bool = False,
) -> pd.DataFrame:
    """The seed's intra-run drift: initial (last prompt token) vs final state, per layer."""
    return compare_states_plan(runs, "initial", "final", sources, layers, frac, magnitude).compute()


# ---- run vs run ---------------------------------------------------------------------------
def _run_states(
    run: Any, sources: list[str], states: list[State], layers: list[int]
) -> dict[str, list[da.Array]]:
    """source -> one lazy ``(L, W)`` per state. Positional states come from ONE
    ``select_many`` call, the very call ``compare_states_plan`` makes for the same
    states, so a report that asks for both reads each stored array once."""
    if all(st.kind in POSITIONAL for st in states):
        both = select_many(run, sources, [state_position(run, st) for st in states], layers)
        return {
            s: [both[s][:, i] if both[s].ndim == 3 else both[s][i] for i in range(len(states))]
            for s in sources
        }
    return {s: [state_vectors(run, st, s, layers) for st in states] for s in sources}


def inter_run_plan(
    runs: Any,
    sources: Sequence[str] | None = None,
    layers: list[int] | None = None,
    states: Sequence[str] = ("initial", "final"),
    frac: float = M.DEFAULT_FRAC,
    magnitude: bool = False,
) -> Plan:
    runs = as_runs(runs)
    if layers is None:
        common = set(runs[0].layers) if runs else set()
        for r in runs[1:]:
            common &= set(r.layers)
        if runs and not common:
            raise SelectionError("the runs share no captured layer; pick runs of one model")
        layers = sorted(common)
    srcs = run_sources(runs[0], sources) if runs else []
    srcs = [s for s in srcs if all(s in r.sources for r in runs)] if sources is None else srcs
    parsed = [parse_state(s) for s in states]
    picked = [_run_states(r, srcs, parsed, layers) for r in runs]
    n = len(runs)
    n_pairs = n * (n - 1) // 2
    pieces: dict[Any, Any] = {}
    for k, state in enumerate(states):
        for source in srcs:
            widths = {p[source][k].shape[-1] for p in picked}
            if len(widths) > 1:
                raise SelectionError(
                    f"runs differ in {source} width ({sorted(widths)}): compare runs of one model"
                )
            if n < 2:
                continue
            v = da.stack([p[source][k] for p in picked])  # (runs, L, W)
            # Layer blocks small enough that one block's (3, pairs, layers) answer stays
            # under _CHUNK_BYTES: 1,000 runs are half a million pairs.
            per_layer = max(1, min(len(layers), _CHUNK_BYTES // (3 * 8 * n_pairs)))
            v = v.rechunk({1: per_layer}) if v.ndim == 3 else v
            pieces[(state, source)] = M.pairs_stack(v, frac, magnitude)
    ids = np.asarray([r.id for r in runs], dtype=object)
    iu, ju = np.triu_indices(n, 1)

    def finish(values: dict[Any, Any]) -> pd.DataFrame:
        frames = []
        for (state, source), val in values.items():  # val: (3, pairs, L)
            df = long_frame(
                val, [("pair", np.arange(len(iu))), ("layer", layers)], {"state": state, "source": source}
            )
            pair = df.pop("pair").to_numpy()
            df.insert(0, "run_b", ids[ju][pair])
            df.insert(0, "run_a", ids[iu][pair])
            frames.append(df)
        return concat_frames(frames, ["run_a", "run_b", "state", "source", "layer", *METRICS])

    return Plan(pieces, finish)


def inter_run(
    runs: Any,
    sources: Sequence[str] | None = None,
    layers: list[int] | None = None,
    states: Sequence[str] = ("initial", "final"),
    frac: float = M.DEFAULT_FRAC,
    magnitude: bool = False,
) -> pd.DataFrame:
    """Every pair of runs (in the given order, a before b), at each state: run_a, run_b,
    state, source, layer, metrics. Layers default to those every run captured."""
    return inter_run_plan(runs, sources, layers, states, frac, magnitude).compute()


# ---- snapshots vs references ---------------------------------------------------------
def snapshots_vs_references_plan(
    runs: Any,
    sources: Sequence[str] | None = None,
    layers: list[int] | None = None,
    frac: float = M.DEFAULT_FRAC,
    magnitude: bool = False,
) -> Plan:
    given = as_runs(runs)
    # Runs without snapshots or references have nothing to compare; skip them, but
    # a query where no run has any is a mistake worth reporting.
    usable = [r for r in given if r.snapshot_index and r.reference_labels]
    if given and not usable:
        raise SelectionError("no selected run has both conversation snapshots and reference states")
    pieces: dict[Any, Any] = {}
    labels: dict[Any, tuple[Any, str]] = {}
    for run in usable:
        for source in run_sources(run, sources):
            # One block each: these stacks are small, and one block avoids M x R tasks.
            s = snapshot_stack(run, source, layers).rechunk({0: -1})
            r = reference_stack(run, source, layers).rechunk({0: -1})
            pieces[(run.id, source)] = M.metrics_stack(s[:, None], r[None, :], frac, magnitude)
            labels[(run.id, source)] = (run, source)

    def finish(values: dict[Any, Any]) -> pd.DataFrame:
        frames = []
        for key, (run, source) in labels.items():
            lay = layers if layers is not None else run.layers
            axes = [
                ("message", [s["index"] for s in run.snapshot_index]),
                ("reference", run.reference_labels),
                ("layer", lay),
            ]
            df = long_frame(values[key], axes, {"run": run.id, "source": source})
            roles = {s["index"]: s["role"] for s in run.snapshot_index}
            df.insert(2, "role", df["message"].map(roles))
            frames.append(df)
        return concat_frames(frames, ["run", "message", "role", "reference", "source", "layer", *METRICS])

    return Plan(pieces, finish)


def snapshots_vs_references(
    runs: Any,
    sources: Sequence[str] | None = None,
    layers: list[int] | None = None,
    frac: float = M.DEFAULT_FRAC,
    magnitude: bool = False,
) -> pd.DataFrame:
    """Each conversation snapshot against each reference state: run, message, role,
    reference, source, layer, metrics."""
    return snapshots_vs_references_plan(runs, sources, layers, frac, magnitude).compute()


def role_averages(df: pd.DataFrame, roles: Sequence[str] = ("user", "assistant")) -> pd.DataFrame:
    """Mean metrics over the snapshots of each role (user vs assistant by default):
    run, role, reference, source, layer, metrics, n_messages."""
    keys = [c for c in ("run", "role", "reference", "source", "layer") if c in df.columns]
    sub = df[df["role"].isin(list(roles))]
    out = sub.groupby(keys, sort=False)[list(METRICS)].mean().reset_index()
    counts = sub.groupby(keys, sort=False)["message"].nunique().reset_index(name="n_messages")
    return out.merge(counts, on=keys)


# ---- the seed's summary CSV columns ----------------------------------------------------
SUMMARY_COLUMNS = (
    "mean_cosine", "std_cosine", "median_cosine", "min_cosine", "most_divergent_layer",
    "mean_MAE", "std_MAE", "median_MAE", "max_MAE_layer",
    "mean_overlap", "std_overlap", "median_overlap", "min_overlap", "min_overlap_layer",
)  # fmt: skip


def _layer_at(df: pd.DataFrame, keys: list[str], col: str, lowest: bool) -> pd.Series:
    # idxmin/idxmax skip NaN by filling; an all-NaN group has no such layer (<NA>).
    vals = df[col].fillna(np.inf if lowest else -np.inf)
    grouped = vals.groupby([df[k] for k in keys], sort=False)
    idx = grouped.idxmin() if lowest else grouped.idxmax()
    layer = pd.array(df.loc[idx.to_numpy(), "layer"].to_numpy(), dtype="Int64")
    has = df[col].notna().groupby([df[k] for k in keys], sort=False).any().to_numpy()
    layer[~has] = pd.NA
    return pd.Series(layer, index=idx.index)


def summarize(df: pd.DataFrame, by: Sequence[str] | None = None) -> pd.DataFrame:
    """Per-group statistics over layers, with the seed's summary CSV columns.

    ``by`` defaults to every column that is neither a metric nor ``layer`` (e.g. run and
    source for ``intra_run``). Standard deviations are population ones (ddof=0, as
    ``np.std``). ``most_divergent_layer`` is the layer of lowest cosine,
    ``max_MAE_layer`` of highest MAE, ``min_overlap_layer`` of lowest Jaccard overlap.
    """
    keys = list(by) if by is not None else [c for c in df.columns if c not in (*METRICS, "layer")]
    g = df.groupby(keys, sort=False)

    def stat(col: str, fn: Any) -> pd.Series:
        # NumPy's statistics, not pandas': a NaN layer (a zero vector's cosine) makes the
        # summary NaN instead of being averaged around without a word.
        return g[col].agg(lambda s: float(fn(s.to_numpy(dtype=np.float64))))

    out = pd.DataFrame(
        {
            "mean_cosine": stat("cosine", np.mean),
            "std_cosine": stat("cosine", np.std),
            "median_cosine": stat("cosine", np.median),
            "min_cosine": stat("cosine", np.min),
            "most_divergent_layer": _layer_at(df, keys, "cosine", lowest=True),
            "mean_MAE": stat("mae", np.mean),
            "std_MAE": stat("mae", np.std),
            "median_MAE": stat("mae", np.median),
            "max_MAE_layer": _layer_at(df, keys, "mae", lowest=False),
            "mean_overlap": stat("jaccard", np.mean),
            "std_overlap": stat("jaccard", np.std),
            "median_overlap": stat("jaccard", np.median),
            "min_overlap": stat("jaccard", np.min),
            "min_overlap_layer": _layer_at(df, keys, "jaccard", lowest=True),
        }
    )
    return out.reset_index()
