"""query.depth: one full pass through depth, and each step's next-token distribution,
against plain NumPy on arrays read with zarr (tiny llama run, float32 store).

Tolerances: float64 on both sides from the same float32 values, so only summation
order differs: 1e-12 absolute for cosines, ratios and entropies of order 1-10 (1e-10
for q.k scores and log-sum-exp over the 49,152-token vocabulary); qkv_last and attention
entropies are float32 arithmetic, compared to 1e-6 relative.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from actstore.cli import main
from actstore.errors import SelectionError
from actstore.query import (
    attention_entropy,
    convergence,
    effective_depth,
    next_token,
    qk_scores,
    qkv_last,
    resolve,
)
from actstore.query.depth import qk_score_array

from .helpers import np_qkv_last, np_scores, raw, raw_pass, raw_state

TOL = 1e-12
# Row entropies are float32 arithmetic (stored by capture, or computed from the weights):
# relative error ~1e-7 for rows of tens of keys, so 1e-6 relative; a wrong row, head or
# layer is off by far more (entropies of different rows differ by 1e-3 and up).
ENTROPY_RTOL = 1e-6


def _arch(run: Any) -> tuple[int, int, int]:
    a = run.meta["model"]["arch"]
    return a["num_attention_heads"], a["num_key_value_heads"], a["head_dim"]


def _cos_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return (x * y).sum(-1) / (np.linalg.norm(x, axis=-1) * np.linalg.norm(y, axis=-1))


# ---- convergence ------------------------------------------------------------------------
@pytest.mark.parametrize(("state", "layers"), [("step:0", None), ("reference:joy", [0, 2]), ("step:-1", None)])
def test_convergence(tiny: Any, state: str, layers: list[int] | None) -> None:
    run = tiny.run
    (sel,) = resolve(tiny.store, [state])
    h = raw_pass(run, "reference", "joy", "hidden_out") if state.startswith("reference") else (
        raw(run, "hidden_out")[:, : run.prompt_len] if state == "step:0" else raw(run, "hidden_out")[:, -1:]
    )  # fmt: skip
    lay = layers or run.layers
    h = h[lay]
    df = convergence(sel, "hidden_out", layers)
    assert df["layer"].tolist() == lay[:-1] and df["next_layer"].tolist() == lay[1:]
    cos = np.stack([_cos_rows(h[i], h[i + 1]) for i in range(len(lay) - 1)])
    upd = np.stack([np.linalg.norm(h[i + 1] - h[i], axis=-1) / np.linalg.norm(h[i], axis=-1) for i in range(len(lay) - 1)])
    np.testing.assert_allclose(df["cos_last"], cos[:, -1], atol=TOL)
    np.testing.assert_allclose(df["cos_mean"], cos.mean(axis=1), atol=TOL)
    np.testing.assert_allclose(df["update_last"], upd[:, -1], atol=TOL)
    np.testing.assert_allclose(df["update_mean"], upd.mean(axis=1), atol=TOL)
    assert (df["tokens"] == h.shape[1]).all()
    if h.shape[1] > 1:  # last token and mean differ: a swapped column or axis shows
        assert not np.allclose(df["update_last"], df["update_mean"])


def test_effective_depth_is_the_start_of_the_settled_tail() -> None:
    conv = pd.DataFrame({
        "run": "r", "state": "s", "source": "hidden_out", "layer": [0, 1, 2, 3],
        "cos_last": [0.995, 0.98, 0.995, 0.999],  # first >= 0.99 is layer 0, but it does not stay
        "cos_mean": [0.999, 0.999, 0.999, 0.98],  # the last pair is below: never settled
    })  # fmt: skip
    row = effective_depth(conv).iloc[0]
    assert row["effective_depth_last"] == 2 and pd.isna(row["effective_depth_mean"])
    assert (row["run"], row["state"], row["source"], row["threshold"]) == ("r", "s", "hidden_out", 0.99)
    lower = effective_depth(conv, threshold=0.97)
    assert list(lower.columns) == ["run", "state", "source", "threshold", "effective_depth_last",
                                   "effective_depth_mean"]  # fmt: skip
    assert lower.iloc[0]["effective_depth_mean"] == 0 and lower.iloc[0]["threshold"] == 0.97


def test_effective_depth_on_a_run(tiny: Any) -> None:
    (sel,) = resolve(tiny.store, ["step:0"])
    conv = convergence(sel)
    # a threshold between the two adjacent cosines: the answer depends on which is which
    lo, hi = sorted(conv["cos_mean"])
    row = effective_depth(conv, threshold=(lo + hi) / 2).iloc[0]
    expected = conv["layer"].iloc[1] if conv["cos_mean"].iloc[1] == hi else None
    assert (pd.isna(row["effective_depth_mean"]) and expected is None) or row["effective_depth_mean"] == expected


# ---- attention entropy ---------------------------------------------------------------
def _entropy(w: np.ndarray) -> np.ndarray:
    """(L, H) mean over query rows of -sum p ln p."""
    logp = np.log(w, where=w > 0, out=np.zeros_like(w))
    return (-(w * logp).sum(axis=-1)).mean(axis=-1)


@pytest.mark.parametrize("state", ["step:0", "step:3", "snapshot:2"])
def test_attention_entropy(tiny: Any, state: str) -> None:
    run = tiny.run
    (sel,) = resolve(tiny.store, [state])
    w = raw(run, "attn_weights")
    if state == "step:0":
        w = w[:, :, : run.prompt_len, : run.prompt_len]
    elif state == "step:3":
        p = run.prompt_len + 2  # decode step 3 fed position prompt_len + 2
        w = w[:, :, p : p + 1, : p + 1]
    else:
        w = raw_pass(run, "snapshot", 2, "attn_weights")
    exp = _entropy(w)
    per_head = attention_entropy(sel, per_head=True)
    np.testing.assert_allclose(per_head["entropy"].to_numpy().reshape(exp.shape), exp, rtol=ENTROPY_RTOL)
    assert per_head["head"].tolist()[:4] == [0, 1, 2, 3] and (per_head["keys"] == w.shape[-1]).all()
    per_layer = attention_entropy(sel, layers=[2, 0])
    np.testing.assert_allclose(per_layer["entropy"], exp[[2, 0]].mean(axis=1), rtol=ENTROPY_RTOL)
    assert (per_layer["queries"] == w.shape[2]).all()


def _row_entropy(w: np.ndarray) -> np.ndarray:
    """(L, H, T, K) weights -> (L, T, H) entropy of every row, float64."""
    logp = np.log(w, where=w > 0, out=np.zeros_like(w))
    return (-(w * logp).sum(axis=-1)).transpose(0, 2, 1)


@pytest.mark.parametrize("prefix", ["", "passes/"])
def test_capture_stores_every_attention_row_entropy(tiny: Any, prefix: str) -> None:
    """The (L, T, heads) entropies beside the weights, for the run's positions and for the
    own rows of its full passes (zeros past a pass's length add nothing)."""
    stored = raw(tiny.run, "attn_entropy", prefix)
    exp = _row_entropy(raw(tiny.run, "attn_weights", prefix))
    assert stored.shape == exp.shape and stored.shape[0] == 3
    np.testing.assert_allclose(stored, exp, rtol=ENTROPY_RTOL, atol=1e-6)
    assert (exp > 0.05).mean() > 0.9  # rows that attend to more than themselves: not all fill


def test_attention_entropy_without_stored_rows(tiny: Any, tmp_path: Any) -> None:
    """Runs captured before row entropies were stored (and imports) compute them from the
    weights: a copy of the tiny store without them gives the same numbers."""
    import shutil

    from actstore.store.store import ActStore

    src = Path(tiny.store.location)
    copy = tmp_path / "old.zarr"
    shutil.copytree(src, copy)
    group = copy / "runs" / tiny.run.id
    gone = ("acts/attn_entropy", "passes/acts/attn_entropy")
    for path in gone:
        shutil.rmtree(group / path)
    meta = json.loads((group / "zarr.json").read_text())  # the run's consolidated metadata too
    listed = meta["consolidated_metadata"]["metadata"]
    meta["consolidated_metadata"]["metadata"] = {k: v for k, v in listed.items() if k not in gone}
    (group / "zarr.json").write_text(json.dumps(meta))
    old = ActStore.open(copy)
    assert not old.run(tiny.run.id).has_attn_entropy
    for state, w in (("snapshot:2", raw_pass(tiny.run, "snapshot", 2, "attn_weights")),
                     ("step:0", raw(tiny.run, "attn_weights")[:, :, : tiny.run.prompt_len, : tiny.run.prompt_len])):  # fmt: skip
        (sel,) = resolve(old, [state])
        got = attention_entropy(sel, per_head=True)["entropy"].to_numpy()
        np.testing.assert_allclose(got, _entropy(w).ravel(), rtol=ENTROPY_RTOL)


# ---- q.k scores and qkv_last --------------------------------------------------------------
def test_qk_scores_per_head_with_grouped_keys(tiny: Any) -> None:
    run = tiny.run
    heads, kv, dim = _arch(run)
    (sel,) = resolve(tiny.store, ["step:0"])
    q, k = raw(run, "q")[1, : run.prompt_len], raw(run, "k")[1, : run.prompt_len]
    exp = np_scores(q, k, heads, kv, dim)
    got = qk_score_array(sel, 1)
    np.testing.assert_allclose(got, exp, atol=1e-10)
    # a wrong key-head mapping (h % kv instead of h // (heads / kv)) gives other numbers
    wrong = np.stack([exp[(h % kv) * (heads // kv)] for h in range(heads)])
    assert not np.allclose(got, wrong)
    df = qk_scores(sel, 1, head=3)
    np.testing.assert_allclose(df["score"].to_numpy().reshape(exp.shape[1:]), exp[3], atol=1e-10)
    mean = qk_scores(sel, 1)
    np.testing.assert_allclose(mean["score"].to_numpy().reshape(exp.shape[1:]), exp.mean(axis=0), atol=1e-10)
    assert (mean["head"] == -1).all()


@pytest.mark.parametrize("state", ["step:0", "step:2", "snapshot:1"])
def test_mean_score_maps_are_the_mean_over_heads(tiny: Any, state: str) -> None:
    """Summing each key head's query heads before the product is the mean of the
    per-head maps (plain NumPy on q and k read from Zarr, for step:0; the per-head array
    for the others)."""
    from actstore.query.depth import mean_score_maps

    run = tiny.run
    heads, kv, dim = _arch(run)
    assert kv < heads  # grouped keys: the grouping matters
    (sel,) = resolve(tiny.store, [state])
    maps = dict(mean_score_maps(sel, run.layers))
    assert list(maps) == run.layers
    for layer in run.layers:
        np.testing.assert_allclose(maps[layer], qk_score_array(sel, layer).mean(axis=0), atol=1e-10)
    if state == "step:0":
        q, k = raw(run, "q")[1, : run.prompt_len], raw(run, "k")[1, : run.prompt_len]
        np.testing.assert_allclose(maps[run.layers[1]], np_scores(q, k, heads, kv, dim).mean(axis=0), atol=1e-10)


def _np_block_means(m: np.ndarray, fr: int, fc: int) -> np.ndarray:
    """Plain loops: bin (i, j) is the mean of rows i*fr.. and columns j*fc.. (the last
    bins hold what is left)."""
    rows, cols = -(-m.shape[0] // fr), -(-m.shape[1] // fc)
    return np.array([[m[i * fr : (i + 1) * fr, j * fc : (j + 1) * fc].mean() for j in range(cols)] for i in range(rows)])


@pytest.mark.parametrize(("max_rows", "max_cols"), [(5, 7), (4, 1000), (1000, 3), (1000, 1000)])
def test_mean_score_bins_are_block_means_of_the_map(tiny: Any, max_rows: int, max_cols: int) -> None:
    """Averaging q and k per bin before the product gives the bins of the whole map,
    uneven last bins included (the map itself from plain NumPy on q and k)."""
    from actstore.query.depth import mean_score_bins

    run = tiny.run
    heads, kv, dim = _arch(run)
    (sel,) = resolve(tiny.store, ["step:0"])
    n = run.prompt_len
    got = list(mean_score_bins(sel, run.layers, max_rows, max_cols))
    assert [g[0] for g in got] == run.layers
    for li, (_, bins, fr, fc) in enumerate(got):
        assert (fr, fc) == (-(-n // max_rows), -(-n // max_cols))
        full = np_scores(raw(run, "q")[li, :n], raw(run, "k")[li, :n], heads, kv, dim).mean(axis=0)
        np.testing.assert_allclose(bins, _np_block_means(full, fr, fc), atol=1e-10)


def test_qk_scores_of_a_decode_step_cover_every_earlier_key(tiny: Any) -> None:
    run = tiny.run
    heads, kv, dim = _arch(run)
    (sel,) = resolve(tiny.store, ["step:2"])
    p = run.prompt_len + 1
    exp = np_scores(raw(run, "q")[0, p : p + 1], raw(run, "k")[0, : p + 1], heads, kv, dim)
    got = qk_score_array(sel, 0)
    assert got.shape == (heads, 1, p + 1)
    np.testing.assert_allclose(got, exp, atol=1e-10)


@pytest.mark.parametrize("state", ["final", "initial", "reference:joy", "snapshot:generated"])
def test_qkv_last(tiny: Any, state: str) -> None:
    run = tiny.run
    (sel,) = resolve(tiny.store, [state])
    if state in ("final", "initial"):
        qkv = [raw_state(run, state, s) for s in ("q", "k", "v")]
    else:
        kind, _, key = state.partition(":")
        qkv = [raw_pass(run, kind, key, s)[:, -1] for s in ("q", "k", "v")]
    exp = np_qkv_last(*qkv)
    df = qkv_last(sel)
    np.testing.assert_allclose(df["value"].to_numpy().reshape(exp.shape), exp, rtol=1e-6, atol=1e-12)
    assert df["layer"].tolist()[:: exp.shape[1]] == run.layers


# ---- next token -----------------------------------------------------------------------
def test_next_token(tiny: Any) -> None:
    run = tiny.run
    logits = raw(run, "logits")
    last = [run.prompt_len - 1] + list(range(run.prompt_len, run.n_positions))
    z = logits[last] - logits[last].max(axis=1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    ent = -(p * np.log(p)).sum(axis=1)
    df = next_token(run)
    assert df["step"].tolist() == list(range(run.n_steps)) and df["position"].tolist() == last
    np.testing.assert_allclose(df["entropy"], ent, atol=1e-10)
    np.testing.assert_allclose(df["effective_vocab"], np.exp(ent), rtol=1e-10)
    np.testing.assert_allclose(df["top1_prob"], p.max(axis=1), atol=TOL)
    assert df["top1_token"].tolist() == p.argmax(axis=1).tolist()
    some = next_token(run, steps=[-1, 0])
    assert some["step"].tolist() == [run.n_steps - 1, 0]
    np.testing.assert_allclose(some["entropy"], ent[[-1, 0]], atol=1e-10)
    # each step's generated token is the token the next position holds (the last step's is
    # in the run's record only: nothing was fed after it)
    import zarr

    tokens = np.asarray(zarr.open_group(store=str(tiny.store.location), mode="r")[f"runs/{run.id}/tokens"][:])
    assert df["generated_token"].tolist()[:-1] == [int(tokens[p + 1]) for p in last[:-1]]


def test_next_token_of_a_step_without_a_generated_token_is_missing(tiny: Any, tmp_path: Path) -> None:
    """A step whose record has no generated token (files that do not say) shows <NA>,
    not an error, and the other steps keep theirs."""
    import shutil

    from actstore.store.store import ActStore
    from query.synth import edited_run_meta, raw_run_group

    shutil.copytree(tiny.store.location, tmp_path / "s.zarr")
    group = raw_run_group(tmp_path / "s.zarr", tiny.run.id)
    steps = json.loads(np.asarray(group["steps"][:]).tobytes())  # the run's step records, read here
    kept = steps[0]["generated_token_id"]
    del steps[-1]["generated_token_id"]
    with edited_run_meta(tmp_path / "s.zarr", tiny.run.id) as meta:
        meta["steps"] = steps  # how older runs kept them
    df = next_token(ActStore.open(tmp_path / "s.zarr").run(tiny.run.id))
    assert df["generated_token"].isna().tolist() == [False] * (len(df) - 1) + [True]
    assert df["generated_token"].iloc[0] == kept


def test_errors(tiny: Any, synth_store: Any) -> None:
    with pytest.raises(SelectionError, match="did not capture logits"):
        next_token(synth_store.runs(["latest"]))
    (pos,) = resolve(tiny.store, ["pos:3"])
    with pytest.raises(SelectionError, match="not a forward pass"):
        convergence(pos)
    (sel,) = resolve(tiny.store, ["final"])
    with pytest.raises(SelectionError, match="two or more"):
        convergence(sel, layers=[1])
    with pytest.raises(SelectionError, match="heads 0..3"):
        qk_scores(sel, 0, head=4)


# ---- the CLI ---------------------------------------------------------------------------
def _cli(store: Any, *args: str) -> Any:
    return CliRunner().invoke(main, ["query", *args, "--store", store.location])


def test_cli_depth_and_next_token_equal_python(tiny: Any) -> None:
    (sel,) = resolve(tiny.store, ["snapshot:3"])
    conv = convergence(sel, "attn_out")
    cases = {
        ("depth", "snapshot:3", "--what", "convergence", "--source", "attn_out"): conv,
        ("depth", "snapshot:3", "--what", "effective-depth", "--source", "attn_out", "--threshold", "0.2"):
            effective_depth(conv, 0.2),
        ("depth", "snapshot:3", "--what", "head-entropy", "--layers", "1-2"): attention_entropy(sel, [1, 2], True),
        ("depth", "snapshot:3", "--what", "entropy"): attention_entropy(sel),
        ("depth", "snapshot:3", "--what", "scores", "--layer", "2", "--head", "1"): qk_scores(sel, 2, 1),
        ("depth", "snapshot:3", "--what", "qkv-last", "--layers", "0"): qkv_last(sel, [0]),
        ("next-token", "--steps", "0,2"): next_token(tiny.run, [0, 2]),
    }  # fmt: skip
    for args, expected in cases.items():
        res = _cli(tiny.store, *args, "--format", "csv")
        assert res.exit_code == 0, (args, res.output)
        got = pd.read_csv(io.StringIO(res.stdout))
        assert list(got.columns) == list(expected.columns) and len(got) == len(expected), args
        for col in expected.select_dtypes("number").columns:
            # CSV writes a float32 column (qkv_last) with float32's shortest repr: compare as such
            dtype = np.float32 if expected[col].dtype == np.float32 else float
            np.testing.assert_allclose(got[col].astype(dtype), expected[col].astype(dtype), rtol=1e-12,
                                       err_msg=f"{args} {col}")  # fmt: skip


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["depth", "final", "--runs", "all"], "takes 1 state(s), got 3"),
        (["depth", "pos:3"], "not a forward pass"),
        (["depth", "nope@final"], "nope"),
        (["depth", "final", "--what", "scores"], "--layer"),
        (["next-token"], "did not capture logits"),
    ],
)
def test_cli_depth_bad_input_is_one_line(synth_store: Any, args: list[str], needle: str) -> None:
    res = _cli(synth_store, *args)
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], res.stderr


def test_convergence_through_a_zero_vector_is_quietly_undefined(tmp_path: Path) -> None:
    """A position whose hidden state is zero at one layer has no direction there: the
    cosine into that layer is NaN, counted as undefined, without a NumPy warning."""
    import warnings

    from actstore.store.store import ActStore
    from query.synth import raw_run_group, write_synthetic_run

    st = ActStore.open(tmp_path / "s.zarr", create=True)
    run_id = write_synthetic_run(st, n_layers=4, prompt_len=6, n_steps=2, width=16, store_dtype="float32")
    residual = raw_run_group(tmp_path / "s.zarr", run_id)["acts/residual"]
    residual[2, 3] = np.zeros(residual.shape[-1], dtype=residual.dtype)  # hidden_out of layer 1 at position 3
    (sel,) = resolve(ActStore.open(tmp_path / "s.zarr"), [f"{run_id}@step:0"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        df = convergence(sel, "hidden_out")
    row = df[df["layer"] == 0].iloc[0]
    assert row["undefined"] == 1 and np.isfinite(row["cos_mean"])
    assert (df[df["layer"] == 2]["undefined"] == 0).all()
