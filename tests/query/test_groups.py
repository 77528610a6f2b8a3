"""query.groups: states of several runs as a group, against plain NumPy on zarr reads.

The expectations use other algorithms than the code under test where one exists:
eigh of a Gram matrix for PCA and spectra, the feature-space formula for CKA, and a
brute-force average linkage that recomputes every cluster distance from the leaves.
Tolerances: 1e-12 absolute where both sides do the same float64 sums in another
order; 1e-9 where eigh and SVD meet (eigenvalues are squared singular values, so a
singular value from eigh carries about sqrt(eps) relative error near zero, and these
are compared only away from zero).
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from actstore.cli import main
from actstore.cli.query import GROUP_WHAT
from actstore.errors import SelectionError
from actstore.query import groups, resolve
from actstore.query.groups import average_linkage, leaf_order

from .helpers import np_cos, np_jaccard, raw_state

TOL = 1e-12
STATES = ("final", "snapshot:2", "reference:fear", "initial", "snapshot:4")


@pytest.fixture(scope="module")
def group(synth_store: Any) -> tuple[groups.GroupVectors, np.ndarray, list[str]]:
    """Five states from three runs, their GroupVectors and the same (N, L, W) read with zarr."""
    runs = synth_store.runs(["all"])
    items = [f"{runs[i % 3].id}@{st}" for i, st in enumerate(STATES)]
    g = groups.group_vectors(resolve(synth_store, items), sources=["hidden_out", "attn_out"])
    raw = {s: np.stack([raw_state(runs[i % 3], st, s) for i, st in enumerate(STATES)]) for s in g.vectors}
    return g, raw, items


def test_group_vectors_are_the_stored_vectors(group: Any) -> None:
    g, raw, items = group
    assert g.labels == items and g.layers == [0, 1, 2, 3]
    for s, v in raw.items():
        np.testing.assert_array_equal(g.vectors[s], v)


def test_centroid_and_divergence(group: Any) -> None:
    g, raw, items = group
    cen = groups.centroid_cosine(g)
    div = groups.divergence(g)
    for s, v in raw.items():
        rows = cen[cen["source"] == s]
        exp = [[np_cos(v[i, li], v[:, li].mean(axis=0)) for li in range(4)] for i in range(5)]
        np.testing.assert_allclose(rows["cos_to_centroid"].to_numpy().reshape(5, 4), exp, atol=TOL)
        assert rows["state"].tolist() == [x for x in items for _ in range(4)]
        pair = [[np_cos(v[i, li], v[j, li]) for i in range(5) for j in range(i + 1, 5)] for li in range(4)]
        d = div[div["source"] == s]
        np.testing.assert_allclose(d["divergence"], 1 - np.mean(pair, axis=1), atol=TOL)
        assert d["layer"].tolist() == [0, 1, 2, 3]


def test_pairwise_matrices(group: Any) -> None:
    g, raw, items = group
    df = groups.pairwise(g, frac=0.3, magnitude=True)  # 60 of 200: overlaps are not all zero
    for s, v in raw.items():
        rows = df[df["source"] == s]
        cos = [[np.mean([np_cos(v[i, li], v[j, li]) for li in range(4)]) for j in range(5)] for i in range(5)]
        jac = [[np.mean([np_jaccard(v[i, li], v[j, li], 0.3, True) for li in range(4)]) for j in range(5)]
               for i in range(5)]  # fmt: skip
        np.testing.assert_allclose(rows["cosine"].to_numpy().reshape(5, 5), cos, atol=TOL)
        np.testing.assert_allclose(rows["jaccard"].to_numpy().reshape(5, 5), jac, atol=TOL)
        assert rows["state_a"].tolist()[:5] == [items[0]] * 5 and rows["state_b"].tolist()[:5] == items


# ---- dendrogram -------------------------------------------------------------------------
def _brute_upgma(dist: np.ndarray) -> list[tuple[frozenset[int], frozenset[int], float]]:
    """Average linkage by definition: every step recomputes each cluster distance as the
    mean leaf-to-leaf distance and merges the closest two."""
    clusters = [frozenset([i]) for i in range(len(dist))]
    out = []
    while len(clusters) > 1:
        best = min(
            ((np.mean([dist[p, q] for p in a for q in b]), ia, ib)
             for ia, a in enumerate(clusters) for ib, b in enumerate(clusters) if ia < ib),
            key=lambda t: t[0],
        )  # fmt: skip
        d, ia, ib = best
        a, b = clusters[ia], clusters[ib]
        out.append((a, b, float(d)))
        clusters = [c for k, c in enumerate(clusters) if k not in (ia, ib)] + [a | b]
    return out


def test_average_linkage_by_hand() -> None:
    # points 0, 1, 4, 9 on a line: {0,1} at 1; {0,1}+{4} at mean(4, 3) = 3.5; then {9} at
    # mean(9, 8, 5) = 22/3
    x = np.array([0.0, 1.0, 4.0, 9.0])
    z = average_linkage(np.abs(x[:, None] - x[None, :]))
    np.testing.assert_allclose(z, [[0, 1, 1, 2], [2, 4, 3.5, 3], [3, 5, 22 / 3, 4]])
    assert leaf_order(z, 4) == [3, 2, 0, 1]  # each merge draws its lower cluster id on the left
    # integer distances average to fractions all the same (3.5, 22/3), not truncated
    xi = np.array([0, 1, 4, 9])
    np.testing.assert_allclose(average_linkage(np.abs(xi[:, None] - xi[None, :])), z)


def test_dendrogram_is_average_linkage_of_one_minus_cosine(group: Any) -> None:
    g, raw, items = group
    den = groups.dendrogram(g)
    for s, v in raw.items():
        cos = np.array([[np.mean([np_cos(v[i, li], v[j, li]) for li in range(4)]) for j in range(5)]
                        for i in range(5)])  # fmt: skip
        dist = np.maximum(0, 1 - cos)
        np.fill_diagonal(dist, 0)
        expected = _brute_upgma(dist)
        merges = den.merges[den.merges["source"] == s]
        assert len(merges) == 4 and len({round(d, 9) for *_, d in expected}) == 4  # no ties
        members: dict[int, frozenset[int]] = {i: frozenset([i]) for i in range(5)}
        for (_, m), (a, b, d) in zip(merges.iterrows(), expected, strict=True):
            got = {members[m["cluster_a"]], members[m["cluster_b"]]}
            assert got == {a, b}, (s, m["merge"])
            assert m["distance"] == pytest.approx(d, abs=TOL) and m["size"] == len(a | b)
            assert sorted(m["members"].split()) == sorted(items[i] for i in a | b)
            members[5 + m["merge"]] = a | b
            assert m["cluster_a"] < m["cluster_b"]
        leaves = den.leaves[den.leaves["source"] == s]["state"].tolist()
        assert sorted(leaves) == sorted(items)
        # every merged cluster's leaves sit side by side in the leaf order
        pos = {items.index(x): k for k, x in enumerate(leaves)}
        for c in members.values():
            p = sorted(pos[i] for i in c)
            assert p == list(range(p[0], p[0] + len(p)))


# ---- PCA, spectra, CKA ------------------------------------------------------------------
def test_pca_is_one_pca_over_every_state_and_layer(group: Any) -> None:
    g, raw, items = group
    res = groups.pca(g, components=3)
    for s, v in raw.items():
        x = v.reshape(20, -1)
        xc = x - x.mean(axis=0)
        w, u = np.linalg.eigh(xc @ xc.T)  # Gram matrix: eigenvalues are squared singular values
        order = np.argsort(w)[::-1]
        w, u = w[order], u[:, order]
        coords = res.coords[res.coords["source"] == s]
        assert coords["state"].tolist() == [x for x in items for _ in range(4)]
        for c in range(3):
            exp = u[:, c] * np.sqrt(w[c])
            got = coords[f"pc{c + 1}"].to_numpy()
            exp *= np.sign(got[np.argmax(np.abs(got))]) * np.sign(exp[np.argmax(np.abs(exp))])
            np.testing.assert_allclose(got, exp, atol=1e-9)
            assert got[np.argmax(np.abs(got))] > 0  # the sign convention
        var = res.variance[res.variance["source"] == s]
        assert list(var.columns) == ["source", "component", "explained_variance", "singular_value"]
        assert var["component"].tolist() == [1, 2, 3]
        np.testing.assert_allclose(var["explained_variance"], w[:3] / w.sum(), atol=1e-12)
        np.testing.assert_allclose(var["singular_value"], np.sqrt(w[:3]), rtol=1e-9)
        assert var["explained_variance"].is_monotonic_decreasing


@pytest.mark.parametrize("center", [True, False])
def test_spectrum(group: Any, center: bool) -> None:
    g, raw, _ = group
    df = groups.spectrum(g, center=center)
    for s, v in raw.items():
        rows = df[df["source"] == s]
        for li in range(4):
            x = v[:, li] - (v[:, li].mean(axis=0) if center else 0)
            w = np.clip(np.linalg.eigvalsh(x @ x.T), 0, None)[::-1]
            sv = np.sqrt(w)
            keep = sv[sv > sv[0] * 1e-6]  # centred: one singular value is ~0, left out
            p = keep / keep.sum()
            row = rows.iloc[li]
            assert row["spectral_norm"] == pytest.approx(sv[0], rel=1e-9)
            assert row["nuclear_norm"] == pytest.approx(keep.sum(), rel=1e-7)  # the ~0 one: sqrt(eps)
            assert row["effective_rank"] == pytest.approx(np.exp(-(p * np.log(p)).sum()), rel=1e-7)
            assert row["effective_rank"] <= (4 if center else 5) + 1e-9


def test_cka_between_layer_stacks(group: Any) -> None:
    g, raw, items = group
    df = groups.cka(g)
    for s, v in raw.items():
        def cka(x: np.ndarray, y: np.ndarray) -> float:
            xc, yc = x - x.mean(axis=0), y - y.mean(axis=0)  # centred over layers
            return float(np.linalg.norm(yc.T @ xc) ** 2 / (np.linalg.norm(xc.T @ xc) * np.linalg.norm(yc.T @ yc)))

        exp = [[cka(v[i], v[j]) for j in range(5)] for i in range(5)]
        got = df[df["source"] == s]["cka"].to_numpy().reshape(5, 5)
        np.testing.assert_allclose(got, exp, atol=1e-12)
        np.testing.assert_allclose(np.diag(got), 1.0, atol=1e-12)


def test_group_needs_two_distinct_states(synth_store: Any) -> None:
    with pytest.raises(SelectionError, match="two or more"):
        groups.group_vectors(resolve(synth_store, ["final"]))
    with pytest.raises(SelectionError, match="repeated"):
        groups.group_vectors(resolve(synth_store, ["final", "final", "initial"]))


# ---- the CLI -----------------------------------------------------------------------------
def _cli(store: Any, *args: str) -> Any:
    return CliRunner().invoke(main, ["query", *args, "--store", store.location])


def test_cli_names_every_analysis() -> None:
    assert GROUP_WHAT == groups.ANALYSES


@pytest.mark.parametrize("what", ["pairwise", "linkage", "pca", "spectrum"])
def test_cli_group_equals_python(synth_store: Any, group: Any, what: str) -> None:
    g, _, items = group
    res = _cli(synth_store, "group", *items, "--what", what, "--source", "hidden_out", "--source", "attn_out",
               "--format", "csv")  # fmt: skip
    assert res.exit_code == 0, res.output
    got = pd.read_csv(io.StringIO(res.stdout))
    expected = groups.group_table(g, what)
    assert list(got.columns) == list(expected.columns) and len(got) == len(expected)
    for col in expected.select_dtypes("number").columns:
        np.testing.assert_allclose(got[col], expected[col].astype(float), rtol=1e-12, atol=1e-15, err_msg=col)


def test_cli_group_bare_states_take_each_run(synth_store: Any) -> None:
    res = _cli(synth_store, "group", "final", "--runs", "all", "--what", "divergence", "--layers", "2",
               "--format", "json")  # fmt: skip
    assert res.exit_code == 0, res.output
    runs = synth_store.runs(["all"])
    v = np.stack([raw_state(r, "final", "hidden_out")[2] for r in runs])
    got = pd.read_json(io.StringIO(res.stdout))
    exp = 1 - np.mean([np_cos(v[i], v[j]) for i in range(3) for j in range(i + 1, 3)])
    # JSON output keeps 10 significant digits (pandas' to_json default)
    assert got[got["source"] == "hidden_out"]["divergence"].iloc[0] == pytest.approx(exp, rel=1e-9)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["group", "final"], "two or more"),
        (["group"], "two or more"),
        (["group", "final", "final"], "repeated"),
        (["group", "final", "reference:nope"], "no reference 'nope'"),
        (["group", "final", "initial", "--layers", "9"], "not captured"),
    ],
)
def test_cli_group_bad_input_is_one_line(synth_store: Any, args: list[str], needle: str) -> None:
    res = _cli(synth_store, *args)
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], res.stderr
