"""Where each capture point lives in a supported HF causal-LM family.

One declarative :class:`FamilySpec` per family (module paths as data) and
:func:`resolve_sites`, which turns a loaded model into :class:`ModelSites`: the actual
modules hooks attach to, sizes, and the few helpers that split fused projections.
:func:`describe_model` renders the text of ``actstore layers MODEL``.

How each source is read (checked against transformers 5.24 modeling code):

* decoder layers take ``hidden_states`` positionally and return a bare tensor (older
  releases returned a tuple, so readers accept both);
* attention modules are called with ``hidden_states=`` as a keyword and return
  ``(attn_output, attn_weights)``; weights are the softmax pattern under eager attention
  and ``None`` under SDPA;
* the MLP activation is its own module (``ACT2FN`` builds one per MLP), so its output is
  ``act(gate)`` (``act(up)`` for non-gated MLPs) and the down projection's input is
  ``act(gate) * up`` (just ``act(up)`` for non-gated MLPs).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from actstore.errors import UnsupportedModelError

_LAYERS_HINT = "run `actstore layers MODEL` to see its module tree"


@dataclass(frozen=True)
class FamilySpec:
    """Module paths of one family. Layer paths are relative to one decoder layer."""

    family: str
    model_types: tuple[str, ...]
    embed: str
    final_norm: str
    lm_head: str
    layers: str
    attn: str
    o: str
    act: str
    down: str
    q: str | None = None
    k: str | None = None
    v: str | None = None
    qkv: str | None = None
    # "concat": q | k | v side by side (gpt2 thirds, phi3 by sizes);
    # "per_head": [q_h | k_h | v_h] per head (gpt_neox).
    qkv_layout: str = "separate"
    gate: str | None = None
    up: str | None = None
    gate_up: str | None = None
    gated_mlp: bool = True
    residual_sum: bool = True


_LLAMA_LIKE: dict[str, Any] = dict(
    embed="model.embed_tokens",
    final_norm="model.norm",
    lm_head="lm_head",
    layers="model.layers",
    attn="self_attn",
    q="self_attn.q_proj",
    k="self_attn.k_proj",
    v="self_attn.v_proj",
    o="self_attn.o_proj",
    gate="mlp.gate_proj",
    up="mlp.up_proj",
    act="mlp.act_fn",
    down="mlp.down_proj",
)

FAMILY_SPECS: tuple[FamilySpec, ...] = (
    FamilySpec("llama", ("llama", "qwen3", "olmo", "smollm3"), **_LLAMA_LIKE),
    FamilySpec("mistral", ("mistral",), **_LLAMA_LIKE),
    FamilySpec("qwen2", ("qwen2",), **_LLAMA_LIKE),
    FamilySpec("gemma", ("gemma",), **_LLAMA_LIKE),
    # gemma2/3 normalise the attention and MLP outputs before adding them to the residual.
    FamilySpec("gemma2", ("gemma2", "gemma3_text"), residual_sum=False, **_LLAMA_LIKE),
    FamilySpec(
        "gpt_neox",
        ("gpt_neox",),
        embed="gpt_neox.embed_in",
        final_norm="gpt_neox.final_layer_norm",
        lm_head="lm_head",
        layers="gpt_neox.layers",
        attn="attention",
        qkv="attention.query_key_value",
        qkv_layout="per_head",
        o="attention.dense",
        up="mlp.dense_h_to_4h",
        act="mlp.act",
        down="mlp.dense_4h_to_h",
        gated_mlp=False,
    ),
    FamilySpec(
        "gpt2",
        ("gpt2",),
        embed="transformer.wte",  # token embeddings only: position embeddings are added later
        final_norm="transformer.ln_f",
        lm_head="lm_head",
        layers="transformer.h",
        attn="attn",
        qkv="attn.c_attn",
        qkv_layout="concat",
        o="attn.c_proj",
        up="mlp.c_fc",
        act="mlp.act",
        down="mlp.c_proj",
        gated_mlp=False,
    ),
    FamilySpec(
        "phi3",
        ("phi3",),
        embed="model.embed_tokens",
        final_norm="model.norm",
        lm_head="lm_head",
        layers="model.layers",
        attn="self_attn",
        qkv="self_attn.qkv_proj",
        qkv_layout="concat",
        o="self_attn.o_proj",
        gate_up="mlp.gate_up_proj",
        act="mlp.activation_fn",
        down="mlp.down_proj",
    ),
)

_BY_MODEL_TYPE: dict[str, FamilySpec] = {t: s for s in FAMILY_SPECS for t in s.model_types}
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(sorted(_BY_MODEL_TYPE))
_LAYER_FIELDS = ("attn", "q", "k", "v", "qkv", "o", "gate", "up", "gate_up", "act", "down")


@dataclass(frozen=True)
class LayerSites:
    """Modules of one decoder layer that hooks attach to."""

    block: nn.Module
    attn: nn.Module
    q: nn.Module | None
    k: nn.Module | None
    v: nn.Module | None
    qkv: nn.Module | None
    o: nn.Module
    gate: nn.Module | None
    up: nn.Module | None
    gate_up: nn.Module | None
    act: nn.Module
    down: nn.Module


@dataclass(frozen=True)
class ModelSites:
    """Everything capture needs to know about one model's layout."""

    family: str
    embed: nn.Module
    final_norm: nn.Module
    lm_head: nn.Module
    layers: tuple[LayerSites, ...]
    gated_mlp: bool
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    q_width: int
    kv_width: int
    paths: dict[str, str] = field(default_factory=dict)
    model_type: str = ""
    qkv_layout: str = "separate"
    residual_sum: bool = True
    # gemma2 squashes logits after lm_head: logits = tanh(out / cap) * cap; None elsewhere.
    logit_softcapping: float | None = None

    def split_qkv(self, fused: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Split a fused q/k/v projection output into q, k, v laid out head-major."""
        width = self.q_width + 2 * self.kv_width
        if fused.shape[-1] != width:
            raise ValueError(f"fused qkv width {fused.shape[-1]} != expected {width} ({self.family})")
        if self.qkv_layout == "concat":
            q, k, v = fused.split([self.q_width, self.kv_width, self.kv_width], dim=-1)
            return q, k, v
        if self.qkv_layout == "per_head":
            # gpt_neox views (..., heads, 3 * head_dim) and chunks the last axis in three.
            per = fused.reshape(*fused.shape[:-1], self.num_heads, 3, self.head_dim)
            lead = fused.shape[:-1]
            return tuple(per[..., j, :].reshape(*lead, self.num_heads * self.head_dim) for j in range(3))  # type: ignore[return-value]
        raise ValueError(f"{self.family} has separate q/k/v projections; nothing to split")

    def split_gate_up(self, fused: Tensor) -> tuple[Tensor, Tensor]:
        """Split a fused gate/up projection output (phi3): first half gate, second half up."""
        if self.paths.get("gate_up") is None:
            raise ValueError(f"{self.family} has no fused gate_up projection")
        gate, up = fused.chunk(2, dim=-1)
        return gate, up

    def residual_is_sum(self) -> bool:
        """True where hidden_out == hidden_in + attn_out + mlp_down_out."""
        return self.residual_sum


def family_spec(model_type: str) -> FamilySpec | None:
    """The spec for a ``config.model_type``, or None when unsupported."""
    return _BY_MODEL_TYPE.get(model_type)


def _model_type(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    return str(getattr(config, "model_type", "") or "")


def _spec_for(model: nn.Module) -> FamilySpec:
    model_type = _model_type(model)
    spec = family_spec(model_type)
    if spec is None:
        shown = repr(model_type) if model_type else f"{type(model).__name__} (no config.model_type)"
        raise UnsupportedModelError(
            f"model_type {shown} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)}); "
            f"{_LAYERS_HINT}"
        )
    return spec


def _find(model: nn.Module, path: str, model_type: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise UnsupportedModelError(
            f"model_type {model_type!r}: module {path!r} not found; {_LAYERS_HINT}"
        ) from None


def _sizes(config: Any, spec: FamilySpec) -> dict[str, int]:
    """Sizes from the config (attribute_map makes gpt2's n_embd etc. readable by HF names)."""
    hidden = int(config.hidden_size)
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    inter = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden
    if spec.qkv_layout == "per_head" or spec.family == "gpt2":
        kv_heads = heads  # neither has grouped-query attention
    return dict(
        num_layers=int(config.num_hidden_layers),
        hidden_size=hidden,
        intermediate_size=int(inter),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        vocab_size=int(config.vocab_size),
        q_width=heads * head_dim,
        kv_width=kv_heads * head_dim,
    )


def _softcap(config: Any) -> float | None:
    cap = getattr(config, "final_logit_softcapping", None)
    return float(cap) if cap else None


def resolve_sites(model: nn.Module) -> ModelSites:
    """Find every hookable module of ``model``; UnsupportedModelError names what is missing."""
    spec = _spec_for(model)
    model_type = _model_type(model)
    paths: dict[str, str] = {
        "embed": spec.embed,
        "final_norm": spec.final_norm,
        "lm_head": spec.lm_head,
        "layers": spec.layers,
        "block": f"{spec.layers}.{{i}}",
    }
    for name in _LAYER_FIELDS:
        rel = getattr(spec, name)
        if rel is not None:
            paths[name] = f"{spec.layers}.{{i}}.{rel}"

    container = _find(model, spec.layers, model_type)
    if not isinstance(container, (nn.ModuleList, nn.Sequential)):
        raise UnsupportedModelError(
            f"model_type {model_type!r}: {spec.layers!r} is a {type(container).__name__}, "
            f"not a list of layers; {_LAYERS_HINT}"
        )
    layers: list[LayerSites] = []
    for i in range(len(container)):
        found: dict[str, Any] = {
            name: (_find(model, paths[name].format(i=i), model_type) if name in paths else None)
            for name in _LAYER_FIELDS
        }
        layers.append(LayerSites(block=container[i], **found))

    # Hooks key on module identity, so a shared activation module would mix layers up.
    acts = [id(layer.act) for layer in layers]
    if len(set(acts)) != len(acts):
        raise UnsupportedModelError(
            f"model_type {model_type!r}: the MLP activation module {spec.act!r} is shared between "
            f"layers, so mlp_act cannot be told apart per layer; {_LAYERS_HINT}"
        )

    config = getattr(model, "config", None)
    sizes = _sizes(config, spec)
    return ModelSites(
        family=spec.family,
        embed=_find(model, spec.embed, model_type),
        final_norm=_find(model, spec.final_norm, model_type),
        lm_head=_find(model, spec.lm_head, model_type),
        layers=tuple(layers),
        gated_mlp=spec.gated_mlp,
        paths=paths,
        model_type=model_type,
        qkv_layout=spec.qkv_layout,
        residual_sum=spec.residual_sum,
        logit_softcapping=_softcap(config),
        **{**sizes, "num_layers": len(layers)},
    )


# ---------------------------------------------------------------------------------------
# `actstore layers MODEL`


def _signature(module: nn.Module) -> tuple[tuple[str, str], ...]:
    return tuple((name, type(m).__name__) for name, m in module.named_modules())


def _leaf_detail(module: nn.Module) -> str:
    extra = module.extra_repr().replace("\n", " ")
    return f"({extra[:80]})" if extra else ""


def _tree_lines(module: nn.Module, name: str, depth: int, out: list[str]) -> None:
    children = list(module.named_children())
    detail = "" if children else _leaf_detail(module)
    out.append(f"{'  ' * depth}{name}: {type(module).__name__}{detail}")
    if isinstance(module, (nn.ModuleList, nn.Sequential)) and len(children) > 1:
        # Show the first element fully, then collapse runs that repeat its structure.
        first_sig = _signature(children[0][1])
        _tree_lines(children[0][1], children[0][0], depth + 1, out)
        j = 1
        while j < len(children):
            k = j
            while k < len(children) and _signature(children[k][1]) == first_sig:
                k += 1
            if k > j:
                span = children[j][0] if k - j == 1 else f"{children[j][0]}-{children[k - 1][0]}"
                out.append(f"{'  ' * (depth + 1)}... layers {span} same as {children[0][0]}")
                j = k
            else:
                _tree_lines(children[j][1], children[j][0], depth + 1, out)
                j += 1
        return
    for child_name, child in children:
        _tree_lines(child, child_name, depth + 1, out)


def module_tree(model: nn.Module) -> str:
    """Module names and classes, repeated layers collapsed."""
    out: list[str] = []
    _tree_lines(model, "(model)", 0, out)
    return "\n".join(out)


def capture_table(sites: ModelSites) -> list[tuple[str, str, str]]:
    """(source, module path, how it is read) for every capture point."""
    p = sites.paths
    rows: list[tuple[str, str, str]] = [
        ("hidden_in", p["block"], "input (args[0] or kwargs['hidden_states'])"),
        ("hidden_out", p["block"], "output (tensor, or output[0] if a tuple)"),
    ]
    for j, src in enumerate(("q", "k", "v")):
        rope = ", pre-RoPE" if src != "v" else ""
        if src in p:
            rows.append((src, p[src], f"output{rope}"))
        else:
            how = (
                "contiguous thirds"
                if sites.family == "gpt2"
                else ("q | k | v by width" if sites.qkv_layout == "concat" else "per-head [q|k|v] blocks")
            )
            rows.append((src, p["qkv"], f"output, split part {j + 1}/3 ({how}){rope}"))
    rows.append(("attn_out", p["o"], "output"))
    rows.append(("attn_weights", p["attn"], "output[1] (eager attention only; None under sdpa)"))
    if "gate_up" in p:
        rows.append(("mlp_gate", p["gate_up"], "output, first half"))
        rows.append(("mlp_up", p["gate_up"], "output, second half"))
    elif sites.gated_mlp:
        rows.append(("mlp_gate", p["gate"], "output"))
        rows.append(("mlp_up", p["up"], "output"))
    else:
        rows.append(("mlp_gate", "-", "not captured: MLP is not gated"))
        rows.append(("mlp_up", p["up"], "output (first MLP projection, pre-activation)"))
    act_how = "output = act(gate)" if sites.gated_mlp else "output = act(up)"
    rows.append(("mlp_act", p["act"], act_how))
    down_in = "input = act(gate) * up" if sites.gated_mlp else "input = act(up)"
    rows.append(("mlp_down_in", p["down"], down_in))
    rows.append(("mlp_down_out", p["down"], "output"))
    rows.append(
        ("embeddings", p["embed"], "output" + (" (token embeddings only)" if sites.family == "gpt2" else ""))
    )
    cap = sites.logit_softcapping
    rows.append(
        ("logits", p["lm_head"], "output" + (f" (before final_logit_softcapping={cap})" if cap else ""))
    )
    return rows


def describe_model(model: nn.Module) -> str:
    """Text of ``actstore layers MODEL``: family, sizes, module tree, capture table."""
    model_type = _model_type(model) or "?"
    try:
        sites = resolve_sites(model)
    except UnsupportedModelError as exc:
        return "\n".join(
            [
                f"model_type: {model_type}  class: {type(model).__name__}",
                "",
                module_tree(model),
                "",
                f"not supported: {exc}",
            ]
        )
    header = [
        f"family: {sites.family}  model_type: {sites.model_type}  class: {type(model).__name__}",
        f"layers: {sites.num_layers}  hidden: {sites.hidden_size}  intermediate: {sites.intermediate_size}"
        f"  heads: {sites.num_heads}  kv_heads: {sites.num_kv_heads}  head_dim: {sites.head_dim}"
        f"  vocab: {sites.vocab_size}",
        f"gated_mlp: {sites.gated_mlp}  residual_is_sum: {sites.residual_is_sum()}"
        f"  q_width: {sites.q_width}  kv_width: {sites.kv_width}",
    ]
    rows = capture_table(sites)
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    table = [f"{'source':<{w0}}  {'module ({i} = layer)':<{w1}}  read"]
    table += [f"{s:<{w0}}  {m:<{w1}}  {h}" for s, m, h in rows]
    return "\n".join(header + ["", module_tree(model), "", "capture points:"] + table)
