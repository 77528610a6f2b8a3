"""TransformerLens hook names (``blocks.16.hook_resid_post``) for actstore's (source, layer).

SAELens, and most interpretability code, names activations the way TransformerLens's
``HookedTransformer`` hooks them. Each name below was checked against TransformerLens's
own forward code (``TransformerBlock``, ``AbstractAttention``, ``GroupedQueryAttention``,
``MLP``, ``GatedMLP``, ``HookedTransformer.hook_embed``) and against where actstore's
capture hooks read each source (``models.architectures.capture_table``):

* ``hook_resid_pre`` / ``hook_resid_post``: the decoder layer's input / output.
* ``hook_attn_out`` / ``hook_mlp_out``: the output projection of attention / the MLP,
  which is what is added to the residual stream, except in gemma2/3: TransformerLens
  puts its post-attention and post-MLP norms *before* these hooks, while actstore keeps
  the projections' outputs, so those two names are refused for that family.
* ``attn.hook_q/k/v``: the projections before rotary embeddings (TransformerLens hooks
  rotated q/k as ``hook_rot_q/k``) and before any q/k norm, as actstore stores them.
  TransformerLens's shape is (pos, head, d_head), with k and v at the key-value heads
  under grouped-query attention; actstore's is (pos, heads * d_head), heads side by
  side, so ``x.reshape(pos, heads, d_head)`` gives TransformerLens's.
* ``attn.hook_pattern``: the softmaxed attention weights, (head, query, key) in both.
* ``mlp.hook_pre``: the input of the activation function (the gate projection of a
  gated MLP, the first projection of a plain one); ``mlp.hook_pre_linear``: the up
  projection of a gated MLP; ``mlp.hook_post``: the input of the down projection,
  ``act(gate) * up`` for a gated MLP, so actstore's ``mlp_down_in`` and not ``mlp_act``.
* ``hook_embed``: the token embedding module's output (gemma's scaling included in both).

No counterpart: ``hook_resid_mid`` (not stored; in families where the stream is a sum it
is ``hidden_in + attn_out``), ``attn.hook_z``, ``attn.hook_attn_scores``,
``attn.hook_rot_q/k``, ``hook_pos_embed``, ``ln*.hook_*``; actstore's ``mlp_act`` (act of
the gate) and ``logits`` have no TransformerLens hook.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from actstore.errors import SelectionError

# hook suffix -> actstore source; None means it depends on the MLP (see _mlp_source).
LAYER_HOOKS: dict[str, str | None] = {
    "hook_resid_pre": "hidden_in",
    "hook_resid_post": "hidden_out",
    "hook_attn_out": "attn_out",
    "hook_mlp_out": "mlp_down_out",
    "attn.hook_q": "q",
    "attn.hook_k": "k",
    "attn.hook_v": "v",
    "attn.hook_pattern": "attn_weights",
    "mlp.hook_pre": None,
    "mlp.hook_pre_linear": "mlp_up",
    "mlp.hook_post": "mlp_down_in",
}
GLOBAL_HOOKS: dict[str, str] = {"hook_embed": "embeddings"}

# Families whose attention / MLP outputs are normalised before they join the stream.
_POST_NORM_FAMILIES = ("gemma2",)
_POST_NORMED = ("hook_attn_out", "hook_mlp_out")
_NO_COUNTERPART = {
    "hook_resid_mid": "actstore does not store it (where the stream is a sum it is hidden_in + attn_out)",
    "attn.hook_z": "actstore does not store the attention-weighted values before the output projection",
    "attn.hook_attn_scores": "actstore stores the softmaxed pattern (attn.hook_pattern), not the scores",
    "attn.hook_rot_q": "actstore stores q before rotary embeddings (attn.hook_q)",
    "attn.hook_rot_k": "actstore stores k before rotary embeddings (attn.hook_k)",
}
_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class Hook:
    """A parsed TransformerLens name: ``layer`` is None for global hooks."""

    name: str
    layer: int | None
    suffix: str


def looks_like_hook(name: str) -> bool:
    """True for a TransformerLens-style name (``blocks.N.…`` or ``hook_…``), mapped or not."""
    return bool(_BLOCK.match(name)) or name.startswith("hook_")


def parse(name: str) -> Hook:
    """Split a name into layer and suffix; SelectionError for a name with no actstore source."""
    m = _BLOCK.match(name)
    layer, suffix = (int(m.group(1)), m.group(2)) if m else (None, name)
    if (layer is None and suffix in GLOBAL_HOOKS) or (layer is not None and suffix in LAYER_HOOKS):
        return Hook(name, layer, suffix)
    why = _NO_COUNTERPART.get(suffix)
    if why:
        raise SelectionError(f"TransformerLens hook {name!r} has no actstore source: {why}")
    known = ", ".join([*GLOBAL_HOOKS, *(f"blocks.N.{s}" for s in LAYER_HOOKS)])
    raise SelectionError(f"unknown TransformerLens hook {name!r}; known: {known}")


def _mlp_source(gated_mlp: bool | None, name: str) -> str:
    if gated_mlp is None:
        raise SelectionError(
            f"{name}: which source it is depends on the run's MLP (gated or not); name a run"
        )
    return "mlp_gate" if gated_mlp else "mlp_up"


def to_source(
    name: str, *, gated_mlp: bool | None = None, family: str | None = None
) -> tuple[str, int | None]:
    """(actstore source, layer) of a TransformerLens hook name, for a model of ``family``
    whose MLP is gated or not (the run's ``meta['gated_mlp']``; None: not known, and the
    names whose source depends on it are refused)."""
    hook = parse(name)
    if hook.layer is None:
        return GLOBAL_HOOKS[hook.suffix], None
    if hook.suffix in _POST_NORMED and family in _POST_NORM_FAMILIES:
        raise SelectionError(
            f"{name}: in {family} TransformerLens hooks this after the post-norm, while actstore stores the "
            f"projection's output before it (source {LAYER_HOOKS[hook.suffix]})"
        )
    if hook.suffix == "mlp.hook_pre_linear" and gated_mlp is False:
        raise SelectionError(
            f"{name}: only gated MLPs have it; this run's MLP is not gated (use mlp.hook_pre)"
        )
    source = LAYER_HOOKS[hook.suffix] or _mlp_source(gated_mlp, name)
    return source, hook.layer


def pointer(name: str) -> str:
    """What to pass instead of a hook name where an actstore source is taken."""
    hook = parse(name)  # an unmapped name raises its own message
    source = GLOBAL_HOOKS.get(hook.suffix) or LAYER_HOOKS[hook.suffix] or "mlp_gate (gated MLP) or mlp_up"
    at = f" at layer {hook.layer} (layers=[{hook.layer}])" if hook.layer is not None else ""
    return (f"{name!r} is a TransformerLens hook name: pass source {source!r}{at}, "
            f"or read it with RunReader.hook({name!r})")  # fmt: skip


def depends_on_model(name: str) -> bool:
    """True when the name's source differs between model families (see :func:`to_source`)."""
    return parse(name).suffix in ("mlp.hook_pre", "mlp.hook_pre_linear", *_POST_NORMED)


def run_facts(run: Any) -> dict[str, Any]:
    """The facts :func:`to_source` needs, from a run's metadata."""
    meta = run.meta
    family = ((meta.get("model") or {}).get("arch") or {}).get("family")
    return {"gated_mlp": meta.get("gated_mlp"), "family": family}


def for_run(name: str, run: Any) -> tuple[str, int | None]:
    """(source, layer) of ``name`` in ``run`` (a RunReader)."""
    return to_source(name, **run_facts(run))


def hook_name(source: str, layer: int | None, *, gated_mlp: bool = True) -> str | None:
    """The TransformerLens name of an actstore (source, layer), or None where it has none."""
    for suffix, global_source in GLOBAL_HOOKS.items():
        if source == global_source:
            return suffix
    if layer is None:
        return None
    if source == ("mlp_gate" if gated_mlp else "mlp_up"):
        return f"blocks.{layer}.mlp.hook_pre"
    for suffix, mapped in LAYER_HOOKS.items():
        if mapped == source and not (suffix == "mlp.hook_pre_linear" and not gated_mlp):
            return f"blocks.{layer}.{suffix}"
    return None


def translate_options(kwargs: dict[str, Any], facts: Callable[[], dict[str, Any]]) -> None:
    """Rewrite a command's ``source``/``sources`` and ``layers``/``layer`` options in place
    when a source is a TransformerLens name: the name becomes its source and fixes the layer.

    ``facts`` gives the named runs' :func:`run_facts`, asked only for names whose source
    depends on the model. A ``--layers``/``--layer`` naming another layer is an error.
    """
    key = "source" if "source" in kwargs else "sources" if "sources" in kwargs else None
    if key is None:
        return
    given = [kwargs[key]] if key == "source" else list(kwargs[key] or ())
    if not any(isinstance(s, str) and looks_like_hook(s) for s in given):
        return
    known: dict[str, Any] | None = None
    sources: list[str] = []
    layers: set[int] = set()
    for s in given:
        if not looks_like_hook(s):
            sources.append(s)
            continue
        if depends_on_model(s) and known is None:
            known = facts()
        source, layer = to_source(s, **(known or {}))
        sources.append(source)
        if layer is not None:
            layers.add(layer)
    kwargs[key] = sources[0] if key == "source" else tuple(sources)
    if len(layers) > 1:
        raise SelectionError(
            f"--source names TransformerLens hooks of layers {', '.join(map(str, sorted(layers)))}: "
            "give hooks of one layer, or actstore sources with --layers"
        )
    if not layers:
        return
    (layer,) = layers
    hook = next(s for s in given if looks_like_hook(s))
    if "layers" in kwargs:
        if kwargs["layers"] not in ("all", str(layer)):
            raise SelectionError(
                f"--source {hook} fixes layer {layer}, but --layers is {kwargs['layers']}: "
                f"drop --layers or give --layers {layer}"
            )
        kwargs["layers"] = str(layer)
    elif "layer" in kwargs:
        if kwargs["layer"] not in (None, layer):
            raise SelectionError(
                f"--source {hook} fixes layer {layer}, but --layer is {kwargs['layer']}: "
                f"drop --layer or give --layer {layer}"
            )
        kwargs["layer"] = layer
