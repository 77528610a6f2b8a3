"""Two states compared, from any runs: per-layer metrics, full passes token by token,
and attention or score maps.

>>> from actstore.store.store import ActStore                                 # doctest: +SKIP
>>> a, b = resolve(ActStore.open("stores/actstore.zarr"), ["initial", "final"])  # doctest: +SKIP
>>> per_layer, summary = pair_metrics(a, b)                                   # doctest: +SKIP
>>> full_pair(a, b)               # per token over aligned tokens, per layer     # doctest: +SKIP
>>> pair_maps(a, b, layer=3)      # A, B, |A-B|, (A-B)^2, A*B, A/|B|              # doctest: +SKIP

States come from ``selection.resolve`` (``RUN@STATE`` items), so A and B may be two
runs of one model. Vectors are read lazily (``states.state_vectors``, ``full_pass``) and
computed once; cosine, MAE and Jaccard are ``query.metrics``' (the same numbers as
``actstore query cosine``). Definitions follow Activation Lab's viewer server
(``viewer_server/compute.py``: ``pair_metrics``, ``diff_matrices``) where it has them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import dask
import dask.array as da
import numpy as np
import pandas as pd

from actstore.errors import SelectionError
from actstore.query import metrics as M
from actstore.query.compare import summarize
from actstore.query.depth import qk_score_array, qkv_last_array
from actstore.query.selection import Selected, common_layers, default_sources, full_pass
from actstore.query.states import state_vectors

PAIR_COLUMNS = ("cosine", "mae", "std_diff", "jaccard")
MAP_KINDS = ("attention", "scores", "qkv")
RATIO_EPS = 1e-9  # Activation Lab's diff_matrices: A / (|B| + 1e-9) ...
RATIO_CLIP = 50.0  # ... clipped to [-50, 50]


class PairResult(NamedTuple):
    """``per_layer``: one row per source and layer; ``summary``: one row per source."""

    per_layer: pd.DataFrame
    summary: pd.DataFrame


def _keys(a: Selected, b: Selected) -> dict[str, Any]:
    return {"run_a": a.run.id, "state_a": str(a.state), "run_b": b.run.id, "state_b": str(b.state)}


def _same_width(x: Any, y: Any, source: str, a: Selected, b: Selected) -> None:
    if x.shape[-1] != y.shape[-1]:
        raise SelectionError(
            f"{a.label} and {b.label} differ in {source} width ({x.shape[-1]} vs {y.shape[-1]}): compare runs of one model"
        )


def _std_diff(x: Any, y: Any, axis: Any = -1) -> Any:
    """Population standard deviation (ddof=0) of x - y, in float64."""
    return (x.astype(np.float64) - y.astype(np.float64)).std(axis=axis)


# ---- one vector per layer -----------------------------------------------------------------
def pair_metrics(
    a: Selected,
    b: Selected,
    sources: Sequence[str] | None = None,
    layers: list[int] | None = None,
    frac: float = M.DEFAULT_FRAC,
    magnitude: bool = False,
) -> PairResult:
    """Per source and layer: cosine, MAE, the standard deviation of the difference
    (``std_diff``, population, over the width) and the top-``frac`` Jaccard overlap of
    the two states' vectors (one per layer). Activation Lab's ``pair_metrics`` gives the
    same four on its vectors; its overlap ranks by |value| (``magnitude=True`` here),
    while actstore's default, shared by every query command, ranks by value.

    ``sources``: default every residual-stream source both runs captured; ``layers``:
    default every layer both runs captured.

    ``per_layer`` columns: run_a, state_a, run_b, state_b, source, layer, cosine, mae,
    std_diff, jaccard. ``summary`` is ``query.summarize`` of those rows per source (the
    seed's summary columns) plus ``mean_std_diff``.
    """
    srcs = default_sources([a, b], sources)
    lay = common_layers([a, b], layers)
    pieces = {}
    for s in srcs:
        va, vb = state_vectors(a.run, a.state, s, lay), state_vectors(b.run, b.state, s, lay)
        _same_width(va, vb, s, a, b)
        pieces[s] = da.concatenate([M.metrics_stack(va, vb, frac, magnitude), _std_diff(va, vb)[None]])
    (values,) = dask.compute(pieces)
    frames = [
        pd.DataFrame({**_keys(a, b), "source": s, "layer": lay, "cosine": v[0], "mae": v[1],
                      "std_diff": v[3], "jaccard": v[2]})  # fmt: skip
        for s, v in values.items()
    ]
    cols = [*_keys(a, b), "source", "layer", *PAIR_COLUMNS]
    per_layer = pd.concat(frames, ignore_index=True)[cols] if frames else pd.DataFrame(columns=cols)
    by = [*_keys(a, b), "source"]
    summary = summarize(per_layer.drop(columns="std_diff"), by=by)
    if len(summary):
        std = per_layer.groupby(by, sort=False)["std_diff"].agg(lambda s: float(np.mean(s.to_numpy())))
        summary = summary.merge(std.rename("mean_std_diff").reset_index(), on=by)
    return PairResult(per_layer, summary)


# ---- two full passes ----------------------------------------------------------------
def full_pair(
    a: Selected,
    b: Selected,
    sources: Sequence[str] | None = None,
    layers: list[int] | None = None,
    frac: float = M.DEFAULT_FRAC,
    magnitude: bool = False,
) -> pd.DataFrame:
    """Two full passes (a step's positions, or a snapshot's or reference's full pass;
    ``selection.full_pass``) compared token by token, per source and layer.

    As Activation Lab's ``pair_metrics`` on per-token tensors: tokens are *aligned* by
    index from the first, over the common length T = min(T_a, T_b) (a longer pass's extra
    tokens are ignored); ``mean_cosine`` and ``min_cosine`` are the mean and minimum of the
    per-token cosines (``min_token``: the aligned index of the minimum, first on ties),
    ``mae`` and ``std_diff`` are over all T x W aligned values, ``jaccard`` is the
    per-token top-``frac`` overlap averaged over tokens. A token where either vector is
    all zeros (a padding token's q at layer 0, say) has no cosine: it is left out of
    the mean and minimum and counted in ``undefined`` (Activation Lab adds 1e-12 to the
    norms, which counts it as cosine 0); all tokens undefined gives NaN.

    Columns: run_a, state_a, run_b, state_b, source, layer, tokens_a, tokens_b, aligned,
    undefined, mean_cosine, min_cosine, min_token, mae, std_diff, jaccard.
    """
    srcs = default_sources([a, b], sources)
    lay = common_layers([a, b], layers)
    ia, ib = a.run.layer_index(lay), b.run.layer_index(lay)
    pieces, lengths = {}, {}
    for s in srcs:
        xa, xb = full_pass(a, s)[ia], full_pass(b, s)[ib]  # (L, T, W)
        _same_width(xa, xb, s, a, b)
        t = min(xa.shape[1], xb.shape[1])
        lengths[s] = (xa.shape[1], xb.shape[1], t)
        xa, xb = xa[:, :t], xb[:, :t]
        pieces[s] = (M.metrics_stack(xa, xb, frac, magnitude), _std_diff(xa, xb, axis=(1, 2)))
    (values,) = dask.compute(pieces)
    frames = []
    for s, (m, std) in values.items():  # m: (3, L, T)
        ta, tb, t = lengths[s]
        mean, low, at, undefined = M.token_stats(m[0])
        frames.append(pd.DataFrame({
            **_keys(a, b), "source": s, "layer": lay, "tokens_a": ta, "tokens_b": tb, "aligned": t,
            "undefined": undefined, "mean_cosine": mean, "min_cosine": low, "min_token": at,
            "mae": m[1].mean(axis=1), "std_diff": std, "jaccard": m[2].mean(axis=1),
        }))  # fmt: skip
    return pd.concat(frames, ignore_index=True)


# ---- attention, score and qkv maps ----------------------------------------------------------
def map_array(sel: Selected, kind: str, layer: int | None = None, head: int | None = None,
              layers: list[int] | None = None) -> np.ndarray:  # fmt: skip
    """The 2-D map one state shows for ``kind``: ``attention`` (softmax weights of
    ``layer`` over the full pass, (queries, keys)), ``scores`` (raw q.k/sqrt(d) of
    ``layer``, ``depth.qk_score_array``), each for one ``head`` or the mean over heads
    (Activation Lab's ``head_mean``), or ``qkv`` (``depth.qkv_last_array``, (layers,
    dim v); ``layer`` and ``head`` do not apply)."""
    if kind not in MAP_KINDS:
        raise SelectionError(f"map kind must be one of {', '.join(MAP_KINDS)}, not {kind!r}")
    if kind == "qkv":
        return qkv_last_array(sel, layers).astype(np.float64)
    if layer is None:
        raise SelectionError(f"a {kind} map is of one layer: give --layer")
    if kind == "attention":
        (li,) = sel.run.layer_index([layer])
        (w,) = dask.compute(full_pass(sel, "attn_weights")[li])  # tiles: one layer read, not the pass
        mats = np.asarray(w, dtype=np.float64)
    else:
        mats = qk_score_array(sel, layer)
    if head is None:
        return np.asarray(mats.mean(axis=0))
    if not -mats.shape[0] <= head < mats.shape[0]:
        raise SelectionError(f"layer {layer} has heads 0..{mats.shape[0] - 1}, not {head}")
    return np.asarray(mats[head])


def vector_map(sel: Selected, source: str, layer: int | None = None) -> np.ndarray:
    """(tokens, width) float64: a vector source over the state's full pass, one ``layer``
    of a per-layer source (embeddings and logits have none), as stored."""
    x = full_pass(sel, source, dense=True)
    if x.ndim == 3:
        if layer is None:
            raise SelectionError(f"{source} has one map per layer: give a layer")
        (li,) = sel.run.layer_index([layer])
        x = x[li]
    (m,) = dask.compute(x)
    return np.asarray(m, dtype=np.float64)


def diff_maps(ma: np.ndarray, mb: np.ndarray) -> dict[str, np.ndarray]:
    """Activation Lab's ``diff_matrices`` of two equal-shaped maps: a, b, abs_diff
    |A-B|, sq_err (A-B)^2, hadamard A*B and ratio A / (|B| + 1e-9) clipped to [-50, 50]
    (the epsilon keeps B = 0 finite: there the ratio is A * 1e9, clipped)."""
    d = ma - mb
    ratio = np.clip(ma / (np.abs(mb) + RATIO_EPS), -RATIO_CLIP, RATIO_CLIP)
    return {"a": ma, "b": mb, "abs_diff": np.abs(d), "sq_err": d * d, "hadamard": ma * mb, "ratio": ratio}


def pair_maps(
    a: Selected,
    b: Selected,
    kind: str = "attention",
    layer: int | None = None,
    head: int | None = None,
    layers: list[int] | None = None,
) -> pd.DataFrame:
    """A, B and their :func:`diff_maps` for attention weights or q.k scores of one
    layer (``map_array``), or Activation Lab's qkv_last matrices (``kind="qkv"``).

    Activation Lab refuses maps of different shapes; here both are cut to their common
    top-left block (rows and columns aligned by index from the first, as
    :func:`full_pair` aligns tokens), and ``rows_a``/``cols_a``/``rows_b``/``cols_b``
    say what was cut.

    Columns: run_a, state_a, run_b, state_b, kind, layer, head (-1: mean over heads),
    row, col, a, b, abs_diff, sq_err, hadamard, ratio, rows_a, cols_a, rows_b, cols_b.
    """
    lay = common_layers([a, b], layers) if kind == "qkv" else None
    ma, mb = map_array(a, kind, layer, head, lay), map_array(b, kind, layer, head, lay)
    r, c = min(ma.shape[0], mb.shape[0]), min(ma.shape[1], mb.shape[1])
    maps = diff_maps(ma[:r, :c], mb[:r, :c])
    rows, cols = np.meshgrid(np.arange(r), np.arange(c), indexing="ij")
    row_labels = np.asarray(lay)[rows.ravel()] if kind == "qkv" else rows.ravel()
    return pd.DataFrame({
        **_keys(a, b), "kind": kind, "layer": -1 if layer is None or kind == "qkv" else layer,
        "head": -1 if head is None or kind == "qkv" else head, "row": row_labels, "col": cols.ravel(),
        **{k: v.ravel() for k, v in maps.items()},
        "rows_a": ma.shape[0], "cols_a": ma.shape[1], "rows_b": mb.shape[0], "cols_b": mb.shape[1],
    })  # fmt: skip
