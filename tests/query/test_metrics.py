"""Metrics against plain-NumPy loops, and NumPy vs Dask giving the same numbers."""

from __future__ import annotations

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
