"""Captured tensors against independent computations: HF's own outputs and plain torch.

Every family runs a real (tiny, random) model through actstore's capture and the store;
the expected values come from HF's ``output_hidden_states`` / logits / ``generate`` on
the same tokens, or from calling the model's own submodules directly.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
import zarr

from actstore.capture.prompts import render_ids
from actstore.capture.runner import capture_run
from actstore.models.architectures import resolve_sites
from actstore.store.store import ActStore
from actstore.testing import FAMILIES

from .conftest import MESSAGES, REFERENCES, hf_forward, loaded_tiny, make_scenario

ATOL = 2e-5


@pytest.fixture(scope="module")
def captured(request: Any, tmp_path_factory: Any) -> tuple[Any, Any]:
    """(run, loaded model): the default scenario captured once per family and read by
    every test parametrized with it (module scope: pytest runs a family's tests together)."""
    loaded = loaded_tiny(request.param)
    store = ActStore.open(tmp_path_factory.mktemp(request.param) / "store.zarr", create=True)
    return store.run(capture_run(make_scenario(), store, loaded, progress=False).run_id), loaded


@pytest.mark.parametrize("captured", FAMILIES, indirect=True)
def test_residual_stream_and_logits_match_hf(captured: tuple[Any, Any]) -> None:
    run, loaded = captured
    tokens = run.tokens()
    out = hf_forward(loaded.model, tokens)
    hs = [h[0].numpy() for h in out.hidden_states]
    n_layers = len(run.layers)
    hin = run.array("hidden_in").compute()
    hout = run.array("hidden_out").compute()
    for layer in range(n_layers):
        # prefill and decode positions alike equal one full-sequence pass
        np.testing.assert_allclose(hin[layer], hs[layer], atol=ATOL, rtol=1e-4)
        if layer < n_layers - 1:  # HF's last entry is after the final norm
            np.testing.assert_allclose(hout[layer], hs[layer + 1], atol=ATOL, rtol=1e-4)
    sites = resolve_sites(loaded.model)
    with torch.inference_mode():
        normed = sites.final_norm(torch.from_numpy(hout[-1])).numpy()
    np.testing.assert_allclose(normed, hs[-1], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(run.array("logits").compute(), out.logits[0].numpy(), atol=1e-4, rtol=1e-4)
    # hidden_in of l+1 is hidden_out of l
    np.testing.assert_array_equal(hin[1:], hout[:-1])


@pytest.mark.parametrize("captured", FAMILIES, indirect=True)
def test_greedy_tokens_equal_generate(captured: tuple[Any, Any]) -> None:
    run, loaded = captured
    new_tokens = make_scenario().generation.max_new_tokens
    prompt = render_ids(loaded.tokenizer, MESSAGES)
    with torch.inference_mode():
        out = loaded.model.generate(
            torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False,
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            pad_token_id=loaded.tokenizer.eos_token_id,
        )  # fmt: skip
    expected = out[0, len(prompt) :].tolist()
    assert len(expected) == new_tokens  # the tiny models never emit EOS this early
    assert run.meta["generated_token_ids"] == expected
    assert run.prompt_len == len(prompt)
    assert run.n_steps == len(expected)


def test_step_records_match_hf_logits(store: Any) -> None:
    """Per-step records (read from their own array, not the run's attributes, which
    every query parses) against a log-softmax of HF's logits on the same tokens."""
    loaded = loaded_tiny("llama")
    sc = make_scenario(generation={"max_new_tokens": 4}, capture={"top_k_probs": 3})
    run = store.run(capture_run(sc, store, loaded, progress=False).run_id)
    assert "steps" not in run.group.attrs["run"] and run.meta["n_steps"] == run.n_steps == 4
    with torch.inference_mode():
        logits = loaded.model(input_ids=torch.tensor([run.tokens().tolist()])).logits[0].double()
    logprobs = torch.log_softmax(logits, -1).numpy()
    assert [s["step"] for s in run.steps] == list(range(4))
    for st in run.steps:
        lp = logprobs[run.step_positions(st["step"])[-1]]
        order = np.argsort(-lp, kind="stable")[:3]
        assert st["generated_token_id"] == st["logit_argmax_id"] == order[0]  # greedy
        assert [t["id"] for t in st["top_k"]] == order.tolist()
        np.testing.assert_allclose([t["logprob"] for t in st["top_k"]], lp[order], atol=1e-4)
    assert [s["generated_token_id"] for s in run.steps] == run.meta["generated_token_ids"]


@pytest.mark.parametrize("captured", ["llama", "qwen2", "phi3", "gpt2", "gpt_neox"], indirect=True)
def test_sublayer_sources_match_modules(captured: tuple[Any, Any]) -> None:
    """q/k/v, attn_out, MLP intermediates recomputed from the model's own modules."""
    run, loaded = captured
    family = loaded.model.config.model_type
    sites = resolve_sites(loaded.model)
    hin = torch.from_numpy(run.array("hidden_in").compute())
    for li, ls in enumerate(sites.layers):
        up = torch.from_numpy(run.array("mlp_up").compute()[li])
        act = torch.from_numpy(run.array("mlp_act").compute()[li])
        down_in = torch.from_numpy(run.array("mlp_down_in").compute()[li])
        down_out = torch.from_numpy(run.array("mlp_down_out").compute()[li])
        with torch.inference_mode():
            torch.testing.assert_close(ls.down(down_in), down_out, atol=1e-5, rtol=1e-4)
            if sites.gated_mlp:
                gate = torch.from_numpy(run.array("mlp_gate").compute()[li])
                torch.testing.assert_close(ls.act(gate), act, atol=1e-5, rtol=1e-4)
                torch.testing.assert_close(act * up, down_in, atol=1e-6, rtol=1e-5)
            else:
                torch.testing.assert_close(ls.act(up), act, atol=1e-5, rtol=1e-4)
        if family in ("llama", "qwen2"):
            layer = ls.block
            with torch.inference_mode():
                x = layer.input_layernorm(hin[li])
                for name in ("q", "k", "v"):
                    proj = getattr(layer.self_attn, f"{name}_proj")(x)
                    np.testing.assert_allclose(run.array(name).compute()[li], proj.numpy(), atol=1e-5)
    # llama-style blocks: hidden_out = hidden_in + attn_out + mlp_down_out
    if sites.residual_is_sum():
        total = run.array("hidden_in") + run.array("attn_out") + run.array("mlp_down_out")
        np.testing.assert_allclose(total.compute(), run.array("hidden_out").compute(), atol=1e-5)


@pytest.mark.parametrize("captured", FAMILIES, indirect=True)
def test_attention_rows_are_causal_distributions(captured: tuple[Any, Any]) -> None:
    run, _ = captured
    w = run.array("attn_weights").compute()
    T = run.n_positions
    assert w.shape[2:] == (T, T)
    np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-4)
    upper = np.triu(np.ones((T, T), dtype=bool), k=1)
    assert np.all(w[..., upper] == 0)


@pytest.mark.parametrize("captured", ["llama", "gpt2", "gemma2"], indirect=True)
def test_snapshots_and_references_equal_separate_prefills(captured: tuple[Any, Any]) -> None:
    run, loaded = captured
    # One snapshot per message prefix, then the conversation with the reply as an assistant turn.
    reply = {"role": "assistant", "content": run.meta["generated_text"]}
    sets = [("snapshots", [MESSAGES[: k + 1] for k in range(len(MESSAGES))] + [[*MESSAGES, reply]])]
    sets.append(("references", [r["messages"] for r in REFERENCES]))
    for what, message_lists in sets:
        hin = getattr(run, what)("hidden_in").compute()
        hout = getattr(run, what)("hidden_out").compute()
        assert hin.shape[0] == len(message_lists)
        for row, msgs in enumerate(message_lists):
            ids = np.asarray(render_ids(loaded.tokenizer, msgs))
            hs = [h[0, -1].numpy() for h in hf_forward(loaded.model, ids).hidden_states]
            for li in range(len(run.layers) - 1):
                np.testing.assert_allclose(hin[row, li], hs[li], atol=1e-4, rtol=1e-4)
                np.testing.assert_allclose(hout[row, li], hs[li + 1], atol=1e-4, rtol=1e-4)
    assert [s["role"] for s in run.snapshot_index] == [m["role"] for m in MESSAGES] + ["assistant"]
    assert [s["generated"] for s in run.snapshot_index] == [False] * len(MESSAGES) + [True]
    assert run.reference_labels == ["joy", "fear"]


def test_layer_subset_keeps_real_indices(store: Any) -> None:
    loaded = loaded_tiny("llama")
    sc = make_scenario(capture={"layers": [0, 2], "store_dtype": "float32"})
    run = store.run(capture_run(sc, store, loaded, progress=False).run_id)
    assert run.layers == [0, 2]
    out = hf_forward(loaded.model, run.tokens())
    np.testing.assert_allclose(run.array("hidden_in").compute()[1], out.hidden_states[2][0].numpy(), atol=ATOL)
    np.testing.assert_allclose(run.array("hidden_out").compute()[0], out.hidden_states[1][0].numpy(), atol=ATOL)
    assert run.array("q").shape[0] == 2
    assert run.meta["residual_boundaries"] == [0, 1, 2, 3]


def test_sampling_reproduces_with_seed(store: Any) -> None:
    loaded = loaded_tiny("llama")
    gen = {"max_new_tokens": 8, "do_sample": True, "temperature": 1.5, "top_k": 50, "top_p": 0.95, "seed": 7}
    a = capture_run(make_scenario(generation=gen), store, loaded, progress=False)
    b = capture_run(make_scenario(generation=gen), store, loaded, progress=False)
    c = capture_run(make_scenario(generation={**gen, "seed": 8}), store, loaded, progress=False)
    ta, tb, tc = (store.run(r.run_id).meta["generated_token_ids"] for r in (a, b, c))
    assert ta == tb
    assert ta != tc
    greedy = capture_run(make_scenario(generation={"max_new_tokens": 8}), store, loaded, progress=False)
    assert store.run(greedy.run_id).meta["generated_token_ids"] != ta


def test_store_dtypes(store: Any) -> None:
    loaded = loaded_tiny("llama")
    runs = {}
    for dt in ("float32", "float16", "bfloat16"):
        sc = make_scenario(capture={"store_dtype": dt, "attention_weights": False})
        runs[dt] = store.run(capture_run(sc, store, loaded, progress=False).run_id)
    ref = runs["float32"].array("hidden_out").compute()
    half = runs["float16"].array("hidden_out")
    assert half.dtype == np.float16
    np.testing.assert_array_equal(half.compute(), ref.astype(np.float16))
    bf = runs["bfloat16"]
    raw = zarr.open_array(store=store.zstore, path=f"runs/{bf.id}/acts/residual", mode="r")
    assert raw.dtype == np.uint16 and raw.attrs["actstore_dtype"] == "bfloat16"
    expected = torch.from_numpy(ref).to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(bf.array("hidden_out").compute(), expected)


def test_flags_switch_sources_off(store: Any) -> None:
    loaded = loaded_tiny("llama", eager=False)
    sc = make_scenario(capture={"attention_weights": False, "qkv": False, "mlp": False, "logits": False,
                                "top_k_probs": 0})  # fmt: skip
    run = store.run(capture_run(sc, store, loaded, progress=False).run_id)
    assert set(run.sources) == {"hidden_in", "hidden_out", "embeddings"}
    assert all(s["top_k"] == [] for s in run.steps)
    with torch.inference_mode():
        emb = loaded.model.get_input_embeddings()(torch.tensor(run.tokens())).numpy()
    np.testing.assert_allclose(run.array("embeddings").compute(), emb, atol=1e-6)
    # snapshots still hold all four residual sources
    assert run.snapshots("attn_out").shape[0] == len(MESSAGES) + 1  # + the generated reply


def test_run_at_each_message_makes_one_run_per_prefix(store: Any) -> None:
    from actstore.capture.runner import capture

    loaded = loaded_tiny("llama")
    sc = make_scenario(prompt={"messages": MESSAGES, "run_at_each_message": True},
                       generation={"max_new_tokens": 2})  # fmt: skip
    results = capture(sc, store, loaded=loaded, progress=False)
    assert len(results) == len(MESSAGES)
    lens = [store.run(r.run_id).meta["scenario"]["prompt"]["messages"] for r in results]
    assert [len(m) for m in lens] == [1, 2, 3, 4]


def test_capture_loads_the_scenario_model_itself(tiny_folder: Any, tmp_path: Any) -> None:
    """``capture`` without a loaded model loads the scenario's ``model.id`` (a saved
    folder here) and its residual stream is that model's own, as HF computes it."""
    from transformers import AutoModelForCausalLM

    from actstore.capture.runner import capture
    from actstore.store.store import ActStore

    sc = make_scenario(model={"id": str(tiny_folder)}, generation={"max_new_tokens": 2})
    [res] = capture(sc, str(tmp_path / "s.zarr"), progress=False)
    run = ActStore.open(tmp_path / "s.zarr").run(res.run_id)
    model = AutoModelForCausalLM.from_pretrained(tiny_folder, torch_dtype=torch.float32).eval()
    out = hf_forward(model, run.tokens())
    hout = run.array("hidden_out").compute()
    for layer in range(len(run.layers) - 1):
        np.testing.assert_allclose(hout[layer], out.hidden_states[layer + 1][0].numpy(), atol=ATOL, rtol=1e-4)


def test_tokens_and_position_steps_cover_every_fed_position(store: Any) -> None:
    """``tokens`` holds the prompt's ids then the generated ones that were fed back (not
    the last, which no pass read); ``position_step`` says which forward pass wrote each
    position: 0 for the prompt, then 1, 2, ... one per decode step. Both read with zarr,
    against the chat template's ids and HF's greedy ``generate``."""
    loaded = loaded_tiny("llama")
    sc = make_scenario(generation={"max_new_tokens": 5})
    res = capture_run(sc, store, loaded, progress=False)
    prompt = render_ids(loaded.tokenizer, MESSAGES)
    with torch.inference_mode():
        out = loaded.model.generate(torch.tensor([prompt]), max_new_tokens=5, do_sample=False,
                                    attention_mask=torch.ones(1, len(prompt), dtype=torch.long))  # fmt: skip
    generated = out[0, len(prompt):].tolist()
    group = zarr.open_group(store=str(store.location), path=f"runs/{res.run_id}", mode="r")
    tokens = np.asarray(group["tokens"][:]).tolist()
    steps = np.asarray(group["position_step"][:]).tolist()
    assert tokens == prompt + generated[:-1]
    assert steps == [0] * len(prompt) + list(range(1, len(generated)))


def test_a_run_records_the_software_and_machine_it_ran_on(store: Any) -> None:
    import platform

    import transformers
    import zarr

    import actstore

    loaded = loaded_tiny("llama")
    run = store.run(capture_run(make_scenario(generation={"max_new_tokens": 1}), store, loaded, progress=False).run_id)
    assert run.meta["env"] == {
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "numpy": np.__version__, "zarr": zarr.__version__, "actstore": actstore.__version__, "device": "cpu",
        "platform": platform.platform(),
    }  # fmt: skip
