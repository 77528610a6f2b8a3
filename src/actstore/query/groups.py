"""Two or more states compared as a group: centroid, divergence, similarity matrices,
a dendrogram, PCA paths through depth, spectra and CKA.

>>> from actstore.store.store import ActStore                                     # doctest: +SKIP
>>> sel = resolve(ActStore.open("stores/actstore.zarr"), ["snapshot:1", "snapshot:3", "reference:joy"])  # doctest: +SKIP
>>> g = group_vectors(sel)            # one read: source -> (states, layers, width)  # doctest: +SKIP
>>> centroid_cosine(g); divergence(g); pairwise(g)                                 # doctest: +SKIP
>>> merges, leaves = dendrogram(g)                                                 # doctest: +SKIP
>>> coords, variance = pca(g)                                                      # doctest: +SKIP
>>> spectrum(g); cka(g)                                                            # doctest: +SKIP

Every analysis works on :class:`GroupVectors`: each state's vector at each selected
layer (the same vectors ``actstore query cosine`` compares), read once and held as
float64 NumPy. The linear algebra is NumPy's (``np.linalg.svd``), the clustering is
written here. Definitions follow Activation Lab's ``group_analysis``, ``pca_analysis``,
``svd_analysis`` and ``_linear_cka`` (``viewer_server/compute.py``) where it has one; each
function says what it computes on which matrix.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import dask
import dask.array as da
import numpy as np
import pandas as pd

from actstore.errors import SelectionError
from actstore.query import metrics as M
from actstore.query.selection import Selected, common_layers, default_sources
from actstore.query.states import state_vectors


@dataclass(frozen=True)
class GroupVectors:
    """``vectors[source]``: (states, layers, width) float64, rows in ``labels`` order."""

    labels: list[str]
    layers: list[int]
    vectors: dict[str, np.ndarray]


def group_vectors(
    selected: Sequence[Selected], sources: Sequence[str] | None = None, layers: list[int] | None = None
) -> GroupVectors:
    """Read every state's per-layer vectors once (one ``dask.compute``). Needs two or
    more distinct states; ``sources`` default to the residual-stream sources every run
    captured, ``layers`` to the layers every run captured."""
    sel = list(selected)
    labels = [s.label for s in sel]
    if len(sel) < 2:
        raise SelectionError(f"a group needs two or more states, got {len(sel)}")
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise SelectionError(f"a group names each state once; repeated: {', '.join(dup)}")
    srcs = default_sources(sel, sources)
    lay = common_layers(sel, layers)
    pieces = {}
    for s in srcs:
        vs = [state_vectors(x.run, x.state, s, lay) for x in sel]
        widths = sorted({v.shape[-1] for v in vs})
        if len(widths) > 1:
            raise SelectionError(f"the states differ in {s} width ({widths}): group states of one model")
        pieces[s] = da.stack(vs)
    (values,) = dask.compute(pieces)
    return GroupVectors(labels, lay, {s: np.asarray(v, dtype=np.float64) for s, v in values.items()})


def _layer_rows(g: GroupVectors, source: str, **cols: np.ndarray) -> pd.DataFrame:
    """Long rows over (state, layer) of (N, L) arrays."""
    n, nl = len(g.labels), len(g.layers)
    return pd.DataFrame({"source": source, "state": np.repeat(g.labels, nl), "layer": np.tile(g.layers, n),
                         **{k: v.ravel() for k, v in cols.items()}})  # fmt: skip


# ---- centroid and divergence -----------------------------------------------------------
def centroid_cosine(g: GroupVectors) -> pd.DataFrame:
    """Per source, state and layer: the cosine of the state's vector with the group
    centroid (the plain mean of the states' vectors at that layer), Activation Lab's
    ``cos_to_centroid``. Columns: source, state, layer, cos_to_centroid."""
    frames = []
    for s, v in g.vectors.items():  # (N, L, W)
        cos = M.cosine(v, v.mean(axis=0)[None])  # (N, L)
        frames.append(_layer_rows(g, s, cos_to_centroid=cos))
    return pd.concat(frames, ignore_index=True)


def _pair_cube(v: np.ndarray, frac: float, magnitude: bool) -> np.ndarray:
    """(3, N, N, L): cosine, mae, jaccard of every ordered pair of states, per layer."""
    return np.asarray(M.metrics_stack(v[:, None], v[None, :], frac, magnitude))


def divergence(g: GroupVectors) -> pd.DataFrame:
    """Per source and layer: 1 - the mean cosine over the N(N-1)/2 pairs of states,
    Activation Lab's ``divergence`` (0: every state points the same way). Columns:
    source, layer, divergence, mean_pair_cosine."""
    frames = []
    iu, ju = np.triu_indices(len(g.labels), 1)
    for s, v in g.vectors.items():
        mean = M.cosine(v[iu], v[ju]).mean(axis=0)  # (L,)
        frames.append(pd.DataFrame({"source": s, "layer": g.layers, "divergence": 1 - mean, "mean_pair_cosine": mean}))
    return pd.concat(frames, ignore_index=True)


def pairwise(g: GroupVectors, frac: float = M.DEFAULT_FRAC, magnitude: bool = False) -> pd.DataFrame:
    """Per source, the N x N matrices of the cosine and of the top-``frac`` Jaccard
    overlap, each averaged over layers (Activation Lab's ``pairwise_cos`` and
    ``topk_jaccard``; it ranks by |value|, ``magnitude=True`` here, and sizes the top set
    as round(W * frac), where actstore's metrics take max(1, floor(W * frac))). Rows
    for every ordered pair, the diagonal included (cosine 1 up to rounding).

    Columns: source, state_a, state_b, cosine, jaccard."""
    n = len(g.labels)
    a, b = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    lab = np.asarray(g.labels, dtype=object)
    frames = []
    for s, v in g.vectors.items():
        cube = _pair_cube(v, frac, magnitude).mean(axis=-1)  # (3, N, N)
        frames.append(pd.DataFrame({"source": s, "state_a": lab[a.ravel()], "state_b": lab[b.ravel()],
                                    "cosine": cube[0].ravel(), "jaccard": cube[2].ravel()}))  # fmt: skip
    return pd.concat(frames, ignore_index=True)


# ---- dendrogram -------------------------------------------------------------------------
def average_linkage(dist: np.ndarray) -> np.ndarray:
    """Average-linkage (UPGMA) clustering of a symmetric distance matrix, as SciPy
    lays it out: row i merges clusters ``Z[i, 0] < Z[i, 1]`` at distance ``Z[i, 2]`` into
    cluster n + i of ``Z[i, 3]`` leaves (leaves are 0..n-1). The distance of two
    clusters is the mean of the distances between their leaves, kept up to date by the
    Lance-Williams update (n_a d(a, m) + n_b d(b, m)) / (n_a + n_b). Of equal
    distances, the pair met first in row-major order merges first, clusters ordered by
    their lowest leaf."""
    d = np.asarray(dist, dtype=np.float64).copy()
    n = d.shape[0]
    if d.shape != (n, n):
        raise ValueError(f"distance matrix must be square, got {d.shape}")
    ids = list(range(n))  # cluster id held at each slot
    size = [1] * n
    live = list(range(n))
    z = np.zeros((max(n - 1, 0), 4))
    for step in range(n - 1):
        sub = d[np.ix_(live, live)] + np.diag(np.full(len(live), np.inf))
        i, j = divmod(int(np.argmin(sub)), len(live))
        i, j = live[min(i, j)], live[max(i, j)]
        z[step] = [min(ids[i], ids[j]), max(ids[i], ids[j]), d[i, j], size[i] + size[j]]
        merged = (size[i] * d[i] + size[j] * d[j]) / (size[i] + size[j])
        d[i], d[:, i] = merged, merged
        size[i], ids[i] = size[i] + size[j], n + step
        live.remove(j)
    return z


def leaf_order(z: np.ndarray, n: int) -> list[int]:
    """Leaves left to right: each merge draws ``Z[i, 0]`` left of ``Z[i, 1]`` (SciPy's
    ``dendrogram`` order)."""
    if n == 1:
        return [0]
    out: list[int] = []
    stack = [n + len(z) - 1]
    while stack:
        c = stack.pop()
        if c < n:
            out.append(c)
        else:
            left, right = int(z[c - n, 0]), int(z[c - n, 1])
            stack += [right, left]
    return out


class Dendrogram(NamedTuple):
    merges: pd.DataFrame
    leaves: pd.DataFrame


def distance_matrix(g: GroupVectors, source: str) -> np.ndarray:
    """Activation Lab's clustering distance: max(0, 1 - layer-averaged cosine), zero
    diagonal, symmetrised."""
    cos = M.cosine(g.vectors[source][:, None], g.vectors[source][None, :]).mean(axis=-1)
    dist = np.maximum(0.0, 1.0 - cos)
    np.fill_diagonal(dist, 0.0)
    return np.asarray(0.5 * (dist + dist.T))


def dendrogram(g: GroupVectors) -> Dendrogram:
    """Average-linkage clustering of the states per source on ``distance_matrix``
    (1 - the layer-averaged cosine), Activation Lab's ``linkage``.

    ``merges``: source, merge (0..N-2), cluster_a, cluster_b (leaf i is the i-th state,
    merge m makes cluster N + m), distance, size, members (the merged states' labels,
    in leaf order, joined by " "). ``leaves``: source, order, state: the states left to
    right as a dendrogram draws them."""
    n = len(g.labels)
    merges, leaves = [], []
    for s in g.vectors:
        z = average_linkage(distance_matrix(g, s))
        members: dict[int, list[int]] = {i: [i] for i in range(n)}
        for m, (ca, cb, dist, size) in enumerate(z):
            members[n + m] = members[int(ca)] + members[int(cb)]
            merges.append({"source": s, "merge": m, "cluster_a": int(ca), "cluster_b": int(cb), "distance": dist,
                           "size": int(size), "members": " ".join(g.labels[i] for i in members[n + m])})  # fmt: skip
        order = leaf_order(z, n)
        leaves.append(pd.DataFrame({"source": s, "order": np.arange(n), "state": [g.labels[i] for i in order]}))
    cols = ["source", "merge", "cluster_a", "cluster_b", "distance", "size", "members"]
    return Dendrogram(pd.DataFrame(merges, columns=cols), pd.concat(leaves, ignore_index=True))


# ---- PCA paths through depth ---------------------------------------------------------
class PCA(NamedTuple):
    coords: pd.DataFrame
    variance: pd.DataFrame


def pca(g: GroupVectors, components: int = 2) -> PCA:
    """One PCA per source over all N x L vectors (every state at every layer), as
    Activation Lab's ``pca_analysis``: the points share one coordinate system, so each
    state's layers trace a path through depth that can be drawn next to the others'
    (a PCA per layer would give each layer its own axes, and no paths). Points are
    centred on their mean; components are the right singular vectors of the centred
    (N*L, W) matrix, each signed so that its largest-magnitude coordinate is positive
    (SVD signs are otherwise arbitrary). Residual-stream norms grow with depth, so the
    first component often follows depth itself.

    ``coords``: source, state, layer, pc1..pcK. ``variance``: source, component,
    explained_variance (s_k^2 / sum s^2, of all components), singular_value.
    Components past the rank are zero (Activation Lab pads to two likewise)."""
    if components < 1:
        raise SelectionError(f"components must be 1 or more, not {components}")
    coords, variance = [], []
    for s, v in g.vectors.items():
        x = v.reshape(-1, v.shape[-1])  # rows: state-major, then layer
        xc = x - x.mean(axis=0)
        sv, lead = _top_singular(xc, components)
        k = min(components, len(sv))
        proj = np.zeros((len(x), components))
        proj[:, :k] = lead[:, :k]
        flip = np.sign(proj[np.argmax(np.abs(proj), axis=0), np.arange(components)])
        proj *= np.where(flip == 0, 1.0, flip)
        total = float((sv**2).sum())
        coords.append(_layer_rows(g, s, **{f"pc{c + 1}": proj[:, c] for c in range(components)}))
        ev = np.zeros(components)
        ev[:k] = sv[:k] ** 2 / total if total > 0 else np.nan
        sing = np.zeros(components)
        sing[:k] = sv[:k]
        variance.append(pd.DataFrame({"source": s, "component": np.arange(1, components + 1),
                                      "explained_variance": ev, "singular_value": sing}))  # fmt: skip
    return PCA(pd.concat(coords, ignore_index=True), pd.concat(variance, ignore_index=True))


def _top_singular(xc: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """All singular values of ``xc`` (descending) and its rows projected on the top ``k``
    right singular vectors (= u_k * s_k), from the eigendecomposition of the smaller
    Gram matrix: for the viewer's 29 states x 30 layers x 576 a 576 x 576 eigh instead of
    an 870 x 576 SVD (one thread, busy machine: 298 -> 118 ms per source, median of 5)."""
    rows, cols = xc.shape
    if cols <= rows:
        w, vecs = np.linalg.eigh(xc.T @ xc)  # ascending
        order = np.argsort(w)[::-1]
        sv = np.sqrt(np.clip(w[order], 0, None))
        lead = xc @ vecs[:, order[:k]]
    else:
        w, vecs = np.linalg.eigh(xc @ xc.T)
        order = np.argsort(w)[::-1]
        sv = np.sqrt(np.clip(w[order], 0, None))
        lead = vecs[:, order[:k]] * sv[:k]
    return sv, lead


# ---- spectra -----------------------------------------------------------------------------
def effective_rank(sv: np.ndarray, longest: int | None = None) -> float:
    """Roy and Vetterli's effective rank, as Activation Lab computes it: exp of the
    Shannon entropy (nats) of the singular values normalised to sum 1, p_i = s_i / sum s.
    Singular values at or below NumPy's ``matrix_rank`` tolerance, s_max * ``longest``
    (the matrix's longer side; default the number of values) * eps, count as zero
    (0 ln 0 = 0; Activation Lab drops s <= 1e-12); NaN for an all-zero matrix."""
    s = np.asarray(sv, dtype=np.float64)
    if s.size == 0 or s.max() <= 0:
        return float("nan")
    s = s[s > s.max() * (longest or len(s)) * np.finfo(np.float64).eps]
    p = s / s.sum()
    return float(np.exp(-(p * np.log(p)).sum()))


def spectrum(g: GroupVectors, center: bool = True) -> pd.DataFrame:
    """Per source and layer, the singular values of the (states x width) matrix of the
    states' vectors at that layer, centred on their mean state (``center``, as Activation
    Lab centres its token matrices; then the spectrum measures how the states spread,
    and the rank is at most N - 1): spectral norm (largest singular value), nuclear norm
    (their sum) and :func:`effective_rank`.

    Columns: source, layer, spectral_norm, nuclear_norm, effective_rank, centered."""
    frames = []
    for s, v in g.vectors.items():
        x = v.transpose(1, 0, 2)  # (L, N, W)
        if center:
            x = x - x.mean(axis=1, keepdims=True)
        sv = np.linalg.svd(x, compute_uv=False)  # (L, min(N, W)), descending
        frames.append(pd.DataFrame({
            "source": s, "layer": g.layers, "spectral_norm": sv[:, 0], "nuclear_norm": sv.sum(axis=1),
            "effective_rank": [effective_rank(r, max(x.shape[1:])) for r in sv], "centered": center,
        }))  # fmt: skip
    return pd.concat(frames, ignore_index=True)


# ---- CKA ---------------------------------------------------------------------------------
def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA of two (rows x features) matrices with the same rows, as Activation
    Lab's ``_linear_cka``: centre each column over the rows, K = Xc Xc^T, L = Yc Yc^T,
    CKA = <K, L>_F / (||K||_F ||L||_F). NaN with fewer than two rows or a zero matrix."""
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"CKA needs the same rows, got {x.shape[0]} and {y.shape[0]}")
    if x.shape[0] < 2:
        return float("nan")
    xc, yc = x - x.mean(axis=0), y - y.mean(axis=0)
    k, lm = xc @ xc.T, yc @ yc.T
    den = np.linalg.norm(k) * np.linalg.norm(lm)
    return float((k * lm).sum() / den) if den > 0 else float("nan")


def cka(g: GroupVectors) -> pd.DataFrame:
    """Linear CKA between every two states, per source, each state taken as its
    (layers x width) matrix: rows are the selected layers (the examples), columns the
    width (the features), centred over layers. It compares how the states' geometry
    across depth agrees (which layers sit close to which), blind to rotations and
    overall scale. Activation Lab computes it per layer on (tokens x width) passes; a
    state here is one vector per layer. Needs two or more layers (NaN otherwise). The
    residual stream's norm grows with depth in much the same way for every state of a
    model, so on hidden states CKA sits close to 1 and differences show in the second
    or third decimal.

    Columns: source, state_a, state_b, cka (N x N rows, the diagonal included)."""
    n = len(g.labels)
    lab = np.asarray(g.labels, dtype=object)
    frames = []
    for s, v in g.vectors.items():
        mat = np.asarray([[linear_cka(v[i], v[j]) for j in range(n)] for i in range(n)])
        a, b = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
        frames.append(pd.DataFrame({"source": s, "state_a": lab[a.ravel()], "state_b": lab[b.ravel()],
                                    "cka": mat.ravel()}))  # fmt: skip
    return pd.concat(frames, ignore_index=True)


ANALYSES = ("centroid", "divergence", "pairwise", "linkage", "leaves", "pca", "pca-variance", "spectrum", "cka")


def group_table(
    g: GroupVectors, what: str, frac: float = M.DEFAULT_FRAC, magnitude: bool = False, components: int = 2
) -> pd.DataFrame:
    """One of :data:`ANALYSES` as a table (what ``actstore query group --what`` prints)."""
    if what == "centroid":
        return centroid_cosine(g)
    if what == "divergence":
        return divergence(g)
    if what == "pairwise":
        return pairwise(g, frac, magnitude)
    if what in ("linkage", "leaves"):
        den = dendrogram(g)
        return den.merges if what == "linkage" else den.leaves
    if what in ("pca", "pca-variance"):
        res = pca(g, components)
        return res.coords if what == "pca" else res.variance
    if what == "spectrum":
        return spectrum(g)
    if what == "cka":
        return cka(g)
    raise SelectionError(f"group analysis must be one of {', '.join(ANALYSES)}, not {what!r}")
