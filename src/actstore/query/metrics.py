"""The three comparison metrics, written once for NumPy and Dask arrays alike.

>>> import numpy as np
>>> a, b = np.array([[1.0, 0.0, 2.0]]), np.array([[1.0, 1.0, 2.0]])
>>> float(cosine(a, b)[0]), float(mae(a, b)[0]), float(jaccard(a, b, frac=0.34)[0])
(0.9128709291752769, 0.3333333333333333, 1.0)

Every metric compares two states along the *last* axis and broadcasts over the others,
so ``cosine(S[:, None], R[None, :])`` is a messages x references x layers matrix. Each
is one NumPy kernel, written once: called directly on NumPy arrays (tests), and run
block by block through ``dask.array.apply_gufunc`` on Dask arrays (queries), with the
vector axis in one chunk. One task per block (not one per intermediate product) keeps a
query's memory at a few blocks however large the store, and builds graphs lazily:
nothing is read until ``compute()``. Choosing the top fraction of a vector runs per
block the same way (``map_blocks``), once per vector, before pairs are formed.

Inputs are widened to float64 first: stored activations are float16, whose dot
products over hundreds of dimensions lose digits.
"""

from __future__ import annotations

from typing import Any

import dask.array as da
import numpy as np
import pandas as pd

ArrayLike = Any  # np.ndarray or dask.array.Array

DEFAULT_FRAC = 0.01  # the seed's "top-1%" overlap


def _last_axis(kernel: Any, *xs: ArrayLike, dtype: Any = np.float64) -> ArrayLike:
    """Apply a NumPy kernel that reduces the last axis, eagerly or per Dask block."""
    if any(isinstance(x, da.Array) for x in xs):
        sig = ",".join("(w)" for _ in xs) + "->()"
        return da.apply_gufunc(kernel, sig, *xs, output_dtypes=dtype, allow_rechunk=True)
    return kernel(*(np.asarray(x) for x in xs))


def _norm_np(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return np.sqrt((x * x).sum(axis=-1))


def _cosine_np(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    # einsum broadcasts without materialising a * b; norms are taken before broadcasting.
    dot = np.einsum("...w,...w->...", a, b)
    den = np.sqrt(np.einsum("...w,...w->...", a, a)) * np.sqrt(np.einsum("...w,...w->...", b, b))
    return dot / np.where(den == 0, np.nan, den)  # NaN, not inf: a zero vector has no direction


def _mae_np(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = np.subtract(a.astype(np.float64), b.astype(np.float64))
    return np.abs(d, out=d).mean(axis=-1)  # in place: pairwise blocks can be large


def _mask_jaccard_np(ma: np.ndarray, mb: np.ndarray) -> np.ndarray:
    inter = (ma & mb).sum(axis=-1)
    union = (ma | mb).sum(axis=-1)
    return inter / np.where(union == 0, np.nan, union)


def norm(x: ArrayLike) -> ArrayLike:
    """L2 norm along the last axis."""
    return _last_axis(_norm_np, x)


def cosine(a: ArrayLike, b: ArrayLike) -> ArrayLike:
    """(a . b) / (|a| |b|) along the last axis; NaN where either vector is all zeros."""
    return _last_axis(_cosine_np, a, b)


def mae(a: ArrayLike, b: ArrayLike) -> ArrayLike:
    """mean(|a - b|) along the last axis."""
    return _last_axis(_mae_np, a, b)


def top_count(width: int, frac: float = DEFAULT_FRAC) -> int:
    """How many elements 'the top ``frac``' of a ``width``-vector is: at least one."""
    if not 0 < frac <= 1:
        raise ValueError(f"frac must be in (0, 1], got {frac}")
    return max(1, int(width * frac))


def _top_mask_np(x: np.ndarray, k: int, magnitude: bool) -> np.ndarray:
    v = np.abs(x) if magnitude else x
    v = np.where(np.isnan(v), -np.inf, v).astype(np.result_type(v.dtype, np.float32))  # NaN is never large
    w = v.shape[-1]
    # O(W): everything at or above the k-th largest value (by partition); where ties at
    # that value make more than k, keep the lowest indices. Float16 activations tie
    # often: the chosen set must not depend on sort internals.
    thr = np.partition(v, w - k, axis=-1)[..., w - k : w - k + 1]
    mask = v >= thr
    over = mask.sum(axis=-1) > k
    if over.any():
        above, ties = v[over] > thr[over], v[over] == thr[over]
        need = k - above.sum(axis=-1, keepdims=True)
        mask[over] = above | (ties & (np.cumsum(ties, axis=-1) <= need))
    return mask


def _top_index_np(x: np.ndarray, k: int, magnitude: bool) -> np.ndarray:
    """(..., k) indices of the :func:`top_mask` set, ascending."""
    mask = _top_mask_np(x, k, magnitude)
    return np.nonzero(mask)[-1].reshape(*mask.shape[:-1], k)


def top_mask(x: ArrayLike, frac: float = DEFAULT_FRAC, magnitude: bool = False) -> ArrayLike:
    """Boolean mask of the largest ``frac`` of each vector (by |x| with ``magnitude``).

    Exactly ``top_count`` elements are set per vector; ties at the threshold go to the
    lower index (float16 activations tie often, and the answer must not depend on it).
    """
    k = top_count(x.shape[-1], frac)
    if not isinstance(x, da.Array):
        return _top_mask_np(np.asarray(x), k, magnitude)
    # Dask: top-k needs the whole vector in one block; the other axes stay chunked.
    x = x.rechunk({x.ndim - 1: -1})
    return x.map_blocks(_top_mask_np, k, magnitude, dtype=bool, meta=np.empty((0,) * x.ndim, bool))


def mask_jaccard(ma: ArrayLike, mb: ArrayLike) -> ArrayLike:
    """|A & B| / |A | B| of two boolean masks along the last axis (broadcasting)."""
    return _last_axis(_mask_jaccard_np, ma, mb)


def jaccard(a: ArrayLike, b: ArrayLike, frac: float = DEFAULT_FRAC, magnitude: bool = False) -> ArrayLike:
    """Jaccard overlap of the top-``frac`` index sets of ``a`` and ``b``."""
    return mask_jaccard(top_mask(a, frac, magnitude), top_mask(b, frac, magnitude))


METRICS = ("cosine", "mae", "jaccard")


def _stacked_np(a: np.ndarray, b: np.ndarray, k: int, magnitude: bool) -> np.ndarray:
    # Top-k once per vector, before broadcasting to pairs; then the overlap is a gather
    # of k entries per pair instead of a W-wide mask operation: |A & B| = sum of B's
    # mask at A's indices, and |A | B| = 2k - |A & B|.
    ia, mb = _top_index_np(a, k, magnitude), _top_mask_np(b, k, magnitude)
    shape = np.broadcast_shapes(a.shape[:-1], b.shape[:-1])
    inter = np.take_along_axis(
        np.broadcast_to(mb, (*shape, mb.shape[-1])), np.broadcast_to(ia, (*shape, k)), -1
    )
    n = inter.sum(axis=-1)
    return np.stack([_cosine_np(a, b), _mae_np(a, b), n / (2 * k - n)], axis=-1)


def metrics_stack(
    a: ArrayLike, b: ArrayLike, frac: float = DEFAULT_FRAC, magnitude: bool = False
) -> ArrayLike:
    """cosine, mae and jaccard of the same pair stacked on a new first axis: ``(3, ...)``.

    One kernel call (one Dask task per block) computes all three, which keeps query
    graphs small: a comparison of 100 runs is a few hundred tasks, not thousands.
    """
    k = top_count(a.shape[-1], frac)
    if any(isinstance(x, da.Array) for x in (a, b)):
        out = da.apply_gufunc(
            _stacked_np, "(w),(w)->(m)", a, b, k=k, magnitude=magnitude,
            output_dtypes=np.float64, output_sizes={"m": len(METRICS)}, allow_rechunk=True,
        )  # fmt: skip
    else:
        out = _stacked_np(np.asarray(a), np.asarray(b), k, magnitude)
    return da.moveaxis(out, -1, 0) if isinstance(out, da.Array) else np.moveaxis(out, -1, 0)


_PAIR_BATCH_BYTES = 8 * 2**20  # float64 bytes of one batch of gathered pairs in pairs_stack


def _pairs_np(v: np.ndarray, k: int, magnitude: bool) -> np.ndarray:
    # Each vector's norm and top-k set once; then every pair i < j gathers its rows, in
    # batches so 100 runs' 4,950 pairs never widen into one huge float64 array.
    n = v.shape[0]
    iu, ju = np.triu_indices(n, 1)
    mask = _top_mask_np(v, k, magnitude)
    idx = np.nonzero(mask)[-1].reshape(*mask.shape[:-1], k)
    x = v.astype(np.float64)
    nrm = np.sqrt(np.einsum("...w,...w->...", x, x))
    out = np.empty((3, len(iu), *v.shape[1:-1]))
    step = max(1, _PAIR_BATCH_BYTES // max(1, x[0].nbytes))
    for s in range(0, len(iu), step):
        i, j = iu[s : s + step], ju[s : s + step]
        a, b = x[i], x[j]
        den = nrm[i] * nrm[j]
        out[0, s : s + step] = np.einsum("...w,...w->...", a, b) / np.where(den == 0, np.nan, den)
        out[1, s : s + step] = _mae_np(a, b)
        inter = np.take_along_axis(mask[j], idx[i], -1).sum(axis=-1)
        out[2, s : s + step] = inter / (2 * k - inter)
    return out


def pairs_stack(v: ArrayLike, frac: float = DEFAULT_FRAC, magnitude: bool = False) -> ArrayLike:
    """cosine, mae and jaccard of every pair ``v[i], v[j]`` with ``i < j`` along the first
    axis, in ``np.triu_indices`` order: ``(3, pairs, ...)``.

    Equal to ``metrics_stack(v[iu], v[ju])`` but each vector's top-k set and norm are
    found once, not once per pair it is in (20 runs: 20 top-k searches, not 380).
    On Dask, the run and vector axes become one block; the axes between (layers) keep
    their chunks, one task per block.
    """
    k = top_count(v.shape[-1], frac)
    if not isinstance(v, da.Array):
        return _pairs_np(np.asarray(v), k, magnitude)
    n = v.shape[0]
    v = v.rechunk({0: -1, v.ndim - 1: -1})
    chunks = ((3,), (n * (n - 1) // 2,), *v.chunks[1:-1])
    return v.map_blocks(
        _pairs_np, k, magnitude, chunks=chunks, drop_axis=v.ndim - 1, new_axis=0,
        dtype=np.float64, meta=np.empty((0,) * (v.ndim), np.float64),
    )  # fmt: skip


def all_metrics(
    a: ArrayLike, b: ArrayLike, frac: float = DEFAULT_FRAC, magnitude: bool = False
) -> dict[str, ArrayLike]:
    """``{"cosine": ..., "mae": ..., "jaccard": ...}`` of the same pair (one kernel)."""
    stacked = metrics_stack(a, b, frac, magnitude)
    return {m: stacked[i] for i, m in enumerate(METRICS)}


def token_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, Any, np.ndarray]:
    """Per row of a (rows, tokens) array holding NaN where a value is undefined: the mean
    and the minimum over the defined tokens, the token of the minimum (first on ties)
    and how many tokens are undefined. A row with none defined: NaN, NaN, <NA>."""
    ok = ~np.isnan(x)
    n = ok.sum(axis=1)
    some = n > 0
    mean = np.where(some, np.where(ok, x, 0.0).sum(axis=1) / np.maximum(n, 1), np.nan)
    filled = np.where(ok, x, np.inf)
    at = pd.array(filled.argmin(axis=1) if x.shape[1] else np.zeros(len(x), np.int64), dtype="Int64")
    at[~some] = pd.NA
    low = np.where(some, filled.min(axis=1, initial=np.inf), np.nan)
    return mean, low, at, x.shape[1] - n
