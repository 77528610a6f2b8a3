"""TransformerLens hook names: what each one means, checked against plain HF code.

Every value a hook name serves is compared with an independent computation on the same
tiny model: one plain HF forward pass over the run's tokens (``output_hidden_states``,
a hook on the attention module for its output and weights) and TransformerLens's own
definitions written out with the model's weights (``hook_pre = ln2(resid_mid) @ W_gate``,
``hook_post = act(hook_pre) * hook_pre_linear``, ``hook_mlp_out = hook_post @ W_down``,
q/k/v before rotary embeddings). The run was captured step by step with a KV cache, so
values agree to float32 rounding, not bit for bit. Then: every name serves exactly the
bits of its actstore (source, layer); the CLI takes names for --source.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from actstore import tl_names
from actstore.errors import SelectionError

CLOSE = {"rtol": 1e-4, "atol": 2e-5}


def _hf_reference(model: Any, tokens: np.ndarray, family: str) -> dict[str, np.ndarray]:
    """TransformerLens's hook values for every layer, from a plain HF forward pass."""
    ids = torch.as_tensor(tokens, dtype=torch.long)[None]
    layers = model.model.layers if family == "llama" else model.transformer.h
    attn_outputs: dict[int, tuple[torch.Tensor, Any]] = {}
    handles = []
    for i, layer in enumerate(layers):
        attn = layer.self_attn if family == "llama" else layer.attn
        handles.append(attn.register_forward_hook(lambda _m, _a, out, i=i: attn_outputs.__setitem__(i, out)))
    try:
        with torch.no_grad():
            out = model(ids, output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    hs = [h[0] for h in out.hidden_states]  # hs[L] has the final norm applied
    ref: dict[str, np.ndarray] = {}
    with torch.no_grad():
        if family == "llama":
            ref["hook_embed"] = model.model.embed_tokens.weight[ids[0]].numpy()
        else:
            ref["hook_embed"] = model.transformer.wte.weight[ids[0]].numpy()
        for i, layer in enumerate(layers):
            pre = hs[i]
            attn_out = attn_outputs[i][0][0]
            mid = pre + attn_out
            b = f"blocks.{i}."
            ref[b + "hook_resid_pre"] = pre.numpy()
            ref[b + "hook_attn_out"] = attn_out.numpy()
            if family == "llama":
                x = layer.input_layernorm(pre)
                sa = layer.self_attn
                for n, proj in (("q", sa.q_proj), ("k", sa.k_proj), ("v", sa.v_proj)):
                    ref[b + f"attn.hook_{n}"] = F.linear(x, proj.weight).numpy()  # before rotary
                if attn_outputs[i][1] is not None:
                    ref[b + "attn.hook_pattern"] = attn_outputs[i][1][0].numpy()
                m = layer.mlp
                y = layer.post_attention_layernorm(mid)
                gate, up = F.linear(y, m.gate_proj.weight), F.linear(y, m.up_proj.weight)
                post = F.silu(gate) * up  # tiny llama's hidden_act is silu
                ref[b + "mlp.hook_pre"], ref[b + "mlp.hook_pre_linear"] = gate.numpy(), up.numpy()
                mlp_out = F.linear(post, m.down_proj.weight)
            else:
                m = layer.mlp
                y = layer.ln_2(mid)
                pre_act = y @ m.c_fc.weight + m.c_fc.bias  # GPT-2's Conv1D: x @ W + b
                post = m.act(pre_act)
                ref[b + "mlp.hook_pre"] = pre_act.numpy()
                mlp_out = post @ m.c_proj.weight + m.c_proj.bias
            ref[b + "mlp.hook_post"] = post.numpy()
            ref[b + "hook_mlp_out"] = mlp_out.numpy()
            ref[b + "hook_resid_post"] = (mid + mlp_out).numpy()
            if i + 1 < len(layers):  # hidden_states[i + 1] is the next layer's input ...
                np.testing.assert_allclose(ref[b + "hook_resid_post"], hs[i + 1].numpy(), **CLOSE)
        final = model.model.norm if family == "llama" else model.transformer.ln_f
        # ... and the last one has the final norm applied
        np.testing.assert_allclose(
            final(torch.as_tensor(ref[b + "hook_resid_post"])).numpy(), hs[-1].numpy(), **CLOSE
        )
    return ref


@pytest.mark.parametrize("key", ["llama", "gpt2"])
def test_names_mean_what_transformerlens_means(exchange_store: dict[str, Any], key: str) -> None:
    cap = exchange_store[key]
    run = cap.run
    ref = _hf_reference(cap.model, np.asarray(run.tokens()), key)
    checked = []
    for name, expected in ref.items():
        got = run.hook(name).compute()
        assert got.shape == expected.shape, name
        np.testing.assert_allclose(got, expected, err_msg=name, **CLOSE)
        checked.append(name.split(".", 2)[-1] if name.startswith("blocks.") else name)
    wanted = {"hook_embed", "hook_resid_pre", "hook_resid_post", "hook_attn_out", "hook_mlp_out",
              "mlp.hook_pre", "mlp.hook_post"}  # fmt: skip
    if key == "llama":
        wanted |= {"attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_pattern", "mlp.hook_pre_linear"}
    assert wanted <= set(checked)


def test_q_reshapes_to_transformerlens_heads(exchange_store: dict[str, Any]) -> None:
    """actstore keeps heads side by side; (pos, head, d_head) is TransformerLens's shape,
    k and v at the key-value heads (grouped-query attention)."""
    run, model = exchange_store["llama"].run, exchange_store["llama"].model
    cfg = model.config
    d_head = cfg.hidden_size // cfg.num_attention_heads
    q, k = run.hook("blocks.0.attn.hook_q").compute(), run.hook("blocks.0.attn.hook_k").compute()
    assert q.reshape(len(q), cfg.num_attention_heads, d_head).shape[1:] == (cfg.num_attention_heads, d_head)
    assert k.shape[1] == cfg.num_key_value_heads * d_head < q.shape[1]  # the tiny llama uses GQA


def test_every_name_serves_its_source_exactly(exchange_store: dict[str, Any]) -> None:
    for key, gated in (("llama", True), ("gpt2", False)):
        run = exchange_store[key].run
        names = ["hook_embed"] + [f"blocks.{layer}.{s}" for layer in run.layers for s in tl_names.LAYER_HOOKS]
        for name in names:
            if name.endswith("hook_pre_linear") and not gated:
                with pytest.raises(SelectionError, match="not gated"):
                    run.hook(name)
                continue
            if name.endswith("hook_pattern") and "attn_weights" not in run.sources:
                continue
            source, layer = tl_names.for_run(name, run)
            expected = run.array(source).compute()
            if layer is not None:
                expected = expected[run.layers.index(layer)]
            np.testing.assert_array_equal(run.hook(name).compute(), expected, err_msg=name)
            assert tl_names.hook_name(source, layer, gated_mlp=gated) == name


def test_mlp_hook_post_is_down_in_not_act(exchange_store: dict[str, Any]) -> None:
    run = exchange_store["llama"].run
    assert tl_names.for_run("blocks.1.mlp.hook_post", run) == ("mlp_down_in", 1)
    assert tl_names.for_run("blocks.1.mlp.hook_pre", run) == ("mlp_gate", 1)
    assert tl_names.for_run("blocks.1.mlp.hook_pre", exchange_store["gpt2"].run) == ("mlp_up", 1)


def test_refused_names() -> None:
    with pytest.raises(SelectionError, match="post-norm"):
        tl_names.to_source("blocks.0.hook_attn_out", gated_mlp=True, family="gemma2")
    with pytest.raises(SelectionError, match="post-norm"):
        tl_names.to_source("blocks.0.hook_mlp_out", gated_mlp=True, family="gemma2")
    assert tl_names.to_source("blocks.0.hook_resid_post", family="gemma2") == ("hidden_out", 0)
    for name in (
        "blocks.0.hook_resid_mid",
        "blocks.0.attn.hook_z",
        "blocks.0.attn.hook_rot_q",
        "blocks.x.hook_q",
    ):
        with pytest.raises(SelectionError):
            tl_names.parse(name)
    with pytest.raises(SelectionError, match="gated or not"):
        tl_names.to_source("blocks.0.mlp.hook_pre")


def test_api_points_a_hook_name_to_its_source(exchange_store: dict[str, Any]) -> None:
    run = exchange_store["llama"].run
    with pytest.raises(SelectionError, match=r"source 'hidden_out' at layer 2"):
        run.array("blocks.2.hook_resid_post")
    with pytest.raises(SelectionError, match="did not capture layer 9"):
        run.hook("blocks.9.hook_resid_post")


def _cli(args: list[str]) -> Any:
    from actstore.cli import main

    return CliRunner().invoke(main, args, catch_exceptions=False)


def test_cli_source_takes_hook_names(exchange_store: dict[str, Any]) -> None:
    run = exchange_store["llama"].run
    store = ["--store", str(exchange_store["llama"].store.location)]
    base = ["query", "cross-layer", "--run", run.id, "--format", "csv", *store]
    by_name = _cli([*base, "--source", "blocks.1.mlp.hook_pre"])
    by_source = _cli([*base, "--source", "mlp_gate", "--layers", "1"])
    assert by_name.exit_code == 0, by_name.output
    assert by_name.output == by_source.output and "mlp_gate" in by_name.output
    gpt2 = exchange_store["gpt2"].run
    plain = _cli(["query", "cross-layer", "--run", gpt2.id, "--format", "csv", *store,
                  "--source", "blocks.0.mlp.hook_pre"])  # fmt: skip
    assert plain.exit_code == 0 and "mlp_up" in plain.output, plain.output

    same = _cli([*base, "--source", "blocks.1.hook_resid_post", "--layers", "1"])
    assert same.exit_code == 0 and same.output == _cli([*base, "--layers", "1"]).output
    clash = _cli([*base, "--source", "blocks.1.hook_resid_post", "--layers", "0-2"])
    assert clash.exit_code == 2
    assert clash.output.strip().count("\n") == 0 and "fixes layer 1" in clash.output

    metric = ["query", "cosine", "--runs", run.id, "--format", "csv", *store]
    a = _cli([*metric, "--source", "blocks.2.hook_resid_pre"])
    b = _cli([*metric, "--source", "hidden_in", "--layers", "2"])
    assert a.exit_code == 0 and a.output == b.output

    traj = ["query", "trajectory", "--run", run.id, "--neuron", "3", "--format", "csv", *store]
    named = _cli([*traj, "--source", "blocks.2.mlp.hook_post"])
    assert (
        named.exit_code == 0
        and named.output == _cli([*traj, "--source", "mlp_down_in", "--layer", "2"]).output
    )
    assert _cli(traj).exit_code == 2  # a plain source still needs --layer
