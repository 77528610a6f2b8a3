"""How a state is computed through depth: one full pass (or one run) at a time.

>>> from actstore.store.store import ActStore                              # doctest: +SKIP
>>> [sel] = resolve(ActStore.open("stores/actstore.zarr"), ["step:0"])    # doctest: +SKIP
>>> convergence(sel)              # adjacent-layer cosine, relative update  # doctest: +SKIP
>>> effective_depth(convergence(sel))                                      # doctest: +SKIP
>>> attention_entropy(sel, per_head=True)                                  # doctest: +SKIP
>>> qk_scores(sel, layer=3)       # raw q.k/sqrt(d), GQA-aware              # doctest: +SKIP
>>> qkv_last(sel)                 # Activation Lab's per-layer (q.k/sqrt(m)) v  # doctest: +SKIP
>>> next_token(sel.run)           # entropy, exp(entropy), top-1 per step  # doctest: +SKIP

Each function reads the arrays it needs lazily (``selection.full_pass``: a step's
positions, or a stored full snapshot/reference pass), computes once, and does the
arithmetic in NumPy float64 (``qkv_last`` in float32, as Activation Lab). The
definitions follow Activation Lab's viewer server (``viewer_server/compute.py``) where it
has one; each function says where it departs from it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import dask
import numpy as np
import pandas as pd

from actstore import naming
from actstore.errors import SelectionError
from actstore.query import metrics as M
from actstore.query.selection import Selected, full_pass, vector_source
from actstore.query.slices import bin_factors
from actstore.query.states import POSITIONAL, state_vectors, step_last_positions
from actstore.store import layout

CONVERGED = 0.99  # Activation Lab's threshold for "the stream has stopped changing"


def _layers(run: Any, layers: list[int] | None) -> tuple[list[int], list[int]]:
    """(real layers, their indices along the layer axis)."""
    idx = run.layer_index(layers)
    return [run.layers[i] for i in idx], idx


def _base(sel: Selected) -> dict[str, Any]:
    return {"run": sel.run.id, "state": str(sel.state)}


def _layer_rows(x: Any, idx: list[int]) -> Any:
    """``x[idx]`` along the layer axis, as a slice when the layers are contiguous: a
    dense array's slice is then one ranged read, where a list becomes a fancy selection."""
    if idx and idx == list(range(idx[0], idx[0] + len(idx))):
        return x[idx[0] : idx[0] + len(idx)]
    return x[idx]


# ---- residual convergence -----------------------------------------------------------------
def convergence(sel: Selected, source: str = "hidden_out", layers: list[int] | None = None) -> pd.DataFrame:
    """Adjacent-layer change of the stream over the state's full pass.

    For each pair of consecutive selected layers (l, next): the cosine of h_l and
    h_next per token, and the relative update ||h_next - h_l|| / ||h_l|| per token;
    each at the pass's last token (``cos_last``, ``update_last``) and averaged over its
    tokens (``cos_mean``, ``update_mean``). As Activation Lab's
    ``residual_convergence``, except for zero vectors: it adds 1e-12 to the norms,
    here a token whose cosine (or update) is undefined is NaN at the last token and
    left out of the means (``undefined`` counts the tokens without a cosine).
    "Consecutive" is among the layers selected: with ``layers=[0, 5, 10]`` the pairs are
    (0, 5) and (5, 10).

    Columns: run, state, source, layer, next_layer, tokens, undefined, cos_last,
    cos_mean, update_last, update_mean.
    """
    vector_source(source)
    lay, idx = _layers(sel.run, layers)
    if len(lay) < 2:
        raise SelectionError("convergence compares adjacent layers: select two or more")
    (h,) = dask.compute(_layer_rows(full_pass(sel, source, dense=True), idx))  # (L, T, W)
    # Each product summed once, in float64, from the stored values as they are: a
    # 612-token pass over 30 layers widened whole to float64 took longer than its read.
    h = np.asarray(h)
    sq = np.einsum("ltw,ltw->lt", h, h, dtype=np.float64)
    dot = np.einsum("ltw,ltw->lt", h[:-1], h[1:], dtype=np.float64)
    step = np.subtract(h[1:], h[:-1], dtype=np.float64)
    den = np.sqrt(sq[:-1])
    den = np.where(den == 0, np.nan, den)
    with np.errstate(divide="ignore", invalid="ignore"):
        cos = dot / (den * np.sqrt(sq[1:]))  # (L-1, T)
    cos[~np.isfinite(cos)] = np.nan  # a zero vector has no direction
    update = np.sqrt(np.einsum("ltw,ltw->lt", step, step)) / den
    cos_mean, _, _, undefined = M.token_stats(cos)
    return pd.DataFrame(
        {
            **_base(sel), "source": source, "layer": lay[:-1], "next_layer": lay[1:],
            "tokens": h.shape[1], "undefined": undefined, "cos_last": cos[:, -1], "cos_mean": cos_mean,
            "update_last": update[:, -1], "update_mean": M.token_stats(update)[0],
        }
    )  # fmt: skip


def effective_depth(conv: pd.DataFrame, threshold: float = CONVERGED) -> pd.DataFrame:
    """Activation Lab's effective depth from a :func:`convergence` table: the first
    ``layer`` l such that the cosine of every adjacent pair from (l, next) on is at
    least ``threshold`` (after layer l the stream stays put); <NA> when the last pair
    is below it. Once from ``cos_last`` and once from ``cos_mean``.

    Columns: run, state, source, threshold, effective_depth_last, effective_depth_mean.
    """
    rows = []
    for keys, g in conv.groupby(["run", "state", "source"], sort=False):
        rows.append(
            {
                **dict(zip(("run", "state", "source"), keys, strict=True)), "threshold": threshold,
                "effective_depth_last": _first_settled(g["layer"], g["cos_last"], threshold),
                "effective_depth_mean": _first_settled(g["layer"], g["cos_mean"], threshold),
            }
        )  # fmt: skip
    df = pd.DataFrame(rows, columns=["run", "state", "source", "threshold",
                                     "effective_depth_last", "effective_depth_mean"])  # fmt: skip
    for c in ("effective_depth_last", "effective_depth_mean"):
        df[c] = pd.array(df[c], dtype="Int64")
    return df


def _first_settled(layers: pd.Series, cos: pd.Series, threshold: float) -> int | None:
    ok = (cos.to_numpy() >= threshold)[::-1]  # NaN compares False: never settled
    tail = int(np.argmin(ok)) if not ok.all() else len(ok)  # settled pairs at the end
    return None if tail == 0 else int(layers.to_numpy()[len(ok) - tail])


# ---- attention entropy --------------------------------------------------------------------
def attention_entropy(sel: Selected, layers: list[int] | None = None, per_head: bool = False) -> pd.DataFrame:
    """Shannon entropy of attention rows, in nats (natural log), over the state's full
    pass: for each query row, H = -sum_k p_k ln p_k over its keys (0 ln 0 = 0), then the
    mean over the pass's query rows (and, without ``per_head``, over heads too, which is
    Activation Lab's per-layer ``attention_entropy``; it adds 1e-9 inside the log, a
    difference below T * 1e-9 nats). A decode step's one row covers every earlier key.
    Runs captured with attention weights store every row's entropy beside them, so this
    reads (L, T, heads) floats instead of every layer's weights; other runs compute it
    from the weights, one layer at a time.

    Columns: run, state, layer, (head,) entropy, queries, keys.
    """
    lay, idx = _layers(sel.run, layers)
    weights = full_pass(sel, "attn_weights")  # (L, H, T, K), lazy: its shape names the rows and keys
    ent = _stored_entropy(sel, idx)
    if ent is None:  # runs imported or captured before row entropies were stored
        ent = np.stack([_layer_entropy(weights[i]) for i in idx])  # (L, H)
    heads = ent.shape[1]
    base = {**_base(sel), "queries": weights.shape[2], "keys": weights.shape[3]}
    if per_head:
        df = pd.DataFrame({**base, "layer": np.repeat(lay, heads), "head": np.tile(np.arange(heads), len(lay)),
                           "entropy": ent.ravel()})  # fmt: skip
        return df[["run", "state", "layer", "head", "entropy", "queries", "keys"]]
    df = pd.DataFrame({**base, "layer": lay, "entropy": ent.mean(axis=1)})
    return df[["run", "state", "layer", "entropy", "queries", "keys"]]


def stored_row_entropy(sel: Selected) -> Any | None:
    """Lazy (L, T, heads) entropies capture stored for the rows of the state's full pass,
    or None where the run does not store them (imports, runs captured before)."""
    try:
        return full_pass(sel, naming.ATTN_ENTROPY_ARRAY, dense=True)
    except SelectionError:
        return None


def _stored_entropy(sel: Selected, idx: list[int]) -> np.ndarray | None:
    """(L, heads) mean over the pass's rows of the stored row entropies, or None."""
    rows = stored_row_entropy(sel)
    if rows is None:
        return None
    (mean,) = dask.compute(_layer_rows(rows, idx).mean(axis=1, dtype=np.float64))
    return np.asarray(mean)


def _layer_entropy(weights: Any) -> np.ndarray:
    """(heads,) mean row entropy of one layer's lazy (H, T, K) weights, read whole."""
    (w,) = dask.compute(weights)
    return layout.row_entropy(np.asarray(w), "float32").mean(axis=0, dtype=np.float64)


# ---- q.k scores ------------------------------------------------------------------------
def head_layout(run: Any) -> tuple[int, int, int]:
    """(query heads, key/value heads, head dim) from the run's model metadata."""
    arch = (run.meta.get("model") or {}).get("arch") or {}
    try:
        heads = int(arch["num_attention_heads"])
        kv = int(arch.get("num_key_value_heads") or heads)
        dim = int(arch["head_dim"])
    except (KeyError, TypeError, ValueError):
        raise SelectionError(f"run {run.id} does not record its attention heads (model.arch in its metadata)") from None
    return heads, kv, dim


def qk_score_array(sel: Selected, layer: int) -> np.ndarray:
    """(heads, queries, keys) float64 raw attention scores q_h . k_g / sqrt(d) of one
    layer over the state's full pass (queries: its rows; keys: every position up to
    its last, see ``full_pass``), with grouped-query attention's key head g = h // (heads
    / kv_heads).

    q and k are the projections as stored: *before* rotary position embeddings (and
    any q/k norm applied after the projection), so these are not the logits the model's
    softmax saw; no causal mask is applied (entries above the diagonal are the scores
    of keys a query never attended to). Activation Lab's ``qk_scores`` computes the same
    per head (it guesses the head dim; this reads it from the run's metadata)."""
    run = sel.run
    heads, kv, dim = head_layout(run)
    (li,) = run.layer_index([layer])
    q, k = dask.compute(full_pass(sel, "q", dense=True)[li], full_pass(sel, "k", history=True, dense=True)[li])
    q, k = np.asarray(q, dtype=np.float64), np.asarray(k, dtype=np.float64)
    if q.shape[-1] != heads * dim or k.shape[-1] != kv * dim or heads % kv:
        raise SelectionError(
            f"run {run.id}: q width {q.shape[-1]} / k width {k.shape[-1]} do not fit "
            f"{heads} heads, {kv} kv heads of dim {dim}"
        )
    qh = q.reshape(q.shape[0], heads, dim).transpose(1, 0, 2)  # (H, T, d)
    kh = k.reshape(k.shape[0], kv, dim).transpose(1, 0, 2)[np.arange(heads) // (heads // kv)]
    return np.asarray(qh @ kh.transpose(0, 2, 1) / np.sqrt(dim))


def mean_score_maps(sel: Selected, layers: list[int]) -> Iterator[tuple[int, np.ndarray]]:
    """(layer, (queries, keys) float64) for each layer: :func:`qk_score_array` averaged
    over heads. q and k of every layer are read once, as stored; the mean is taken before
    the products (sum_h q_h . k_g(h) = sum_g (sum of g's q heads) . k_g), so a layer costs
    one product per key head, not per query head."""
    for layer, q, k, scale in _grouped_qk(sel, layers):
        yield layer, (q @ k.T) * scale


def mean_score_bins(
    sel: Selected, layers: list[int], max_rows: int, max_cols: int
) -> Iterator[tuple[int, np.ndarray, int, int]]:
    """(layer, bins, rows per bin, columns per bin) for each layer: :func:`mean_score_maps`
    mean-pooled as ``slices.block_means`` pools a map, without making the map. A bin's
    mean of q_r . k_c over its rows R and columns C is (mean of q over R) . (mean of k
    over C), so q and k are averaged per bin first: every layer of a 612-token pass
    stacked in one picture is 30 small products instead of 30 maps of 612 x 612."""
    for layer, q, k, scale in _grouped_qk(sel, layers):
        fr, fc = bin_factors(q.shape[0], k.shape[0], max_rows, max_cols)
        yield layer, (_bin_rows(q, fr) @ _bin_rows(k, fc).T) * scale, fr, fc


def _bin_rows(x: np.ndarray, f: int) -> np.ndarray:
    """Means of rows 0..f-1, f..2f-1, ... (the last bin holds what is left)."""
    if f == 1:
        return x
    starts = np.arange(0, x.shape[0], f)
    return np.add.reduceat(x, starts, axis=0) / np.diff(np.r_[starts, x.shape[0]])[:, None]


def _grouped_qk(sel: Selected, layers: list[int]) -> Iterator[tuple[int, np.ndarray, np.ndarray, float]]:
    """(layer, q summed over each key head's query heads (T, kv * d), k (K, kv * d),
    1 / (heads * sqrt(d))) float64, q and k of every layer read once."""
    run = sel.run
    heads, kv, dim = head_layout(run)
    idx = run.layer_index(layers)
    q_all, k_all = dask.compute(_layer_rows(full_pass(sel, "q", dense=True), idx),
                                _layer_rows(full_pass(sel, "k", history=True, dense=True), idx))  # fmt: skip
    if q_all.shape[-1] != heads * dim or k_all.shape[-1] != kv * dim or heads % kv:
        raise SelectionError(
            f"run {run.id}: q width {q_all.shape[-1]} / k width {k_all.shape[-1]} do not fit "
            f"{heads} heads, {kv} kv heads of dim {dim}"
        )
    for j, layer in enumerate(layers):
        q = np.asarray(q_all[j], dtype=np.float64).reshape(-1, kv, heads // kv, dim).sum(axis=2)  # (T, kv, d)
        k = np.asarray(k_all[j], dtype=np.float64)  # (K, kv * d)
        yield layer, q.reshape(q.shape[0], kv * dim), k, 1.0 / (heads * np.sqrt(dim))


def _head_frame(sel: Selected, mats: np.ndarray, name: str, head: int | None, layer: int) -> pd.DataFrame:
    """Long rows of a (heads, rows, cols) stack: one head, or with ``head=None`` the
    mean over heads (head column -1)."""
    if head is not None and not -mats.shape[0] <= head < mats.shape[0]:
        raise SelectionError(f"layer {layer} has heads 0..{mats.shape[0] - 1}, not {head}")
    m = mats.mean(axis=0) if head is None else mats[head]
    r, c = np.meshgrid(np.arange(m.shape[0]), np.arange(m.shape[1]), indexing="ij")
    return pd.DataFrame({**_base(sel), "layer": layer, "head": -1 if head is None else head % mats.shape[0],
                         "query": r.ravel(), "key": c.ravel(), name: m.ravel()})  # fmt: skip


def qk_scores(sel: Selected, layer: int, head: int | None = None) -> pd.DataFrame:
    """:func:`qk_score_array` as long rows for one head, or averaged over heads
    (``head=None``, head column -1, as Activation Lab's ``qk_scores``).

    Columns: run, state, layer, head, query, key, score."""
    return _head_frame(sel, qk_score_array(sel, layer), "score", head, layer)


# ---- qkv_last -------------------------------------------------------------------------
def qkv_last_array(sel: Selected, layers: list[int] | None = None) -> np.ndarray:
    """(L, dim v) float32: Activation Lab's ``qkv_last``. Per layer, at the state's
    token (the last token of a snapshot or reference pass): m = min(dim q, dim k),
    score = q[:m] . k[:m] / sqrt(m), row = score * v, in float32 as it does. q and k are
    pre-RoPE as stored; with grouped-query attention q is wider than k and ``q[:m]`` is
    its first heads only, as in its code; the score is one number per layer, not per
    head."""
    run, st = sel.run, sel.state
    _, idx = _layers(run, layers)
    if st.kind in POSITIONAL:
        lazy = [state_vectors(run, st, s, layers) for s in ("q", "k", "v")]
    else:
        lazy = [full_pass(sel, s)[idx, -1] for s in ("q", "k", "v")]
    q, k, v = (np.asarray(x, dtype=np.float32) for x in dask.compute(*lazy))
    m = min(q.shape[-1], k.shape[-1])
    rows = [np.float32(float(np.dot(q[i, :m], k[i, :m]) / np.sqrt(m))) * v[i] for i in range(len(idx))]
    return np.stack(rows).astype(np.float32)


def qkv_last(sel: Selected, layers: list[int] | None = None) -> pd.DataFrame:
    """:func:`qkv_last_array` as long rows. Columns: run, state, layer, index, value."""
    lay, _ = _layers(sel.run, layers)
    x = qkv_last_array(sel, layers)
    return pd.DataFrame({**_base(sel), "layer": np.repeat(lay, x.shape[1]),
                         "index": np.tile(np.arange(x.shape[1]), len(lay)), "value": x.ravel()})  # fmt: skip


# ---- next-token distribution per step ---------------------------------------------------
def next_token(runs: Any, steps: Sequence[int] | None = None) -> pd.DataFrame:
    """The next-token distribution of every generation step, from the stored logits at
    the step's last position: softmax over the whole vocabulary (float64), entropy
    H = -sum p ln p in nats, effective vocabulary exp(H), top-1 probability and token.
    Activation Lab's ``logit_stats`` (computed at capture from the same logits).

    Columns: run, step, position, entropy, effective_vocab, top1_prob, top1_token,
    generated_token."""
    from actstore.query.compare import as_runs
    from actstore.query.states import select

    frames = []
    for run in as_runs(runs):
        if "logits" not in run.sources:
            raise SelectionError(f"run {run.id} did not capture logits (capture.logits: true keeps them)")
        chosen = list(range(run.n_steps)) if steps is None else list(steps)
        positions = step_last_positions(run, chosen)
        (x,) = dask.compute(select(run, "logits", positions))  # (n, V)
        z = np.asarray(x, dtype=np.float64)
        z = z - z.max(axis=-1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
        p = np.exp(logp)
        ent = -(p * logp).sum(axis=-1)
        records = run.steps
        step_ids = [int(s) % run.n_steps for s in chosen]
        frames.append(pd.DataFrame({
            "run": run.id, "step": step_ids, "position": positions, "entropy": ent,
            "effective_vocab": np.exp(ent), "top1_prob": p.max(axis=-1), "top1_token": p.argmax(axis=-1),
            "generated_token": pd.array([records[s].get("generated_token_id") for s in step_ids], dtype="Int64"),
        }))  # fmt: skip
    return pd.concat(frames, ignore_index=True)
