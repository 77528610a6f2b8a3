"""What the run viewer shows, as JSON-ready dicts, each read through the query layer.

>>> run = ActStore.open("stores/actstore.zarr").run("latest")        # doctest: +SKIP
>>> heatmap(run, "hidden_out", layer=10, step=0)["z"][0][:3]           # doctest: +SKIP

Every function reads only what its answer needs (one layer x one step's positions for a
heatmap, one neuron column for a trajectory); the server (``view.server``) calls them per
request, so a viewer over a large store stays as fast as its smallest question.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from actstore import naming
from actstore.colours import DIVERGING_SCALE
from actstore.errors import SelectionError
from actstore.query import slices
from actstore.query.analyses import neuron_trajectory, residual_decomposition
from actstore.query.states import select, state_position, step_index, vector_sources
from actstore.query.tokens import display_position_tokens, display_token

_DIGITS = 5  # significant digits sent to the browser: float16 values carry about 3.3
# Largest heatmap sent as is, per side (the page may ask for up to MAX_BINS): the chart is
# ~600 px wide, and a 4k-token prefill's attention (16M cells, ~160 MB of JSON) arrives as
# 512 x 512 means of 8 x 8 blocks, pooled while read (query.slices), ~2.5 MB of JSON.
MAX_ROWS = MAX_COLS = slices.DEFAULT_BINS
MAX_BINS = 2048


def _num(x: Any) -> float | None:
    """A JSON number (None for NaN/inf), rounded to what a chart can show."""
    v = float(x)
    if not math.isfinite(v):
        return None
    return float(f"{v:.{_DIGITS}g}")


def _nums(a: np.ndarray) -> list[Any]:
    """Nested lists of numbers rounded like :func:`_num`, None for NaN (vectorised: a
    prefill heatmap is ~350k values)."""
    a = np.asarray(a, dtype=np.float64)
    finite = np.isfinite(a)
    mag = np.where(finite & (a != 0), np.abs(a), 1.0)
    scale = 10.0 ** (_DIGITS - 1 - np.floor(np.log10(mag)))
    out = (np.round(np.where(finite, a, 0.0) * scale) / scale).astype(object)
    out[~finite] = None
    return list(out.tolist())


def runs(store: Any) -> list[dict[str, Any]]:
    """The store's runs, newest first: id, scenario, model, created_at, steps."""
    rows = [
        {k: e.get(k) for k in ("id", "scenario", "model", "created_at", "n_steps", "n_positions")}
        for e in store.catalog_entries()
    ]
    return rows[::-1]


def summary(run: Any) -> dict[str, Any]:
    """Everything the page needs before drawing: sources and widths, layers, tokens per
    position, and each step's positions, chosen token and top-k (no array read but the
    steps record)."""
    sources = vector_sources(run)
    heads = None
    if "attn_weights" in run.sources:
        sources.append("attn_weights")
        heads = int(run.array("attn_weights").shape[1])
    widths = {s: int(run.array(s).shape[-1]) for s in sources if s != "attn_weights"}
    for s in naming.GLOBAL_SOURCES:
        if s in run.sources:
            sources.append(s)
            widths[s] = int(run.array(s).shape[-1])
    tokens = display_position_tokens(run)
    steps = []
    for st in run.steps:
        pos = run.step_positions(int(st["step"]))
        steps.append({
            "step": int(st["step"]), "kind": st.get("kind", ""), "positions": [pos.start, pos.stop],
            "generated": display_token(st.get("generated_token") or ""),
            "top_k": [{"token": display_token(t["token"]), "p": _num(math.exp(t["logprob"]))}
                      for t in st.get("top_k") or []],
        })  # fmt: skip
    return {
        "id": run.id, "scenario": run.scenario.get("name"), "model": run.meta["model"]["id"],
        "created_at": run.meta.get("created_at"), "prompt_len": run.prompt_len,
        "n_positions": run.n_positions, "layers": list(run.layers), "sources": sources,
        "widths": widths, "heads": heads, "tokens": tokens, "steps": steps,
        "generated_text": run.meta.get("generated_text", ""),
        "has_decomposition": all(s in run.sources for s in ("hidden_in", "attn_out", "mlp_down_out")),
        "has_lens": "hidden_out" in run.sources,
    }  # fmt: skip


def heatmap(
    run: Any, source: str, layer: int | None, step: int, head: int | None = None, reduce: str = "signed",
    bins: int | None = None,
) -> dict[str, Any]:  # fmt: skip
    """One layer x one step of a source, as ``actstore heatmap`` draws it: positions x
    channels (a decode step's single vector as a near-square grid), or for attention the
    step's query rows x every key so far (mean over heads unless ``head``). At most
    ``bins`` (default ``MAX_ROWS`` x ``MAX_COLS``) cells per side: a larger slice arrives
    as means of ``block`` = [rows, cols] blocks (``query.slices``)."""
    if bins is not None and not 1 <= bins <= MAX_BINS:
        raise SelectionError(f"bins must be 1..{MAX_BINS}, not {bins}")
    if source != "attn_weights":
        head = None  # heads are attention's only
    img = slices.read_slice(run, source, layer, step, head, reduce, bins or MAX_ROWS, bins or MAX_COLS)
    step = step_index(run, step)
    layer = None if source in naming.GLOBAL_SOURCES else layer
    fr, fc = img.block
    pos = run.step_positions(step)
    tokens = display_position_tokens(run)
    rows = list(range(pos.start, pos.stop, fr))
    out: dict[str, Any] = {
        "source": source, "layer": layer, "step": step, "head": head, "reduce": reduce,
        "z": _nums(img.data), "xlabel": img.xlabel, "ylabel": img.ylabel, "reshaped": img.reshaped,
        "rows": rows, "row_tokens": [tokens[p] for p in rows],
        "cols": list(range(0, img.shape[1], fc)), "block": [fr, fc], "shape": list(img.shape),
    }  # fmt: skip
    # positive red, negative blue (Activation Lab's RdBu_r) when the sign is kept
    signed = reduce == "signed" and source != "attn_weights"
    out["colorscale"] = DIVERGING_SCALE if signed else "Viridis"
    out["zmid"] = 0 if signed else None
    if img.reshaped:
        out["grid"] = list(slices.grid_shape(int(run.array(source).shape[-1])))
    if source == "attn_weights":
        out["key_tokens"] = tokens[: pos.stop]
    return out


def top_neurons(run: Any, source: str, layer: int | None, step: int, k: int = 12) -> dict[str, Any]:
    """The ``k`` channels of largest magnitude at the step's last position."""
    if source == "attn_weights":  # the rest of the source checks are select's
        raise SelectionError("attention weights have no neurons; pick a vector source")
    step = step_index(run, step)
    position = state_position(run, f"step:{step}")
    x = select(run, source, [position], None if layer is None or source in naming.GLOBAL_SOURCES else [layer])
    vec = np.asarray(x.compute(), dtype=np.float64).reshape(-1)
    order = np.argsort(-np.abs(vec), kind="stable")[:k]
    return {"source": source, "layer": layer, "step": step, "position": position,
            "neurons": [{"index": int(i), "value": _num(vec[i])} for i in order]}  # fmt: skip


def trajectory(run: Any, source: str, layer: int, neuron: int, over: str = "steps") -> dict[str, Any]:
    """One neuron over the run (``query.analyses.neuron_trajectory``)."""
    if source in naming.GLOBAL_SOURCES or source == "attn_weights":  # the rest: select's checks
        raise SelectionError(f"a neuron trajectory needs a per-layer vector source, not {source!r}")
    df = neuron_trajectory(run, layer, neuron, source, over)
    return {"source": source, "layer": layer, "neuron": neuron, "over": over,
            "x": df["step" if over == "steps" else "position"].tolist(),
            "token": [display_token(t) if isinstance(t, str) else "" for t in df["token"]],
            "value": [_num(v) for v in df["value"]]}  # fmt: skip


def decomposition(run: Any, step: int) -> dict[str, Any]:
    """Per layer at the step's last position: norms of the residual stream and of the two
    sub-layer outputs, and their cosine with the block output
    (``query.analyses.residual_decomposition``)."""
    step = step_index(run, step)
    df = residual_decomposition(run, steps=[step])
    cols = [c for c in df.columns if c.startswith(("norm_", "cos_"))]
    return {"step": step, "layer": df["layer"].tolist(),
            **{c: [_num(v) for v in df[c]] for c in cols}}  # fmt: skip


def logit_lens_step(run: Any, loaded: Any, step: int, top_k: int = 5) -> dict[str, Any]:
    """What each layer's residual stream would predict at the step's last position
    (``query.logit_lens.logit_lens``): per layer the argmax token, its probability,
    KL(layer || final) (Activation Lab's direction) and the top ``top_k``."""
    from actstore.query.logit_lens import logit_lens

    step = step_index(run, step)
    df = logit_lens(run, loaded, steps=[step], top_k=top_k)
    return {"step": step, "position": int(df["position"].iloc[0]), "layer": df["layer"].tolist(),
            "argmax": [display_token(t) for t in df["argmax_token"]],
            "p": [_num(math.exp(v)) for v in df["argmax_logprob"]],
            "kl": [_num(v) for v in df["kl_from_final"]],
            "top": [[{"token": display_token(t["token"]), "p": _num(math.exp(t["logprob"]))} for t in top]
                    for top in df["top"]]}  # fmt: skip
