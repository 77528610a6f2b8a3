"""Logit lens against an independent computation: the model's own modules applied with
torch to vectors read straight from Zarr, and log-softmax of the stored logits.

The tiny random models predict almost uniformly (KL ~1e-2 either way), which hides a
reversed KL; the tests of its direction use peaked distributions instead: synthetic
log-probs, and the tiny model with its LM head scaled up."""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from actstore.query.logit_lens import kl_from_final, logit_lens, logit_lens_records, write_logit_lens_json

from .helpers import raw

lens_module = importlib.import_module("actstore.query.logit_lens")  # the package re-exports the function


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_logit_lens_matches_independent_computation(model_run: Any, tmp_path: Path) -> None:
    run, loaded = model_run.run, model_run.loaded
    df = logit_lens(run, loaded, steps=[0, -1], top_k=5)
    assert len(df) == 2 * len(run.layers)
    hidden = raw(run, "hidden_out")
    model = loaded.model
    final_norm, head = model.model.norm, model.lm_head  # llama layout, independent of resolve_sites
    for step, pos in ((0, run.prompt_len - 1), (run.n_steps - 1, run.n_positions - 1)):
        with torch.inference_mode():
            h = torch.from_numpy(hidden[:, pos].astype(np.float32))
            expected = _log_softmax(head(final_norm(h)).double().numpy())  # (L, V)
        sub = df[df.step == step].sort_values("layer")
        assert (sub["position"] == pos).all()
        kl = (np.exp(expected) * (expected - expected[-1])).sum(-1)  # KL(layer || final)
        np.testing.assert_allclose(
            sub["kl_from_final"], np.maximum(kl, 0), rtol=1e-4, atol=2e-4
        )  # float32 lens
        np.testing.assert_array_equal(sub["argmax_id"], expected.argmax(-1))
        np.testing.assert_allclose(sub["argmax_logprob"], expected.max(-1), rtol=1e-4, atol=2e-4)
        top = sub["top"].iloc[3 % len(sub)]
        assert [t["id"] for t in top] == list(np.argsort(-expected[3 % len(sub)])[:5])
        # the last layer's lens is the model's own next-token distribution
        if "logits" in run.sources:
            stored = _log_softmax(raw(run, "logits")[pos])
            assert sub["argmax_id"].iloc[-1] == stored.argmax()
            assert sub["argmax_logprob"].iloc[-1] == pytest.approx(stored.max(), abs=2e-2)
        assert sub["kl_from_final"].iloc[-1] == pytest.approx(0, abs=1e-6)

    path = write_logit_lens_json(df, tmp_path / "logit_lens.json")
    records = json.loads(path.read_text())
    assert len(records) == len(df)
    assert set(records[0]) == {"step", "layer", "argmax_token", "argmax_logprob", "kl_from_final", "top"}
    assert set(records[0]["top"][0]) == {"token", "logprob"}


def test_logit_lens_position_out_of_range(model_run: Any) -> None:
    from actstore.errors import SelectionError

    with pytest.raises(SelectionError):
        logit_lens(model_run.run, model_run.loaded, steps=[1], position=1)


def _kl(p_log: np.ndarray, q_log: np.ndarray) -> np.ndarray:
    """KL(p || q) along the last axis, by hand."""
    return (np.exp(p_log) * (p_log - q_log)).sum(-1)


def test_kl_from_final_is_layer_to_final() -> None:
    # A peaked layer against a flatter final: KL(layer||final) and KL(final||layer) differ ~2x.
    logits = np.array([[9.0, 0.0, 0.0, 0.0, 0.0], [2.0, 1.0, 0.0, 0.0, 0.0], [0.0, 4.0, 0.0, 1.0, 0.0]])
    logp = _log_softmax(logits)
    final = logp[-1]
    want, reverse = _kl(logp, final), _kl(final, logp)
    assert abs(want[0] - reverse[0]) > 1.0  # the two directions are far apart here
    got = kl_from_final(torch.from_numpy(logp), torch.from_numpy(final)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)  # float64 in, float64 out
    assert got[-1] == 0


def _peaked(loaded: Any, scale: float) -> Any:
    """A copy of ``loaded`` whose LM head is ``scale`` times larger: the stored hidden
    states are unchanged (the head acts after them) but each layer's lens is peaked."""
    import copy
    import dataclasses

    model = copy.deepcopy(loaded.model)
    with torch.no_grad():
        model.lm_head.weight.mul_(scale)
    return dataclasses.replace(loaded, model=model)


def _hand_lens(loaded: Any, hidden: np.ndarray) -> np.ndarray:
    """(L, V) log-probs: the llama final norm and head by name, log-softmax in NumPy."""
    model = loaded.model
    with torch.inference_mode():
        logits = model.lm_head(model.model.norm(torch.from_numpy(hidden.astype(np.float32))))
    return _log_softmax(logits.double().numpy())


def test_logit_lens_kl_direction_on_peaked_model(tiny: Any) -> None:
    run, loaded = tiny.run, _peaked(tiny.loaded, 200.0)
    df = logit_lens(run, loaded, steps=[0], top_k=3).sort_values("layer")
    expected = _hand_lens(loaded, raw(run, "hidden_out")[:, int(df["position"].iloc[0])])
    want, reverse = _kl(expected, expected[-1]), _kl(expected[-1], expected)
    # peaked enough that a swapped direction is off by far more than the tolerance
    assert np.abs(want - reverse)[:-1].min() > 0.5, (want, reverse)
    np.testing.assert_allclose(df["kl_from_final"], want, rtol=1e-3, atol=1e-3)  # float32 lens


def test_logit_lens_layers_measures_from_last_captured_layer(tiny: Any, monkeypatch: Any) -> None:
    run, loaded = tiny.run, _peaked(tiny.loaded, 200.0)
    assert len(run.layers) >= 3
    chosen = list(run.layers[:2])  # leaves the last captured layer out
    reads: list[Any] = []
    select = lens_module.select
    monkeypatch.setattr(lens_module, "select", lambda *a, **k: reads.append(a) or select(*a, **k))
    df = logit_lens(run, loaded, steps=[0], top_k=3, layers=chosen).sort_values("layer")
    assert len(reads) == 1  # the reference layer comes in the same read
    assert df["layer"].tolist() == chosen
    hidden = raw(run, "hidden_out")[:, int(df["position"].iloc[0])]
    expected = _hand_lens(loaded, hidden)  # every captured layer
    want = _kl(expected, expected[-1])[: len(chosen)]
    assert np.abs(want - _kl(expected[:2], expected[1])).max() > 0.5  # last selected != last captured
    np.testing.assert_allclose(df["kl_from_final"], want, rtol=1e-3, atol=1e-3)
    np.testing.assert_array_equal(df["argmax_id"], expected[: len(chosen)].argmax(-1))



def test_logit_lens_reads_and_projects_each_layer_once(tiny: Any, monkeypatch: Any) -> None:
    """Chosen layers that include the last captured one: that read serves as the KL
    reference too, so no layer is read or sent through the LM head twice."""
    run, loaded = tiny.run, tiny.loaded
    chosen = [run.layers[0], run.layers[-1]]
    reads: list[Any] = []
    select = lens_module.select
    monkeypatch.setattr(lens_module, "select", lambda *a, **k: reads.append(a[3]) or select(*a, **k))
    projected: list[int] = []
    make_lens = lens_module.lens_function

    def counting_lens(model: Any) -> Any:
        lens = make_lens(model)
        return lambda h: projected.append(h.shape[0]) or lens(h)

    monkeypatch.setattr(lens_module, "lens_function", counting_lens)
    df = logit_lens(run, loaded, steps=[0, 1], top_k=3, layers=chosen)
    assert reads == [chosen] and projected == [len(chosen)] * 2  # one read; per step, each layer once
    assert sorted(df["layer"].unique()) == chosen
    assert (df.loc[df["layer"] == run.layers[-1], "kl_from_final"] == 0).all()

def test_records_are_plain_python() -> None:
    # Columns that hold NumPy scalars (object dtype, as from concatenating mixed frames)
    # still give JSON-ready records.
    df = pd.DataFrame({
        "step": pd.Series([np.int64(0), np.int64(2)], dtype=object), "layer": [1, 1],
        "argmax_token": ["a", "b"], "argmax_logprob": pd.Series([np.float32(-0.5), -1.0], dtype=object),
        "kl_from_final": [0.25, 0.0], "top": [[{"token": "a", "id": 3, "logprob": -0.5}], []],
    })  # fmt: skip
    records = logit_lens_records(df)
    assert records[0] == {"step": 0, "layer": 1, "argmax_token": "a", "argmax_logprob": -0.5,
                          "kl_from_final": 0.25, "top": [{"token": "a", "logprob": -0.5}]}  # fmt: skip
    assert type(records[0]["step"]) is int and type(records[0]["argmax_logprob"]) is float
    assert json.loads(json.dumps(records)) == records


def test_logit_lens_on_a_float16_store_with_chosen_layers(tmp_path: Path) -> None:
    # A synthetic float16 run read through the tiny llama (float32): the stored vectors are
    # widened to the model's dtype; layers 1 and 2 (not a prefix) are measured against the
    # last captured layer 3; by default the top 10 tokens are kept.
    from actstore.store.store import ActStore
    from actstore.testing import HIDDEN, tiny_loaded

    from .synth import write_synthetic_run

    store = ActStore.open(tmp_path / "s.zarr", create=True)
    run = store.run(write_synthetic_run(store, n_layers=4, prompt_len=5, n_steps=3, width=HIDDEN,
                                        sources=("hidden_in",), n_snapshots=0, labels=()))  # fmt: skip
    loaded = _peaked(tiny_loaded("llama"), 50.0)
    df = logit_lens(run, loaded, steps=[0, -1], layers=[1, 2])
    assert df["layer"].tolist() == [1, 2, 1, 2] and (df["run"] == run.id).all()
    hidden = raw(run, "hidden_out")  # (L, T, W) of float16 values
    for step, pos in ((0, run.prompt_len - 1), (run.n_steps - 1, run.n_positions - 1)):
        expected = _hand_lens(loaded, hidden[:, pos])  # every layer, float32 lens
        sub = df[df.step == step]
        assert (sub["position"] == pos).all()
        np.testing.assert_allclose(sub["kl_from_final"], _kl(expected, expected[3])[1:3], rtol=1e-3, atol=1e-3)
        np.testing.assert_array_equal(sub["argmax_id"], expected[1:3].argmax(-1))
        assert sub["argmax_token"].tolist() == [loaded.tokenizer.decode([int(i)]) for i in sub["argmax_id"]]
        # float16 vectors widened to float32 before the lens: the same float32 arithmetic
        # as by hand (a float16 lens input would be off by ~1e-3)
        np.testing.assert_allclose(sub["argmax_logprob"], expected[1:3].max(-1), rtol=1e-5, atol=1e-5)
        for top, row in zip(sub["top"], expected[1:3], strict=True):
            assert [t["id"] for t in top] == list(np.argsort(-row)[:10])


def test_lens_function_applies_the_gemma2_softcap() -> None:
    from actstore.query.logit_lens import lens_function
    from actstore.testing import HIDDEN, tiny_model

    model, _ = tiny_model("gemma2")
    model.config.final_logit_softcapping = 0.05  # small: the cap changes most logits a lot
    h = torch.from_numpy(np.random.default_rng(0).standard_normal((3, HIDDEN)).astype(np.float32))
    with torch.inference_mode():
        plain = model.lm_head(model.model.norm(h))  # gemma2 layout, by name
        got = lens_function(model)(h)
    expected = torch.tanh(plain / 0.05) * 0.05
    assert (plain.abs() > 0.05).float().mean() > 0.5  # most logits are squashed
    torch.testing.assert_close(got, expected)


def test_logit_lens_json_format_and_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    df = pd.DataFrame({
        "step": [0], "layer": [1], "argmax_token": ["é"], "argmax_logprob": [-0.5], "kl_from_final": [0.25],
        "top": [[{"token": "é", "id": 3, "logprob": -0.5}]],
    })  # fmt: skip
    path = write_logit_lens_json(df, tmp_path / "new" / "nested" / "lens.json")  # folders made
    text = path.read_text(encoding="utf-8")
    assert text.startswith('[\n  {\n    "step": 0,\n    "layer": 1,\n    "argmax_token": "é",')  # the seed's layout
    assert json.loads(text)[0]["top"] == [{"token": "é", "logprob": -0.5}]
    from actstore.errors import OutputError

    with pytest.raises(OutputError, match=rf"^output file {tmp_path}: a folder, not a file"):
        write_logit_lens_json(df, tmp_path)

    def full(*args: Any, **kwargs: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full)
    target = tmp_path / "full.json"
    with pytest.raises(OutputError, match=rf"^output file {target}: no space left on device \(free some space\)$"):
        write_logit_lens_json(df, target)


def test_check_request_before_the_model_is_loaded(synth_store: Any) -> None:
    from actstore.errors import SelectionError
    from actstore.query.logit_lens import check_request

    run = synth_store.runs(["all"])[0]
    P, T = run.prompt_len, run.n_positions
    assert check_request(run, None) == (list(range(run.n_steps)), [P - 1, *range(P, T)])  # every step
    assert check_request(run, [0], position=0, top_k=1) == ([0], [0])  # top 1 is allowed
    assert check_request(run, [-1], position=-1, layers=run.layers[:1]) == ([run.n_steps - 1], [T - 1])
    with pytest.raises(SelectionError, match=r"^--top-k 0: give how many top tokens"):
        check_request(run, None, top_k=0)
    with pytest.raises(SelectionError, match=r"did not capture layer\(s\) \[99\]"):
        check_request(run, None, layers=[99])  # checked here, not after loading the model
    with pytest.raises(SelectionError, match=r"^step 1 computed 1 position\(s\); position 1 is out of range$"):
        check_request(run, [1], position=1)
