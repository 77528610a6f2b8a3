"""The seed's interpretability analyses as lazy queries over one run.

>>> from actstore.store.store import ActStore                              # doctest: +SKIP
>>> run = ActStore.open("stores/actstore.zarr").run("latest")              # doctest: +SKIP
>>> cross_layer_matrix(run)                  # L x L cosine of final hidden_out   # doctest: +SKIP
>>> neuron_trajectory(run, layer=20, neuron=7)                              # doctest: +SKIP
>>> residual_decomposition(run, steps=[0, -1])                              # doctest: +SKIP
>>> layer_discrimination(run).groupby("source").head(1)   # best layer per source  # doctest: +SKIP

Each analysis selects vectors with ``states.select`` (one Zarr read per array), reduces
them with ``metrics`` into a small lazy array, computes once and lays the answer out as
a long DataFrame. Nothing is read before that single compute.
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
from actstore.query.compare import run_sources
from actstore.query.plan import Plan
from actstore.query.states import (
    check_layer_source,
    reference_stack,
    select,
    select_many,
    snapshot_stack,
    state_vectors,
    step_index,
    step_last_positions,
)


def _layers(run: Any, layers: list[int] | None) -> list[int]:
    run.layer_index(layers)  # validates
    return list(run.layers) if layers is None else list(layers)


# ---- cross-layer similarity ---------------------------------------------------------------
def cross_layer_plan(
    run: Any, source: str = "hidden_out", state: str = "final", layers: list[int] | None = None
) -> Plan:
    check_layer_source(source)
    lay = _layers(run, layers)
    v = state_vectors(run, state, source, layers)  # (L, W)
    piece = M.cosine(v[:, None], v[None, :])

    def finish(values: dict[Any, Any]) -> pd.DataFrame:
        mat = values["cos"]
        a, b = np.meshgrid(np.arange(len(lay)), np.arange(len(lay)), indexing="ij")
        la = np.asarray(lay)
        return pd.DataFrame(
            {
                "run": run.id,
                "source": source,
                "state": state,
                "layer_a": la[a.ravel()],
                "layer_b": la[b.ravel()],
                "cosine": mat.ravel(),
            }  # fmt: skip
        )

    return Plan({"cos": piece}, finish)


def cross_layer(
    run: Any, source: str = "hidden_out", state: str = "final", layers: list[int] | None = None
) -> pd.DataFrame:
    """Cosine between every pair of layers' vectors at one state (the seed uses
    hidden_out at the last position): run, source, state, layer_a, layer_b, cosine."""
    return cross_layer_plan(run, source, state, layers).compute()


def cross_layer_matrix(run: Any, **kwargs: Any) -> pd.DataFrame:
    """The same as an L x L DataFrame indexed by real layer numbers."""
    df = cross_layer(run, **kwargs)
    return df.pivot(index="layer_a", columns="layer_b", values="cosine")


# ---- neuron trajectory ----------------------------------------------------------------
def position_tokens(run: Any) -> list[str | None]:
    """Token string at each position, from metadata (no array read)."""
    prompt = list(run.meta.get("prompt_tokens") or [None] * run.prompt_len)
    fed = [(st.get("input_tokens") or [None])[0] for st in run.steps[1:]]
    return (prompt + fed + [None] * run.n_positions)[: run.n_positions]


def neuron_trajectory(
    run: Any, layer: int, neuron: int, source: str = "hidden_out", over: str = "steps"
) -> pd.DataFrame:
    """One neuron's value over a run: at the last position of every forward pass
    (``over="steps"``, as the seed does) or at every position (``over="positions"``).
    Columns: run, source, layer, neuron, step, position, token, value (and, over steps,
    the token the step generated)."""
    if over not in ("steps", "positions"):
        raise SelectionError(f"over must be 'steps' or 'positions', not {over!r}")
    check_layer_source(source)
    positions = step_last_positions(run) if over == "steps" else list(range(run.n_positions))
    x = select(run, source, positions, [layer])
    if not 0 <= neuron < x.shape[-1]:
        raise SelectionError(f"{source} has {x.shape[-1]} neurons (0..{x.shape[-1] - 1}), not {neuron}")
    (values,) = da.compute(x[0, :, neuron].astype(np.float64))
    tokens = position_tokens(run)
    pos_steps = np.zeros(run.n_positions, dtype=np.int64)
    pos_steps[run.prompt_len :] = np.arange(1, run.n_positions - run.prompt_len + 1)
    df = pd.DataFrame(
        {
            "run": run.id,
            "source": source,
            "layer": layer,
            "neuron": neuron,
            "step": pos_steps[positions],
            "position": positions,
            "token": [tokens[p] for p in positions],
            "value": values,
        }  # fmt: skip
    )
    if over == "steps":
        df["generated_token"] = [st.get("generated_token") for st in run.steps]
    return df


# ---- residual-stream decomposition -------------------------------------------------------
DECOMPOSITION_SOURCES = ("hidden_in", "attn_out", "mlp_down_out", "hidden_out")


def residual_decomposition(
    run: Any, steps: list[int] | None = None, layers: list[int] | None = None
) -> pd.DataFrame:
    """Per layer and step, at the step's last position: the norms of hidden_in,
    attn_out, mlp_down_out and hidden_out, and the cosine of attn_out and of
    mlp_down_out with hidden_out (which sub-layer moves the stream where it ends up).
    Columns: run, step, position, layer, norm_<source> x4, cos_attn_out, cos_mlp_down_out."""
    lay = _layers(run, layers)
    step_ids = [step_index(run, s) for s in (steps if steps is not None else range(run.n_steps))]
    positions = step_last_positions(run, step_ids)
    x = select_many(run, list(DECOMPOSITION_SOURCES), positions, layers)  # each (L, n, W)
    parts = [M.norm(x[s]) for s in DECOMPOSITION_SOURCES]
    parts += [M.cosine(x["attn_out"], x["hidden_out"]), M.cosine(x["mlp_down_out"], x["hidden_out"])]
    (vals,) = da.compute(da.stack(parts))  # (6, L, n)
    li, si = np.meshgrid(np.arange(len(lay)), np.arange(len(step_ids)), indexing="ij")
    cols = [f"norm_{s}" for s in DECOMPOSITION_SOURCES] + ["cos_attn_out", "cos_mlp_down_out"]
    df = pd.DataFrame(
        {
            "run": run.id,
            "step": np.asarray(step_ids)[si.ravel()],
            "position": np.asarray(positions)[si.ravel()],
            "layer": np.asarray(lay)[li.ravel()],
            **{c: vals[i].ravel() for i, c in enumerate(cols)},
        }  # fmt: skip
    )
    return df.sort_values(["step", "layer"], kind="stable", ignore_index=True)


# ---- which layer tells the references apart --------------------------------------------
def layer_discrimination(
    run: Any,
    sources: Sequence[str] | None = None,
    layers: list[int] | None = None,
    rank_by: str = "separation",
) -> pd.DataFrame:
    """Rank layers by how well they separate the run's reference states.

    Two scores per (source, layer), both on cosine distance ``d = 1 - cos``, which is
    blind to the norm growth of the residual stream across layers:

    * ``separation``: mean d over all pairs of reference vectors. 0 means every
      reference points the same way at that layer; it is the direct answer to "where
      do the reference states differ most". ``min_separation`` is the closest pair's d
      (the hardest two references to tell apart).
    * ``fisher`` (needs conversation snapshots): a Fisher-like between/within ratio.
      Each snapshot is labelled by its closest reference (its class centre);
      within = mean d from each snapshot to that closest reference, between =
      ``separation``. Large when references are far apart relative to how tightly the
      conversation's states sit around them. NaN without snapshots.

    ``rank`` is 1 for the most discriminative layer of each source under ``rank_by``
    (``separation`` or ``fisher``); rows come sorted by source, then rank.
    """
    if rank_by not in ("separation", "fisher"):
        raise SelectionError(f"rank_by must be 'separation' or 'fisher', not {rank_by!r}")
    labels = run.reference_labels
    if len(labels) < 2:
        raise SelectionError(
            f"run {run.id} has {len(labels)} reference state(s); discrimination needs two or more"
        )
    lay = _layers(run, layers)
    has_snaps = bool(run.snapshot_index)
    pieces: dict[Any, Any] = {}
    srcs = run_sources(run, sources)
    for source in srcs:
        if source not in naming.RESIDUAL_SOURCES:
            raise SelectionError(f"references keep only {', '.join(naming.RESIDUAL_SOURCES)}, not {source!r}")
        r = reference_stack(run, source, layers).rechunk({0: -1})
        d_ref = 1 - M.cosine(r[:, None], r[None, :])  # (R, R, L)
        upper = np.triu(np.ones((len(labels), len(labels)), dtype=bool), 1)[..., None]  # pairs i < j
        out = [
            (d_ref * upper).sum(axis=(0, 1)) / upper.sum(),
            np.where(upper, d_ref, np.inf).min(axis=(0, 1)),
        ]
        if has_snaps:
            s = snapshot_stack(run, source, layers).rechunk({0: -1})
            within = (1 - M.cosine(s[:, None], r[None, :])).min(axis=1).mean(axis=0)  # (L,)
            out.append(within)
        pieces[source] = da.stack(out)
    (vals,) = da.compute(pieces)
    frames = []
    for source in srcs:
        v = vals[source]
        sep, min_sep = v[0], v[1]
        within = v[2] if has_snaps else np.full(len(lay), np.nan)
        fisher = sep / np.where(within == 0, np.nan, within)
        frames.append(pd.DataFrame({"run": run.id, "source": source, "layer": lay, "separation": sep,
                                    "min_separation": min_sep, "within": within, "fisher": fisher}))  # fmt: skip
    df = pd.concat(frames, ignore_index=True)
    df["rank"] = df.groupby("source")[rank_by].rank(ascending=False, method="first").astype("Int64")
    return df.sort_values(["source", "rank"], kind="stable", ignore_index=True)
