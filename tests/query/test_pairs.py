"""query.pairs: two states of any runs, against plain NumPy on arrays read with zarr.

Tolerances: the function and the expectation both compute in float64 from the same
stored values (float16 synthetic runs, float32 tiny-model runs), so they differ only by
summation order: 1e-12 absolute on values of order 1 (1e-10 on q.k scores, sums of
products of larger values). CSV output round-trips float64 to within 1e-12 relative.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from actstore.cli import main
from actstore.errors import SelectionError
from actstore.query import full_pair, pair_maps, pair_metrics, resolve
from actstore.query.pairs import RATIO_CLIP, RATIO_EPS

from .helpers import (
    np_cos,
    np_jaccard,
    np_mae,
    np_qkv_last,
    np_scores,
    np_std_diff,
    raw,
    raw_pass,
    raw_state,
)

TOL = 1e-12


def _cli(store: Any, *args: str) -> Any:
    return CliRunner().invoke(main, ["query", *args, "--store", store.location])


def _csv(out: str) -> pd.DataFrame:
    return pd.read_csv(io.StringIO(out))


def _one_line_error(res: Any, *needles: str) -> None:
    assert res.exit_code == 2, (res.exit_code, res.output)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])


# ---- one vector per layer ---------------------------------------------------------------
@pytest.mark.parametrize("magnitude", [False, True])
def test_pair_metrics_across_runs_match_numpy(synth_store: Any, magnitude: bool) -> None:
    r0, _, r2 = synth_store.runs(["all"])
    a, b = resolve(synth_store, [f"{r0.id}@final", f"{r2.id}@snapshot:3"])
    # frac 0.3: 60 of 200 dims, so random vectors overlap and Jaccard is not all zeros
    res = pair_metrics(a, b, frac=0.3, magnitude=magnitude)
    df = res.per_layer
    assert sorted(df["source"].unique()) == sorted(["hidden_in", "hidden_out", "attn_out", "mlp_down_out"])
    for source, rows in df.groupby("source"):
        va, vb = raw_state(r0, "final", source), raw_state(r2, "snapshot:3", source)
        exp = {
            "cosine": [np_cos(x, y) for x, y in zip(va, vb, strict=True)],
            "mae": [np_mae(x, y) for x, y in zip(va, vb, strict=True)],
            "std_diff": [np_std_diff(x, y) for x, y in zip(va, vb, strict=True)],
            "jaccard": [np_jaccard(x, y, 0.3, magnitude) for x, y in zip(va, vb, strict=True)],
        }
        assert rows["layer"].tolist() == [0, 1, 2, 3]
        assert (rows["run_a"] == r0.id).all() and (rows["state_b"] == "snapshot:3").all()
        for col, values in exp.items():
            np.testing.assert_allclose(rows[col], values, rtol=0, atol=TOL, err_msg=f"{source} {col}")
        assert len(set(np.round(exp["jaccard"], 6))) > 1  # the overlap varies: a wrong axis shows
        s = res.summary[res.summary["source"] == source].iloc[0]
        assert s["most_divergent_layer"] == int(np.argmin(exp["cosine"]))
        assert s["max_MAE_layer"] == int(np.argmax(exp["mae"]))
        assert s["mean_std_diff"] == pytest.approx(np.mean(exp["std_diff"]), abs=TOL)
        assert s["mean_cosine"] == pytest.approx(np.mean(exp["cosine"]), abs=TOL)


def test_pair_metrics_same_run_states_and_layers(synth_store: Any) -> None:
    run = synth_store.runs(["all"])[1]
    a, b = resolve(synth_store, ["initial", "reference:fear"], default_runs=[run.id])
    df = pair_metrics(a, b, sources=["attn_out"], layers=[3, 1]).per_layer
    va, vb = raw_state(run, "initial", "attn_out"), raw_state(run, "reference:fear", "attn_out")
    assert df["layer"].tolist() == [3, 1]
    np.testing.assert_allclose(df["cosine"], [np_cos(va[3], vb[3]), np_cos(va[1], vb[1])], atol=TOL)


def test_pair_metrics_refuses_other_models_and_bad_sources(synth_store: Any) -> None:
    a, b = resolve(synth_store, ["initial", "final"])
    with pytest.raises(SelectionError, match="not a per-layer vector source"):
        pair_metrics(a, b, sources=["logits"])
    with pytest.raises(SelectionError, match="layer"):
        pair_metrics(a, b, layers=[7])


# ---- two full passes --------------------------------------------------------------------
def _expected_full(xa: np.ndarray, xb: np.ndarray, frac: float) -> dict[str, np.ndarray]:
    t = min(xa.shape[1], xb.shape[1])
    xa, xb = xa[:, :t], xb[:, :t]
    with np.errstate(invalid="ignore"):  # a zero vector's cosine is NaN: left out of mean and min
        cos = np.array([[np_cos(xa[li, i], xb[li, i]) for i in range(t)] for li in range(len(xa))])
    jac = np.array([[np_jaccard(xa[li, i], xb[li, i], frac) for i in range(t)] for li in range(len(xa))])
    return {
        "mean_cosine": np.nanmean(cos, axis=1), "min_cosine": np.nanmin(cos, axis=1),
        "min_token": np.nanargmin(cos, axis=1), "undefined": np.isnan(cos).sum(axis=1),
        "mae": np.abs(xa - xb).mean(axis=(1, 2)), "std_diff": (xa - xb).std(axis=(1, 2)),
        "jaccard": jac.mean(axis=1), "aligned": np.full(len(xa), t),
    }  # fmt: skip


def test_full_pair_aligns_tokens_from_the_first(tiny: Any) -> None:
    run = tiny.run
    a, b = resolve(tiny.store, ["snapshot:2", "reference:joy"])
    df = full_pair(a, b, sources=["hidden_out", "q"], frac=0.1)
    for source, rows in df.groupby("source", sort=False):
        xa, xb = raw_pass(run, "snapshot", 2, source), raw_pass(run, "reference", "joy", source)
        assert (rows["tokens_a"] == xa.shape[1]).all() and (rows["tokens_b"] == xb.shape[1]).all()
        assert xa.shape[1] != xb.shape[1]  # 39 vs 35 tokens: the alignment matters
        for col, values in _expected_full(xa, xb, 0.1).items():
            np.testing.assert_allclose(rows[col], values, rtol=0, atol=TOL, err_msg=f"{source} {col}")
        assert (rows["min_token"] > 0).all()  # shared first tokens agree; the minimum is later
        # aligning from the end instead would give other numbers
        t = min(xa.shape[1], xb.shape[1])
        tail = np.mean([np_cos(xa[-1, -t + i], xb[-1, -t + i]) for i in range(t)])
        assert abs(tail - rows["mean_cosine"].iloc[-1]) > 1e-3
    # the tiny llama's padding token embeds to zero: its q at layer 0 has no direction
    q0 = df[(df["source"] == "q") & (df["layer"] == 0)].iloc[0]
    assert q0["undefined"] > 0 and np.isfinite(q0["mean_cosine"])
    swapped = full_pair(b, a, sources=["hidden_out", "q"], frac=0.1)
    assert (swapped["tokens_a"] == df["tokens_b"]).all() and (swapped["state_a"] == "reference:joy").all()
    np.testing.assert_allclose(swapped["mean_cosine"], df["mean_cosine"], atol=TOL)


def test_full_pair_of_a_step_and_the_generated_snapshot(tiny: Any) -> None:
    run = tiny.run
    a, b = resolve(tiny.store, ["step:0", "snapshot:generated"])
    df = full_pair(a, b, sources=["mlp_down_out"], layers=[2, 0])
    xa = raw(run, "mlp_down_out")[:, : run.prompt_len]
    xb = raw_pass(run, "snapshot", "generated", "mlp_down_out")
    exp = _expected_full(xa[[2, 0]], xb[[2, 0]], 0.01)
    assert df["layer"].tolist() == [2, 0]
    for col, values in exp.items():
        np.testing.assert_allclose(df[col], values, rtol=0, atol=TOL, err_msg=col)


def test_full_pair_refuses_a_position(tiny: Any) -> None:
    a, b = resolve(tiny.store, ["pos:3", "final"])
    with pytest.raises(SelectionError, match="not a forward pass"):
        full_pair(a, b)


# ---- maps ---------------------------------------------------------------------------------
def _expected_maps(ma: np.ndarray, mb: np.ndarray) -> dict[str, np.ndarray]:
    r, c = min(ma.shape[0], mb.shape[0]), min(ma.shape[1], mb.shape[1])
    a, b = ma[:r, :c], mb[:r, :c]
    return {
        "a": a, "b": b, "abs_diff": np.abs(a - b), "sq_err": (a - b) ** 2, "hadamard": a * b,
        "ratio": np.clip(a / (np.abs(b) + RATIO_EPS), -RATIO_CLIP, RATIO_CLIP),
    }  # fmt: skip


def _check_maps(df: pd.DataFrame, exp: dict[str, np.ndarray], atol: float) -> None:
    shape = exp["a"].shape
    assert len(df) == exp["a"].size
    for col, values in exp.items():
        np.testing.assert_allclose(df[col].to_numpy().reshape(shape), values, rtol=0, atol=atol, err_msg=col)


@pytest.mark.parametrize("head", [None, 2])
def test_attention_maps(tiny: Any, head: int | None) -> None:
    run = tiny.run
    a, b = resolve(tiny.store, ["snapshot:2", "reference:joy"])
    wa = raw_pass(run, "snapshot", 2, "attn_weights")[1]
    wb = raw_pass(run, "reference", "joy", "attn_weights")[1]
    ma, mb = (wa.mean(axis=0), wb.mean(axis=0)) if head is None else (wa[head], wb[head])
    df = pair_maps(a, b, "attention", layer=1, head=head)
    _check_maps(df, _expected_maps(ma, mb), TOL)
    assert (df["rows_a"] == 39).all() and (df["cols_b"] == 35).all() and df["row"].max() == 34
    # A / |B| is not symmetric: a swapped pair shows
    swapped = pair_maps(b, a, "attention", layer=1, head=head)
    assert not np.allclose(swapped["ratio"], df["ratio"])
    np.testing.assert_allclose(swapped["abs_diff"], df["abs_diff"], atol=TOL)


def test_score_maps_are_gqa_aware(tiny: Any) -> None:
    run = tiny.run
    arch = run.meta["model"]["arch"]
    heads, kv, dim = arch["num_attention_heads"], arch["num_key_value_heads"], arch["head_dim"]
    assert kv < heads  # the tiny llama groups query heads
    a, b = resolve(tiny.store, ["reference:fear", "snapshot:0"])
    sa = np_scores(raw_pass(run, "reference", "fear", "q")[2], raw_pass(run, "reference", "fear", "k")[2], heads, kv, dim)
    sb = np_scores(raw_pass(run, "snapshot", 0, "q")[2], raw_pass(run, "snapshot", 0, "k")[2], heads, kv, dim)
    df = pair_maps(a, b, "scores", layer=2)
    _check_maps(df, _expected_maps(sa.mean(axis=0), sb.mean(axis=0)), 1e-10)
    df3 = pair_maps(a, b, "scores", layer=2, head=3)
    _check_maps(df3, _expected_maps(sa[3], sb[3]), 1e-10)


def test_qkv_maps(tiny: Any) -> None:
    run = tiny.run
    a, b = resolve(tiny.store, ["initial", "reference:calm"])
    qa = [raw_state(run, "initial", s) for s in ("q", "k", "v")]
    qb = [raw_pass(run, "reference", "calm", s)[:, -1] for s in ("q", "k", "v")]
    df = pair_maps(a, b, "qkv")
    _check_maps(df, _expected_maps(np_qkv_last(*qa), np_qkv_last(*qb)), 1e-6)  # float32 arithmetic
    assert df["row"].unique().tolist() == run.layers
    # a choice of layers keeps those rows, in order
    chosen = run.layers[1:3]
    part = pair_maps(a, b, "qkv", layers=chosen)
    idx = [run.layers.index(layer) for layer in chosen]
    _check_maps(part, _expected_maps(np_qkv_last(*qa)[idx], np_qkv_last(*qb)[idx]), 1e-6)
    assert part["row"].unique().tolist() == chosen


@pytest.mark.parametrize("kind", ["attention", "scores"])
def test_a_head_out_of_range_names_the_heads_there_are(tiny: Any, kind: str) -> None:
    heads = tiny.run.meta["model"]["arch"]["num_attention_heads"]
    a, b = resolve(tiny.store, ["snapshot:2", "reference:joy"])
    with pytest.raises(SelectionError, match=rf"^layer 1 has heads 0\.\.{heads - 1}, not {heads}$"):
        pair_maps(a, b, kind, layer=1, head=heads)
    pair_maps(a, b, kind, layer=1, head=-heads)  # negative heads count from the end, as in NumPy


# ---- the CLI -----------------------------------------------------------------------------
def test_cli_pair_equals_python(synth_store: Any) -> None:
    r0, r1, _ = synth_store.runs(["all"])
    items = [f"{r0.id}@initial", f"{r1.id}@reference:joy"]
    a, b = resolve(synth_store, items)
    res = pair_metrics(a, b, layers=[1, 2], frac=0.2)
    for what, expected in (("vectors", res.per_layer), ("summary", res.summary)):
        out = _cli(synth_store, "pair", *items, "--what", what, "--layers", "1-2", "--frac", "0.2", "--format", "csv")
        assert out.exit_code == 0, out.output
        got = _csv(out.stdout)
        assert list(got.columns) == list(expected.columns)
        for col in expected.select_dtypes("number").columns:
            np.testing.assert_allclose(got[col], expected[col].astype(float), rtol=1e-12, err_msg=col)


def test_cli_pair_passes_and_maps_equal_python(tiny: Any) -> None:
    a, b = resolve(tiny.store, ["step:0", "snapshot:3"])
    cases = {
        ("--what", "passes", "--source", "attn_out"): full_pair(a, b, ["attn_out"]),
        ("--what", "attention", "--layer", "0", "--head", "1"): pair_maps(a, b, "attention", 0, 1),
    }
    for args, expected in cases.items():
        out = _cli(tiny.store, "pair", "step:0", "snapshot:3", *args, "--format", "csv")
        assert out.exit_code == 0, out.output
        got = _csv(out.stdout)
        assert len(got) == len(expected)
        for col in ("mean_cosine", "min_cosine", "jaccard", "a", "ratio"):
            if col in expected:
                np.testing.assert_allclose(got[col], expected[col], rtol=1e-12, err_msg=col)


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["pair", "final"], ("Missing argument",)),  # click's own usage error
        (["pair", "nope@final", "final"], ("nope",)),
        (["pair", "x@", "final"], ("no state after '@'",)),
        (["pair", "@final", "final"], ("no run before '@'",)),
        (["pair", "a@b@final", "final"], ("more than one '@'",)),
        (["pair", "final", "step:x"], ("not a whole number",)),
        (["pair", "final", "initial", "--runs", "all"], ("takes 2 state(s), got 6",)),
        (["pair", "final", "initial", "--what", "attention", "--layer", "0"], ("attn_weights",)),
        (["pair", "final", "initial", "--source", "embeddings"], ("not a per-layer vector source",)),
    ],
)
def test_cli_pair_bad_input_is_one_line(synth_store: Any, args: list[str], needles: tuple[str, ...]) -> None:
    res = _cli(synth_store, *args)
    if needles == ("Missing argument",):
        assert res.exit_code == 2 and "Missing argument" in res.output
        return
    _one_line_error(res, *needles)


def test_cli_maps_need_a_layer(tiny: Any) -> None:
    _one_line_error(_cli(tiny.store, "pair", "step:0", "snapshot:3", "--what", "scores"), "--layer")
