"""Metrics against plain-NumPy loops, and NumPy vs Dask giving the same numbers."""

from __future__ import annotations

import warnings

import dask
import dask.array as da
import numpy as np
import pytest

from actstore.query import metrics as M

from .helpers import np_cos, np_jaccard, np_mae

RNG = np.random.default_rng(0)
A = RNG.standard_normal((3, 5, 300)).astype(np.float16)
B = RNG.standard_normal((3, 5, 300)).astype(np.float16)


def _loop(fn, a, b, **kw):  # type: ignore[no-untyped-def]
    a, b = a.astype(np.float64), b.astype(np.float64)
    return np.array([[fn(a[i, j], b[i, j], **kw) for j in range(a.shape[1])] for i in range(a.shape[0])])


@pytest.mark.parametrize("lazy", [False, True])
def test_metrics_match_loops(lazy: bool) -> None:
    a, b = (da.from_array(A, chunks=(1, 2, 300)), da.from_array(B, chunks=(1, 2, 300))) if lazy else (A, B)
    got = {k: np.asarray(dask.compute(v)[0]) for k, v in M.all_metrics(a, b).items()}
    np.testing.assert_allclose(got["cosine"], _loop(np_cos, A, B), rtol=1e-12)
    np.testing.assert_allclose(got["mae"], _loop(np_mae, A, B), rtol=1e-12)
    np.testing.assert_allclose(got["jaccard"], _loop(np_jaccard, A, B), rtol=1e-12)


@pytest.mark.parametrize("frac", [0.01, 0.05, 0.5, 1.0])
@pytest.mark.parametrize("magnitude", [False, True])
def test_jaccard_fraction_and_magnitude(frac: float, magnitude: bool) -> None:
    lazy = M.jaccard(
        da.from_array(A, chunks=(2, 5, 100)), da.from_array(B, chunks=(2, 5, 100)), frac, magnitude
    )
    expected = _loop(np_jaccard, A, B, frac=frac, magnitude=magnitude)
    np.testing.assert_allclose(lazy.compute(), expected)
    np.testing.assert_allclose(M.jaccard(A, B, frac, magnitude), expected)


def test_top_mask_counts_and_at_least_one() -> None:
    x = RNG.standard_normal((4, 50))
    assert (M.top_mask(x, 0.01).sum(-1) == 1).all()  # 1% of 50 rounds down to 0: still one
    assert (M.top_mask(x, 0.1).sum(-1) == 5).all()
    m = M.top_mask(x, 0.1, magnitude=True)
    for row, mask in zip(x, m, strict=True):
        assert set(np.flatnonzero(mask)) == set(np.argsort(-np.abs(row))[:5])
    with pytest.raises(ValueError):
        M.top_count(10, 0)


def test_known_values_and_zero_vectors() -> None:
    a, b = np.array([1.0, 0.0]), np.array([0.0, 2.0])
    assert M.cosine(a, b) == 0 and M.cosine(a, a) == pytest.approx(1) and M.cosine(a, -a) == pytest.approx(-1)
    assert M.mae(a, b) == pytest.approx(1.5)
    assert np.isnan(M.cosine(a, np.zeros(2)))
    assert M.norm(np.array([3.0, 4.0])) == 5


def test_broadcasting_pairs() -> None:
    s, r = A[:, 0], B[:2, 0]  # (3, W) vs (2, W)
    mat = M.cosine(s[:, None], r[None, :])
    assert mat.shape == (3, 2)
    assert mat[2, 1] == pytest.approx(np_cos(s[2].astype(float), r[1].astype(float)))
    lazy = M.jaccard(da.from_array(s)[:, None], da.from_array(r)[None, :], 0.05)
    np.testing.assert_allclose(lazy.compute(), M.jaccard(s[:, None], r[None, :], 0.05))


def test_building_a_metric_computes_nothing() -> None:
    def refuse(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("computed while building")

    a = da.from_array(A, chunks=(1, 5, 300))
    with dask.config.set(scheduler=refuse):
        out = M.all_metrics(a, a[::-1], 0.05, True)
    assert all(isinstance(v, da.Array) for v in out.values())


def test_ties_go_to_the_lower_index() -> None:
    x = np.array([[1.0, 3.0, 3.0, 3.0, 0.0, 3.0]])
    assert M.top_mask(x, 0.5).tolist() == [[False, True, True, True, False, False]]
    lazy = M.top_mask(da.from_array(np.repeat(x, 3, axis=0), chunks=(1, 6)), 0.5).compute()
    assert (lazy == M.top_mask(x, 0.5)).all()
    f16 = RNG.standard_normal((50, 576)).astype(np.float16)  # float16 ties are common
    for row, mask in zip(f16, M.top_mask(f16, 0.05), strict=True):
        assert set(np.flatnonzero(mask)) == set(np.argsort(-row.astype(np.float64), kind="stable")[:28])


def test_metrics_stack_is_the_three_metrics() -> None:
    s, r = A[:, None], B[None, :]  # (3, 1, 5, W) x (1, 3, 5, W)
    stacked = M.metrics_stack(s, r, 0.05, True)
    assert stacked.shape == (3, 3, 3, 5)
    np.testing.assert_allclose(stacked[0], M.cosine(s, r))
    np.testing.assert_allclose(stacked[1], M.mae(s, r))
    np.testing.assert_allclose(stacked[2], M.jaccard(s, r, 0.05, True))
    lazy = M.metrics_stack(da.from_array(s, chunks=(1, 1, 2, 300)), da.from_array(r), 0.05, True)
    np.testing.assert_allclose(lazy.compute(), stacked)


@pytest.mark.parametrize("lazy", [False, True])
@pytest.mark.parametrize("magnitude", [False, True])
def test_pairs_stack_matches_loops(lazy: bool, magnitude: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    v = RNG.standard_normal((6, 4, 300)).astype(np.float16)
    v[2, 1] = 0  # a zero vector: NaN cosine, as the pairwise metrics give
    monkeypatch.setattr(M, "_PAIR_BATCH_BYTES", 3 * 300 * 8)  # several batches of pairs
    got = M.pairs_stack(da.from_array(v, chunks=(2, 3, 100)) if lazy else v, 0.05, magnitude)
    got = np.asarray(got.compute() if lazy else got)
    iu, ju = np.triu_indices(6, 1)
    assert got.shape == (3, len(iu), 4)
    x = v.astype(np.float64)
    for p, (i, j) in enumerate(zip(iu, ju, strict=True)):
        for layer in range(4):
            a, b = x[i, layer], x[j, layer]
            np.testing.assert_allclose(got[1, p, layer], np_mae(a, b), rtol=1e-12)
            np.testing.assert_allclose(got[2, p, layer], np_jaccard(a, b, 0.05, magnitude), rtol=1e-12)
            if (i, layer) == (2, 1) or (j, layer) == (2, 1):
                assert np.isnan(got[0, p, layer])
            else:
                np.testing.assert_allclose(got[0, p, layer], np_cos(a, b), rtol=1e-12)


# ---- edges the loops above do not reach (each found by a surviving mutant) ---------------
def _top_set(x: np.ndarray, k: int) -> set[int]:
    """Indices of the k largest values, NaN never among them, ties to the lower index."""
    order = np.argsort(-np.where(np.isnan(x), -np.inf, x.astype(np.float64)), kind="stable")
    return {int(i) for i in order[:k]}


def test_metrics_on_a_chunked_vector_axis() -> None:
    # A store may chunk the vector axis; each metric still sees whole vectors.
    a, b = da.from_array(A, chunks=(1, 2, 100)), da.from_array(B, chunks=(3, 5, 75))
    np.testing.assert_allclose(M.cosine(a, b).compute(), _loop(np_cos, A, B), rtol=1e-12)
    np.testing.assert_allclose(M.mae(a, b).compute(), _loop(np_mae, A, B), rtol=1e-12)
    np.testing.assert_allclose(M.norm(a).compute(), np.linalg.norm(A.astype(np.float64), axis=-1), rtol=1e-12)
    ma, mb = a > 0, b > 0
    inter = ((A > 0) & (B > 0)).sum(-1)
    union = ((A > 0) | (B > 0)).sum(-1)
    np.testing.assert_allclose(M.mask_jaccard(ma, mb).compute(), inter / union, rtol=1e-12)


def test_zero_vectors_give_nan_without_warnings() -> None:
    v = np.zeros((3, 1, 8))
    v[0, 0, 0] = 1.0
    empty = np.zeros(8, dtype=bool)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no divide-by-zero RuntimeWarning on the way to NaN
        assert np.isnan(M.cosine(np.ones(8), np.zeros(8)))
        assert np.isnan(M.mask_jaccard(empty, empty))
        pairs = M.pairs_stack(v, 0.125)
    assert np.isnan(pairs[0]).all()  # every pair has the zero vector v[1] or v[2] in it
    np.testing.assert_array_equal(pairs[1, :, 0], [1 / 8, 1 / 8, 0.0])


def test_unit_vectors_and_single_element_top_sets() -> None:
    # |a| |b| == 1 and |A | B| == 1 are ordinary values, not missing ones.
    e = np.eye(4)
    v = np.stack([e[0], e[0], e[1]])[:, None]  # (3 vectors, 1 layer, W=4)
    pairs = M.pairs_stack(v, 0.25)  # k = 1
    np.testing.assert_array_equal(pairs[0, :, 0], [1.0, 0.0, 0.0])
    np.testing.assert_array_equal(pairs[2, :, 0], [1.0, 0.0, 0.0])
    a, b = np.array([0.0, 5.0, 1.0, 2.0]), np.array([1.0, 4.0, 0.0, 3.0])
    assert M.jaccard(a, b, 0.25) == np_jaccard(a, b, 0.25) == 1.0
    assert M.jaccard(da.from_array(a), da.from_array(b), 0.25).compute() == 1.0


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_nan_is_never_in_the_top_set(dtype: type) -> None:
    x = np.array([[np.nan, 1.0, 2.0, np.nan, -3.0, 0.5], [np.nan] * 4 + [-1.0, -2.0]], dtype=dtype)
    for frac, k in ((0.34, 2), (0.5, 3)):
        for magnitude in (False, True):
            got = M.top_mask(x, frac, magnitude)
            assert got.sum(-1).tolist() == [k, k]
            for row, mask in zip(np.abs(x) if magnitude else x, got, strict=True):
                assert set(np.flatnonzero(mask).tolist()) == _top_set(row, k)


def test_float64_vectors_are_ranked_at_full_precision() -> None:
    x = np.array([1.0, 1.0 + 1e-12, 1.0 - 1e-12, 0.0])  # equal in float32
    assert np.flatnonzero(M.top_mask(x, 0.25)).tolist() == [1]
    assert np.flatnonzero(M.top_mask(x, 0.5)).tolist() == [0, 1]


def test_fractions_above_one_are_refused() -> None:
    for frac in (1.5, 2.0, -0.1):
        with pytest.raises(ValueError, match=r"frac must be in \(0, 1\]"):
            M.top_count(10, frac)
    assert M.top_count(10, 1.0) == 10


def test_defaults_rank_by_value_not_magnitude() -> None:
    # By value the top-1 sets are {1} and {2}; by magnitude both are {0}.
    a = np.zeros(100)
    b = np.zeros(100)
    a[:2], b[[0, 2]] = (-10.0, 1.0), (-10.0, 1.0)
    by_value, by_size = np_jaccard(a, b, 0.01), np_jaccard(a, b, 0.01, magnitude=True)
    assert (by_value, by_size) == (0.0, 1.0)
    assert M.jaccard(a, b) == by_value
    assert M.metrics_stack(a, b)[2] == by_value
    assert M.all_metrics(a, b)["jaccard"] == by_value
    assert M.all_metrics(a, b, magnitude=True)["jaccard"] == by_size
    assert M.all_metrics(a, b, 0.01, True)["jaccard"] == by_size
    assert M.pairs_stack(np.stack([a, b]))[2].tolist() == [by_value]
    assert M.pairs_stack(np.stack([a, b]), magnitude=True)[2].tolist() == [by_size]


@pytest.mark.parametrize("lazy", [False, True])
def test_pairs_stack_of_one_vector_has_no_pairs(lazy: bool) -> None:
    v = RNG.standard_normal((1, 4, 300))
    got = M.pairs_stack(da.from_array(v) if lazy else v, 0.05)
    assert got.shape == (3, 0, 4)
    assert np.asarray(got.compute() if lazy else got).shape == (3, 0, 4)


def test_lazy_pairs_stack_knows_its_shape_and_keeps_layer_chunks() -> None:
    # Callers slice the lazy answer before computing it, so its shape and chunks must be
    # right; the layer axis keeps its chunks (one task per block, a small graph).
    v = RNG.standard_normal((6, 5, 300)).astype(np.float16)
    lazy = M.pairs_stack(da.from_array(v, chunks=(2, 2, 100)), 0.05)
    assert lazy.shape == (3, 15, 5) and lazy.dtype == np.float64
    assert lazy.chunks == ((3,), (15,), (2, 2, 1))
    assert len(lazy.__dask_graph__()) < 60
    iu, ju = np.triu_indices(6, 1)
    x = v.astype(np.float64)
    p = 13  # a pair near the end: a wrong pair count would point elsewhere
    got = lazy[:, p, 3].compute()
    a, b = x[iu[p], 3], x[ju[p], 3]
    np.testing.assert_allclose(got, [np_cos(a, b), np_mae(a, b), np_jaccard(a, b, 0.05)], rtol=1e-12)
    np.testing.assert_allclose(lazy.blocks[0, 0, 1].compute(), lazy.compute()[:, :, 2:4])
