"""Oracles for what the other capture tests leave thin: attention weights against HF's
``output_attentions``, fused q/k/v against the projection computed from the module's
weights, and captures split over many shards against HF position by position.

Every capture here is float32 on a float32 model, so stored values are the model's own
numbers; what differs from the oracle is only float32 summation order (a KV-cached
decode step against one full-sequence pass, a batched matmul against a hand one).

Bugs each test was seen to catch when planted: q/k (or k/v) swapped in a fused split
(fused q/k/v test); a block written from the wrong rows of a pass, vector or attention
(shards test); sliding-window rows left-aligned (attention test, gemma2; shards test).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from actstore.capture.runner import capture_run
from actstore.models.architectures import resolve_sites
from actstore.store import layout
from actstore.testing import FAMILIES, tiny_config

from .conftest import hf_forward, loaded_tiny, make_scenario

# Tolerances: measured differences on these tiny models, with a 10-50x margin, far
# below what a misplaced value moves (stored rows differ from their neighbours by
# 1e-2 or more).
# Attention weights lie in [0, 1], ~1/T = 0.02 here; a cached step and a full pass
# differ by float32 rounding of the scores (measured max 2e-8, gemma2's softcap).
ATTN_ATOL = 1e-6
# Residual values reach 7 (gemma2's scaled embeddings); summation order in the cached
# decode moves them by up to 2.3e-6 there, 3e-8 elsewhere.
RESID_ATOL = 1e-5
# Logits are O(1); measured 4.5e-7.
LOGITS_ATOL = 5e-6
# q/k/v are O(0.1-1): a hand x @ W.T + b against the module's fused matmul differs by
# float32 accumulation order only (measured 1.8e-7).
QKV_ATOL = 2e-6
NEW_TOKENS = 6  # decode steps: each appends one attention row seen only through the cache


def _capture(store: Any, family: str, **capture: Any) -> tuple[Any, Any]:
    loaded = loaded_tiny(family)
    sc = make_scenario(generation={"max_new_tokens": NEW_TOKENS}, reference_states=[],
                       capture={"store_dtype": "float32", **capture})  # fmt: skip
    run = store.run(capture_run(sc, store, loaded, progress=False).run_id)
    return run, loaded


def _assert_attention_matches(run: Any, hf_attn: tuple[Any, ...], atol: float) -> None:
    """Stored (L, heads, T, T) weights against HF's per-layer (1, heads, T, T), row by row:
    the prefill's rows, then each decode step's single row."""
    w = run.array("attn_weights").compute()
    T, P = run.n_positions, run.prompt_len
    assert w.shape == (len(run.layers), hf_attn[0].shape[1], T, T)
    for i, layer in enumerate(run.layers):
        want = hf_attn[layer][0].numpy()
        np.testing.assert_allclose(w[i, :, :P], want[:, :P], rtol=0, atol=atol,
                                   err_msg=f"layer {layer}, prefill rows")  # fmt: skip
        for p in range(P, T):
            np.testing.assert_allclose(w[i, :, p], want[:, p], rtol=0, atol=atol,
                                       err_msg=f"layer {layer}, decode position {p}")  # fmt: skip


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_weights_match_hf_output_attentions(family: str, store: Any) -> None:
    run, loaded = _capture(store, family)
    assert run.n_steps == NEW_TOKENS
    if family == "gemma2":
        # The window must be shorter than the prompt, or left- and right-aligned decode
        # rows would coincide and the oracle could not tell them apart.
        window = tiny_config("gemma2").sliding_window
        assert window < run.prompt_len
        assert "sliding_attention" in loaded.model.config.layer_types
    out = hf_forward(loaded.model, run.tokens(), attentions=True)
    _assert_attention_matches(run, out.attentions, ATTN_ATOL)


def test_an_sdpa_model_is_switched_to_eager_and_its_weights_match_hf(store: Any) -> None:
    """A model loaded with SDPA attention (which returns no weights) handed to capture
    with attention weights on: capture switches it to eager, and the weights are HF's."""
    loaded = loaded_tiny("llama", eager=False)
    assert loaded.model.config._attn_implementation != "eager"  # SDPA here: it returns no weights
    sc = make_scenario(generation={"max_new_tokens": NEW_TOKENS}, reference_states=[])
    run = store.run(capture_run(sc, store, loaded, progress=False).run_id)
    assert loaded.model.config._attn_implementation == "eager"
    _assert_attention_matches(run, hf_forward(loaded.model, run.tokens(), attentions=True).attentions, ATTN_ATOL)


@pytest.mark.parametrize("layers", [[0, 1], [2]])
def test_a_recorder_for_the_residual_alone_records_hf_hidden_states(layers: list[int]) -> None:
    """A recorder asked for hidden_in alone, with no snapshot vectors to keep (as a dataset
    capture runs it), hooks the residual stream and records every boundary of the layers:
    boundary b is HF's hidden_states[b], the stream entering layer b."""
    from actstore.capture.hooks import Recorder

    loaded = loaded_tiny("llama")
    tokens = np.array([5, 9, 2, 7, 4])
    with Recorder(resolve_sites(loaded.model), layers, {"hidden_in"}, torch.float32, keep_last=False) as rec:
        rec.mode = "step"
        want = hf_forward(loaded.model, tokens).hidden_states
    got = rec.take()
    assert sorted(got) == [("residual", b) for b in layout.residual_boundaries(layers)]
    n_layers = loaded.model.config.num_hidden_layers
    for (_, b), t in got.items():
        if b < n_layers:  # HF's last entry is after the final norm, not the stream itself
            np.testing.assert_array_equal(t.numpy(), want[b][0].numpy())  # the same forward pass


def _fused_by_hand(family: str, block: Any, x: torch.Tensor, cfg: Any) -> tuple[torch.Tensor, ...]:
    """q, k, v of one layer from its weights, split the way the HF model splits them."""
    heads = cfg.num_attention_heads
    head_dim = cfg.hidden_size // heads
    if family == "gpt2":  # Conv1D: weight is (in, 3 * hidden); contiguous thirds
        mod = block.attn.c_attn
        fused = x @ mod.weight + mod.bias
        return tuple(fused.split(cfg.hidden_size, dim=-1))
    if family == "gpt_neox":  # (..., heads, 3 * head_dim): [q_h | k_h | v_h] per head
        mod = block.attention.query_key_value
        fused = (x @ mod.weight.T + mod.bias).reshape(*x.shape[:-1], heads, 3 * head_dim)
        return tuple(part.reshape(*x.shape[:-1], heads * head_dim) for part in fused.chunk(3, dim=-1))
    if family == "phi3":  # q | k | v by width, k and v with the KV heads only
        mod = block.self_attn.qkv_proj
        fused = x @ mod.weight.T
        q_width, kv_width = heads * head_dim, cfg.num_key_value_heads * head_dim
        return tuple(fused.split([q_width, kv_width, kv_width], dim=-1))
    raise AssertionError(family)


def _input_norm(family: str, block: Any) -> Any:
    return block.ln_1 if family == "gpt2" else block.input_layernorm


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "phi3"])
def test_fused_qkv_match_projection_of_module_weights(family: str, store: Any) -> None:
    run, loaded = _capture(store, family, attention_weights=False)
    cfg = loaded.model.config
    blocks = resolve_sites(loaded.model).layers
    hin = run.array("hidden_in").compute()
    stored = {name: run.array(name).compute() for name in ("q", "k", "v")}
    for i, layer in enumerate(run.layers):
        block = blocks[layer].block
        with torch.inference_mode():
            # The attention's input: the stored residual through the layer's input norm.
            x = _input_norm(family, block)(torch.from_numpy(hin[i]))
            expected = _fused_by_hand(family, block, x, cfg)
        for name, want in zip(("q", "k", "v"), expected, strict=True):
            np.testing.assert_allclose(stored[name][i], want.numpy(), rtol=0, atol=QKV_ATOL,
                                       err_msg=f"{family} layer {layer} {name}")  # fmt: skip
        # Parts of one width differ by far more than the tolerance: a swap cannot pass
        # (with GQA, q and k differ in width too).
        for a, b in ((0, 1), (1, 2), (0, 2)):
            if expected[a].shape == expected[b].shape:
                assert np.abs(expected[a].numpy() - expected[b].numpy()).max() > 100 * QKV_ATOL


# Small shards: 8 positions per vector shard, inner chunks of 4; 8 x 8 attention tiles
# and shards. The ~60-position prompt and its decode steps then cross many boundaries,
# inside one prefill write and between decode steps.
SMALL_LAYOUT = {"SHARD_BUDGET": 1, "MIN_BLOCK": 8, "INNER_POSITIONS": 4, "LOGITS_INNER_POSITIONS": 4,
                "ATTN_TILE": 8}  # fmt: skip


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_capture_across_shards_matches_hf(family: str, store: Any, monkeypatch: Any) -> None:
    for name, value in SMALL_LAYOUT.items():
        monkeypatch.setattr(layout, name, value)
    run, loaded = _capture(store, family)
    T, P = run.n_positions, run.prompt_len
    res = run.open_array("acts/residual")
    attn = run.open_array("acts/attn_weights")
    logits = run.open_array("acts/logits")
    # The layout took: several shards and inner chunks per array, the prompt spans them.
    assert res.shards[1] == 8 and res.chunks[1] == 4 and P > 3 * 8
    assert attn.shards[2:] == (8, 8) and logits.shards[0] == 8
    out = hf_forward(loaded.model, run.tokens(), attentions=True)
    hs = [h[0].numpy() for h in out.hidden_states]
    hin, hout = run.array("hidden_in").compute(), run.array("hidden_out").compute()
    for i, layer in enumerate(run.layers):
        np.testing.assert_allclose(hin[i], hs[layer], rtol=0, atol=RESID_ATOL, err_msg=f"hidden_in {layer}")
        if layer + 1 < len(hs) - 1:  # HF's last entry is after the final norm
            np.testing.assert_allclose(hout[i], hs[layer + 1], rtol=0, atol=RESID_ATOL,
                                       err_msg=f"hidden_out {layer}")  # fmt: skip
    # Logits: a (T, W) array, the writer's other block path.
    np.testing.assert_allclose(run.array("logits").compute(), out.logits[0].numpy(), rtol=0, atol=LOGITS_ATOL)
    _assert_attention_matches(run, out.attentions, ATTN_ATOL)
    assert T == P + NEW_TOKENS - 1
