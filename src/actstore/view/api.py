"""What the run viewer shows, as JSON-ready dicts, each read through the query layer.

>>> run = ActStore.open("stores/actstore.zarr").run("latest")        # doctest: +SKIP
>>> heatmap(run, "hidden_out", layer=10, step=0)["z"][0][:3]           # doctest: +SKIP

Every function reads only what its answer needs (one layer x one step's positions for a
heatmap, binned while read by ``query.slices``; one neuron column for a trajectory); the
server (``view.server``, through ``view.app``) calls them per request, so a viewer over
a large store stays as fast as its smallest question. The lab's analyses (``pair``,
``group``, ``depth``, ``next_token``) are thin: the ``query.pairs``, ``query.groups`` and
``query.depth`` functions, their tables as JSON columns (:func:`frame`), their maps
binned like heatmaps; a request whose arrays would exceed ``MAX_REQUEST_BYTES`` is
refused with a one-line error naming the command-line query instead.
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
        "states": states(run),
    }  # fmt: skip


def states(run: Any) -> list[dict[str, Any]]:
    """Every state of the run a comparison can pick (``query.states`` names), with a
    label for the picker and whether it is a full pass (depth views need one)."""
    try:
        full_kinds = {p.kind for p in run.passes}
    except SelectionError:  # a reference run that is gone: its snapshots still read
        full_kinds = set()
    out = [{"state": "initial", "label": "initial (last prompt token)", "full": True},
           {"state": "final", "label": "final (last step)", "full": True}]  # fmt: skip
    for st in run.steps:
        k = int(st["step"])
        chose = display_token(st.get("generated_token") or "")
        out.append({"state": f"step:{k}", "label": f"step {k} (chose {chose!r})", "full": True})
    for snap in run.snapshot_index:
        key = "generated" if snap.get("generated") else snap["index"]
        out.append({"state": f"snapshot:{key}", "label": f"snapshot {key} ({snap.get('role', '')})",
                    "full": "snapshot" in full_kinds})  # fmt: skip
    for label in run.reference_labels:
        out.append({"state": f"reference:{label}", "label": f"reference {label}", "full": "reference" in full_kinds})
    return out


def heatmap(
    run: Any, source: str, layer: int | None, step: int, head: int | None = None, reduce: str = "signed",
    bins: int | None = None,
) -> dict[str, Any]:  # fmt: skip
    """One layer x one step of a source, as ``actstore heatmap`` draws it: positions x
    channels (a decode step's single vector as a near-square grid), or for attention the
    step's query rows x every key so far (mean over heads unless ``head``). At most
    ``bins`` (default ``MAX_ROWS`` x ``MAX_COLS``) cells per side: a larger slice arrives
    as means of ``block`` = [rows, cols] blocks (``query.slices``)."""
    _check_bins(bins)
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


def logit_lens_step(run: Any, loaded: Any, step: int, top_k: int = 5, position: int = -1) -> dict[str, Any]:
    """What each layer's residual stream would predict at one position the step
    computed (``position``: an index into them, -1 the last; ``query.logit_lens``): per
    layer the argmax token, its probability, KL(layer || final) (Activation Lab's
    direction) and the top ``top_k``."""
    from actstore.query.logit_lens import logit_lens

    step = step_index(run, step)
    if not 1 <= top_k <= 50:
        raise SelectionError(f"top_k must be 1..50, not {top_k}")
    df = logit_lens(run, loaded, steps=[step], top_k=top_k, position=position)
    return {"step": step, "position": int(df["position"].iloc[0]), "layer": df["layer"].tolist(),
            "argmax": [display_token(t) for t in df["argmax_token"]],
            "p": [_num(math.exp(v)) for v in df["argmax_logprob"]],
            "kl": [_num(v) for v in df["kl_from_final"]],
            "top": [[{"token": display_token(t["token"]), "p": _num(math.exp(t["logprob"]))} for t in top]
                    for top in df["top"]]}  # fmt: skip


# ---- the lab's analyses (query.pairs, query.groups, query.depth) ---------------------------
# What one request may hold in memory at once, as float64 (the largest array an analysis
# computes on); more is refused with a one-line 400 naming the command-line query, which
# has no such limit. With the server's few slots this bounds the viewer's memory.
MAX_REQUEST_BYTES = 256 * 2**20
MAX_GROUP = 64  # states in one group request
PAIR_WHAT = ("vectors", "summary", "passes", "attention", "scores", "qkv")
DEPTH_WHAT = ("convergence", "effective-depth", "entropy", "head-entropy", "scores", "qkv-last")


def frame(df: Any) -> dict[str, list[Any]]:
    """A DataFrame as JSON columns: column name -> values (floats rounded like the
    charts', NaN and <NA> as null)."""
    import pandas as pd

    out: dict[str, list[Any]] = {}
    for name in df.columns:
        col = df[name]
        if pd.api.types.is_bool_dtype(col):
            out[str(name)] = [bool(v) for v in col]
        elif pd.api.types.is_integer_dtype(col):
            out[str(name)] = [None if pd.isna(v) else int(v) for v in col]
        elif pd.api.types.is_float_dtype(col):
            out[str(name)] = _nums(col.to_numpy(dtype=np.float64, na_value=np.nan))
        else:
            out[str(name)] = [None if v is None or (isinstance(v, float) and math.isnan(v)) else str(v) for v in col]
    return out


def _budget(nbytes: float, what: str, command: str) -> None:
    if nbytes > MAX_REQUEST_BYTES:
        raise SelectionError(
            f"{what} needs about {nbytes / 2**20:.0f} MiB in memory; the viewer computes at most "
            f"{MAX_REQUEST_BYTES / 2**20:.0f} MiB per request: pick fewer layers or a shorter pass, or run {command}"
        )


def _pass_extent(sel: Any) -> tuple[int, int]:
    """(rows, keys) of the state's full pass: a step's positions and every key up to its
    last; a snapshot's or reference's tokens, twice."""
    from actstore.query.selection import pass_key, pass_tokens

    kind, key = pass_key(sel)
    if kind == "step":
        pos = sel.run.step_positions(int(key))
        return len(pos), pos.stop
    n = len(pass_tokens(sel))
    return n, n


def _heads(run: Any) -> int:
    from actstore.query.depth import head_layout

    if "attn_weights" in run.sources:
        return int(run.array("attn_weights").shape[1])
    return head_layout(run)[0]


def _map_pair(a: Any, b: Any, kind: str, layer: int | None, head: int | None,
              layers: list[int] | None) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Both states' maps (``query.pairs.map_array``), cut to their common top-left block
    (as ``query.pairs.pair_maps`` cuts them)."""
    from actstore.query.pairs import map_array

    if kind != "qkv":
        for s in (a, b):
            rows, keys = _pass_extent(s)
            _budget(2.0 * _heads(s.run) * rows * keys * 8, f"a {kind} map of {s.label}",
                    f"actstore query pair --what {kind}")  # fmt: skip
    ma, mb = map_array(a, kind, layer, head, layers), map_array(b, kind, layer, head, layers)
    r, c = min(ma.shape[0], mb.shape[0]), min(ma.shape[1], mb.shape[1])
    return ma[:r, :c], mb[:r, :c]


def state_map(sel: Any, source: str, layer: int | None, head: int | None = None,
              bins: int | None = None) -> dict[str, Any]:  # fmt: skip
    """One state's picture for a side-by-side column, from any run: the attention map of
    ``layer`` over its full pass (``query.pairs.map_array``: mean over heads unless
    ``head``), or a vector source's tokens x channels (``query.pairs.vector_map``),
    binned like a heatmap."""
    from actstore.query.pairs import map_array, vector_map

    _check_bins(bins)
    rows, keys = _pass_extent(sel)
    if source == "attn_weights":
        _budget(2.0 * _heads(sel.run) * rows * keys * 8, f"an attention map of {sel.label}",
                "actstore query pair --what attention")  # fmt: skip
        m = map_array(sel, "attention", layer, head)
    else:
        width = int(sel.run.array(source).shape[-1])
        _budget(2.0 * rows * width * 8, f"{source} over {sel.label}", "actstore heatmap")
        m, head = vector_map(sel, source, layer), None
    layer = None if source in naming.GLOBAL_SOURCES else layer
    out = {"state": sel.label, "source": source, "layer": layer, "head": head}
    out |= _binned_maps({"z": m}, list(range(m.shape[0])), bins)
    attention = source == "attn_weights"  # weights are >= 0; activations signed, red positive
    return out | {"colorscale": "Viridis" if attention else DIVERGING_SCALE, "zmid": None if attention else 0}


def _binned_maps(maps: dict[str, np.ndarray], row_labels: list[int], bins: int | None) -> dict[str, Any]:
    """Equal-shaped maps binned like a heatmap: ``maps`` (name -> rows of numbers),
    ``shape`` (unbinned), ``block``, ``rows`` (each bin's first row label), ``cols``, and the diverging
    ``colorscale`` signed maps are drawn with (positive red)."""
    out: dict[str, Any] = {}
    fr = fc = 1
    shape = (0, 0)
    for name, m in maps.items():
        data, fr, fc = slices.block_means(m, bins or MAX_ROWS, bins or MAX_COLS)
        out[name] = _nums(data)
        shape = m.shape
    return {"maps": out, "shape": list(shape), "block": [fr, fc], "rows": row_labels[::fr],
            "cols": list(range(0, shape[1], fc)), "colorscale": DIVERGING_SCALE}  # fmt: skip


def pair(
    a: Any, b: Any, what: str = "vectors", sources: list[str] | None = None, layers: list[int] | None = None,
    frac: float = 0.01, magnitude: bool = False, layer: int | None = None, head: int | None = None,
    bins: int | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Two states (``query.selection.Selected``) compared, as ``actstore query pair``:
    ``vectors`` (per-layer metrics), ``summary`` (per source), ``passes`` (full passes
    token by token) as ``table`` columns; ``attention``, ``scores``, ``qkv`` as ``maps``
    (a, b, abs_diff, sq_err, hadamard, ratio: ``query.pairs.diff_maps``), binned like a
    heatmap."""
    from actstore.query import pairs
    from actstore.query.selection import common_layers

    if what not in PAIR_WHAT:
        raise SelectionError(f"what must be one of {', '.join(PAIR_WHAT)}, not {what!r}")
    _check_bins(bins)
    out: dict[str, Any] = {"what": what, "a": a.label, "b": b.label}
    if what in ("vectors", "summary"):
        res = pairs.pair_metrics(a, b, sources, layers, frac, magnitude)
        return out | {"table": frame(res.per_layer if what == "vectors" else res.summary)}
    if what == "passes":
        # No budget: the comparison streams through Dask a block of positions at a time and
        # keeps (3, L, T) numbers per source. Two 612-token snapshots over 30 layers and 4
        # sources (1.3 GB as float64 if held whole) peaked 61 MiB above the process's start.
        return out | {"table": frame(pairs.full_pair(a, b, sources, layers, frac, magnitude))}
    lay: list[int] | None = common_layers([a, b], layers) if what == "qkv" else None
    ma, mb = _map_pair(a, b, what, layer, head, lay)
    labels = list(lay) if lay is not None else list(range(ma.shape[0]))
    return out | {"layer": layer, "head": head} | _binned_maps(pairs.diff_maps(ma, mb), labels, bins)


def group(
    selected: list[Any], what: str = "centroid", sources: list[str] | None = None,
    layers: list[int] | None = None, frac: float = 0.01, magnitude: bool = False, components: int = 2,
) -> dict[str, Any]:  # fmt: skip
    """Two or more states as a group, as ``actstore query group --what``
    (``query.groups.group_table``): one table."""
    from actstore.query import groups

    if len(selected) > MAX_GROUP:
        raise SelectionError(f"a group in the viewer holds at most {MAX_GROUP} states, not {len(selected)}")
    if not 1 <= components <= 16:
        raise SelectionError(f"components must be 1..16, not {components}")
    if what not in groups.ANALYSES:
        raise SelectionError(f"what must be one of {', '.join(groups.ANALYSES)}, not {what!r}")
    g = groups.group_vectors(selected, sources, layers)
    return {"what": what, "states": g.labels, "layers": g.layers,
            "table": frame(groups.group_table(g, what, frac, magnitude, components))}  # fmt: skip


def depth(
    sel: Any, what: str = "convergence", source: str = "hidden_out", layers: list[int] | None = None,
    layer: int | None = None, head: int | None = None, threshold: float = 0.99, bins: int | None = None,
) -> dict[str, Any]:  # fmt: skip
    """One state's full pass through depth, as ``actstore query depth --what``: a
    ``table`` (convergence, effective-depth, entropy, head-entropy, qkv-last) or, for
    ``scores``, the (queries x keys) map of q.k/sqrt(d) binned like a heatmap."""
    from actstore.query import depth as D
    from actstore.query.selection import vector_source

    if what not in DEPTH_WHAT:
        raise SelectionError(f"what must be one of {', '.join(DEPTH_WHAT)}, not {what!r}")
    _check_bins(bins)
    run = sel.run
    n_layers = len(run.layer_index(layers))
    rows, keys = _pass_extent(sel) if what != "qkv-last" else (1, 1)
    command = f"actstore query depth --what {what}"
    out: dict[str, Any] = {"what": what, "state": sel.label}
    if what in ("convergence", "effective-depth"):
        width = int(run.array(vector_source(source)).shape[-1])
        _budget(3.0 * n_layers * rows * width * 8, f"convergence over {sel.label}", command)
        conv = D.convergence(sel, source, layers)
        return out | {"table": frame(conv if what == "convergence" else D.effective_depth(conv, threshold))}
    if what in ("entropy", "head-entropy"):
        if D.stored_row_entropy(sel) is None:  # computed from the weights, one layer at a time
            _budget(3.0 * _heads(run) * rows * keys * 8, f"attention entropy over {sel.label}", command)
        return out | {"table": frame(D.attention_entropy(sel, layers, per_head=what == "head-entropy"))}
    if what == "qkv-last":
        lay = [run.layers[i] for i in run.layer_index(layers)]
        return out | {"layers": lay} | _binned_maps({"qkv_last": D.qkv_last_array(sel, layers)}, lay, bins)
    _budget(2.0 * _heads(run) * rows * keys * 8, f"q.k scores over {sel.label}", command)
    if layer is None:
        return out | _stacked_scores(sel, [run.layers[i] for i in run.layer_index(layers)], bins)
    if head is None:  # the mean over heads, without a map per head
        ((_, m),) = D.mean_score_maps(sel, [layer])
    else:
        mats = D.qk_score_array(sel, layer)
        if not 0 <= head < mats.shape[0]:
            raise SelectionError(f"layer {layer} has heads 0..{mats.shape[0] - 1}, not {head}")
        m = mats[head]
    return out | {"layer": layer, "head": head} | _binned_maps({"score": m}, list(range(m.shape[0])), bins)


def _stacked_scores(sel: Any, layers: list[int], bins: int | None) -> dict[str, Any]:
    """Every layer's mean-over-heads q.k/sqrt(d) map, one under the other in one picture:
    each layer binned to its share of the rows (``query.depth.mean_score_bins``)."""
    from actstore.query import depth as D

    rows_each = max(4, (bins or MAX_ROWS) // max(1, len(layers)))
    parts: list[np.ndarray] = []
    starts: list[int] = []
    shape = _pass_extent(sel)
    blocks = [(1, 1)]
    for _, data, fr, fc in D.mean_score_bins(sel, layers, rows_each, bins or MAX_COLS):
        starts.append(sum(p.shape[0] for p in parts))
        parts.append(data)
        blocks.append((fr, fc))  # the same for every layer: one pass's rows and keys
    fr, fc = blocks[-1]
    stacked = np.concatenate(parts, axis=0)
    return {"layer": None, "layers": layers, "layer_starts": starts, "maps": {"score": _nums(stacked)},
            "shape": [len(layers), *shape], "block": [fr, fc], "cols": list(range(0, shape[1], fc)),
            "colorscale": DIVERGING_SCALE}  # fmt: skip


def cross_layer(sel: Any, source: str = "hidden_out", layers: list[int] | None = None) -> dict[str, Any]:
    """Cosine between every pair of layers' vectors of one state (``actstore query
    cross-layer``): an L x L map."""
    from actstore.query.analyses import cross_layer_matrix

    mat = cross_layer_matrix(sel.run, source=source, state=str(sel.state), layers=layers)
    return {"state": sel.label, "source": source, "layers": [int(c) for c in mat.columns],
            "z": _nums(mat.to_numpy(dtype=np.float64))}


def next_token(run: Any, steps: list[int] | None = None) -> dict[str, Any]:
    """Per step: next-token entropy, exp(entropy), top-1 probability and token, from the
    stored logits (``query.depth.next_token``)."""
    from actstore.query.depth import next_token as stats

    if "logits" in run.sources:
        n = run.n_steps if steps is None else len(steps)
        _budget(3.0 * n * int(run.array("logits").shape[-1]) * 8, "next-token statistics of these steps",
                "actstore query next-token")  # fmt: skip
    return {"run": run.id, "table": frame(stats(run, steps))}


def _check_bins(bins: int | None) -> None:
    if bins is not None and not 1 <= bins <= MAX_BINS:
        raise SelectionError(f"bins must be 1..{MAX_BINS}, not {bins}")
