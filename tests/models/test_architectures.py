"""The architecture table against each family's own computation (tiny random models).

Hooks here are written locally on purpose: they check the table, not the capture code.
q/k/v are checked against what the attention kernel really receives (the module's
``eager_attention_forward`` is wrapped), after re-applying the model's own RoPE.
"""

from __future__ import annotations

import importlib
from typing import Any

import pytest
import torch
from torch import nn

from actstore.errors import UnsupportedModelError
from actstore.models.architectures import ModelSites, describe_model, resolve_sites
from actstore.testing import FAMILIES, test_tokenizer, tiny_model

PROMPT = "The quick brown fox jumps over the lazy dog, again and again."
ROPE_FREE = {"gpt2"}


def _input_ids() -> torch.Tensor:
    return test_tokenizer()(PROMPT, return_tensors="pt")["input_ids"]


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _run_recorded(model: nn.Module, sites: ModelSites, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """One forward pass with hooks on every site of every layer; returns what they saw."""
    rec: dict[str, Any] = {"kernel": [], "logits_out": None}
    handles = []

    def out_hook(key: str):
        def hook(_m: nn.Module, _args: Any, output: Any) -> None:
            rec[key] = output

        return hook

    for i, layer in enumerate(sites.layers):

        def block_hook(_m: nn.Module, args: Any, kwargs: Any, output: Any, i: int = i) -> None:
            rec[f"{i}.hidden_in"] = args[0] if args else kwargs["hidden_states"]
            rec[f"{i}.hidden_out"] = _first(output)

        def attn_pre(_m: nn.Module, args: Any, kwargs: Any, i: int = i) -> None:
            rec[f"{i}.position_embeddings"] = kwargs.get("position_embeddings")

        def down_pre(_m: nn.Module, args: Any, i: int = i) -> None:
            rec[f"{i}.down_in"] = args[0]

        handles.append(layer.block.register_forward_hook(block_hook, with_kwargs=True))
        handles.append(layer.attn.register_forward_pre_hook(attn_pre, with_kwargs=True))
        handles.append(layer.down.register_forward_pre_hook(down_pre))
        for name in ("attn", "q", "k", "v", "qkv", "o", "gate", "up", "gate_up", "act", "down"):
            module = getattr(layer, name)
            if module is not None:
                handles.append(module.register_forward_hook(out_hook(f"{i}.{name}")))
    handles.append(sites.embed.register_forward_hook(out_hook("embed")))
    handles.append(sites.lm_head.register_forward_hook(out_hook("lm_head")))

    # Record the q/k/v the attention kernel actually receives, layer by layer.
    modeling = importlib.import_module(type(model).__module__)
    original = modeling.eager_attention_forward

    def spy(
        module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *a: Any, **kw: Any
    ):
        rec["kernel"].append((query, key, value))
        return original(module, query, key, value, *a, **kw)

    monkeypatch.setattr(modeling, "eager_attention_forward", spy)
    try:
        with torch.no_grad():
            out = model(input_ids=_input_ids(), use_cache=False, output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    rec["out"] = out
    return rec


@pytest.fixture(scope="module", params=FAMILIES)
def family(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def recorded(family: str, monkeypatch: pytest.MonkeyPatch) -> tuple[nn.Module, ModelSites, dict[str, Any]]:
    model, _ = tiny_model(family, attn_implementation="eager")
    sites = resolve_sites(model)
    return model, sites, _run_recorded(model, sites, monkeypatch)


def test_sites_and_paths_resolve(family: str) -> None:
    model, _ = tiny_model(family)
    sites = resolve_sites(model)
    assert sites.family == family
    assert sites.num_layers == len(sites.layers) == model.config.num_hidden_layers
    assert model.get_submodule(sites.paths["embed"]) is sites.embed
    assert model.get_submodule(sites.paths["lm_head"]) is sites.lm_head
    assert model.get_submodule(sites.paths["final_norm"]) is sites.final_norm
    for i, layer in enumerate(sites.layers):
        assert model.get_submodule(sites.paths["block"].format(i=i)) is layer.block
        for name in ("attn", "q", "k", "v", "qkv", "o", "gate", "up", "gate_up", "act", "down"):
            module = getattr(layer, name)
            assert (module is None) == (name not in sites.paths), name
            if module is not None:
                assert model.get_submodule(sites.paths[name].format(i=i)) is module
    assert (sites.layers[0].qkv is None) == (sites.layers[0].q is not None)
    assert len({id(layer.act) for layer in sites.layers}) == sites.num_layers
    assert sites.q_width == sites.num_heads * sites.head_dim
    assert sites.kv_width == sites.num_kv_heads * sites.head_dim
    assert sites.residual_is_sum() == (family != "gemma2")


def test_qkv_is_what_attention_uses(recorded: tuple[nn.Module, ModelSites, dict[str, Any]]) -> None:
    model, sites, rec = recorded
    modeling = importlib.import_module(type(model).__module__)
    assert len(rec["kernel"]) == sites.num_layers
    for i, layer in enumerate(sites.layers):
        if layer.qkv is not None:
            q, k, v = sites.split_qkv(rec[f"{i}.qkv"])
        else:
            q, k, v = rec[f"{i}.q"], rec[f"{i}.k"], rec[f"{i}.v"]
        assert q.shape[-1] == sites.q_width and k.shape[-1] == v.shape[-1] == sites.kv_width
        b, t = q.shape[:2]
        qh = q.view(b, t, sites.num_heads, sites.head_dim).transpose(1, 2)
        kh = k.view(b, t, sites.num_kv_heads, sites.head_dim).transpose(1, 2)
        vh = v.view(b, t, sites.num_kv_heads, sites.head_dim).transpose(1, 2)
        if sites.family not in ROPE_FREE:  # captured q/k are pre-RoPE: apply the model's own
            cos, sin = rec[f"{i}.position_embeddings"]
            qh, kh = modeling.apply_rotary_pos_emb(qh, kh, cos, sin)
        kq, kk, kv = rec["kernel"][i]
        torch.testing.assert_close(qh, kq, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(kh, kk, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(vh, kv, rtol=0, atol=0)


def test_fused_split_matches_modeling_code(family: str) -> None:
    """The split equals the modeling code's own slicing, written out per family."""
    model, _ = tiny_model(family)
    sites = resolve_sites(model)
    if sites.layers[0].qkv is None:
        with pytest.raises(ValueError):
            sites.split_qkv(torch.zeros(1, 2, sites.q_width + 2 * sites.kv_width))
        return
    attn = sites.layers[0].attn
    x = torch.randn(1, 5, sites.hidden_size)
    fused = sites.layers[0].qkv(x)
    q, k, v = sites.split_qkv(fused)
    if family == "gpt2":
        expected = attn.c_attn(x).split(attn.split_size, dim=2)
    elif family == "gpt_neox":
        qkv = fused.view(1, 5, -1, 3 * attn.head_size).transpose(1, 2)
        expected = tuple(s.transpose(1, 2).reshape(1, 5, -1) for s in qkv.chunk(3, dim=-1))
    else:  # phi3
        qp = model.config.num_attention_heads * attn.head_dim
        kvp = attn.num_key_value_heads * attn.head_dim
        expected = (fused[..., :qp], fused[..., qp : qp + kvp], fused[..., qp + kvp :])
    for got, want in zip((q, k, v), expected, strict=True):
        assert torch.equal(got, want)


def test_mlp_act_and_down_input(recorded: tuple[nn.Module, ModelSites, dict[str, Any]]) -> None:
    _, sites, rec = recorded
    for i, layer in enumerate(sites.layers):
        act_out, down_in = rec[f"{i}.act"], rec[f"{i}.down_in"]
        if layer.gate_up is not None:
            gate, up = sites.split_gate_up(rec[f"{i}.gate_up"])
        else:
            gate, up = rec.get(f"{i}.gate"), rec[f"{i}.up"]
        if sites.gated_mlp:
            assert gate is not None and gate.shape[-1] == sites.intermediate_size
            torch.testing.assert_close(act_out, layer.act(gate), rtol=0, atol=0)
            torch.testing.assert_close(act_out * up, down_in, rtol=0, atol=0)
        else:
            assert layer.gate is None and layer.gate_up is None
            torch.testing.assert_close(act_out, layer.act(up), rtol=0, atol=0)
            torch.testing.assert_close(act_out, down_in, rtol=0, atol=0)
        assert down_in.shape[-1] == sites.intermediate_size
        torch.testing.assert_close(rec[f"{i}.down"], layer.down(down_in))


def test_residual_sum(recorded: tuple[nn.Module, ModelSites, dict[str, Any]]) -> None:
    _, sites, rec = recorded
    for i in range(sites.num_layers):
        h_in, h_out = rec[f"{i}.hidden_in"], rec[f"{i}.hidden_out"]
        total = h_in + rec[f"{i}.o"] + rec[f"{i}.down"]
        if sites.residual_is_sum():
            torch.testing.assert_close(h_out, total, rtol=1e-5, atol=1e-5)
        else:  # gemma2 normalises both branch outputs before adding them
            assert not torch.allclose(h_out, total, rtol=1e-3, atol=1e-3)


def test_hidden_embeddings_logits_attention(recorded: tuple[nn.Module, ModelSites, dict[str, Any]]) -> None:
    model, sites, rec = recorded
    out = rec["out"]
    t = _input_ids().shape[1]
    for i in range(sites.num_layers - 1):  # HF's last entry is after the final norm
        torch.testing.assert_close(rec[f"{i}.hidden_out"], out.hidden_states[i + 1])
    if sites.family == "gpt2":  # wte only; position embeddings are added after it
        assert not torch.allclose(rec["embed"], out.hidden_states[0])
    else:
        torch.testing.assert_close(rec["embed"], out.hidden_states[0])
        torch.testing.assert_close(rec["0.hidden_in"], rec["embed"])
    cap = sites.logit_softcapping
    logits = rec["lm_head"] if cap is None else torch.tanh(rec["lm_head"] / cap) * cap
    assert (cap is not None) == (sites.family == "gemma2")
    torch.testing.assert_close(logits, out.logits)
    for i in range(sites.num_layers):
        weights = rec[f"{i}.attn"][1]  # eager: the softmax pattern
        assert weights.shape == (1, sites.num_heads, t, t)
        torch.testing.assert_close(weights.sum(-1), torch.ones(1, sites.num_heads, t))
        assert torch.all(weights.triu(1) == 0)  # causal


def test_sdpa_attention_returns_no_weights() -> None:
    model, _ = tiny_model("llama")
    sites = resolve_sites(model)
    seen: list[Any] = []
    h = sites.layers[0].attn.register_forward_hook(lambda _m, _a, o: seen.append(o))
    with torch.no_grad():
        model(input_ids=_input_ids())
    h.remove()
    assert isinstance(seen[0], tuple) and seen[0][1] is None


class _Weird(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.config = type("Cfg", (), {"model_type": "weird"})()
        self.body = nn.Linear(4, 4)


def test_unsupported_model_types() -> None:
    from transformers import BertConfig, BertLMHeadModel

    bert = BertLMHeadModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1,
                                      num_attention_heads=4, intermediate_size=64, is_decoder=True))  # fmt: skip
    for model, model_type in ((bert, "bert"), (_Weird(), "weird")):
        with pytest.raises(UnsupportedModelError) as err:
            resolve_sites(model)
        msg = str(err.value)
        assert "\n" not in msg and repr(model_type) in msg and "actstore layers" in msg
        text = describe_model(model)
        assert "not supported" in text and type(model).__name__ in text
    assert "body: Linear" in describe_model(_Weird())


def test_missing_or_shared_module_is_named() -> None:
    model, _ = tiny_model("llama")
    del model.model.layers[1].mlp.act_fn
    with pytest.raises(UnsupportedModelError, match=r"'model\.layers\.1\.mlp\.act_fn' not found"):
        resolve_sites(model)
    model, _ = tiny_model("llama")
    model.model.layers[1].mlp.act_fn = model.model.layers[0].mlp.act_fn
    with pytest.raises(UnsupportedModelError, match="shared"):
        resolve_sites(model)


def test_describe_tiny_llama() -> None:
    model, _ = tiny_model("llama")
    text = describe_model(model)
    n = model.config.num_hidden_layers  # testing.LAYERS: 2 or 3
    assert "family: llama" in text and f"layers: {n}" in text and "hidden: 64" in text
    same = "1" if n == 2 else f"1-{n - 1}"
    assert "0: LlamaDecoderLayer" in text and f"... layers {same} same as 0" in text
    assert "1: LlamaDecoderLayer" not in text
    rows = {
        line.split()[0]: line for line in text.splitlines()[text.splitlines().index("capture points:") + 2 :]
    }
    assert set(rows) == {"hidden_in", "hidden_out", "q", "k", "v", "attn_out", "attn_weights", "mlp_gate",
                         "mlp_up", "mlp_act", "mlp_down_in", "mlp_down_out", "embeddings", "logits"}  # fmt: skip
    assert "model.layers.{i}.self_attn.q_proj" in rows["q"]
    assert "model.layers.{i}.mlp.down_proj" in rows["mlp_down_in"] and "input" in rows["mlp_down_in"]
    assert "model.embed_tokens" in rows["embeddings"] and "lm_head" in rows["logits"]


def test_describe_collapses_long_layer_lists() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=5,
                                         num_attention_heads=2, num_key_value_heads=1))  # fmt: skip
    text = describe_model(model)
    assert "... layers 1-4 same as 0" in text and "layers: 5" in text
