"""Logit lens: what each layer's residual stream would predict.

>>> from actstore.models.loading import load_model                        # doctest: +SKIP
>>> from actstore.scenario import ModelConfig                             # doctest: +SKIP
>>> loaded = load_model(ModelConfig(id="smollm2", dtype="float32", device="cpu"))  # doctest: +SKIP
>>> df = logit_lens(run, loaded, steps=[0, -1], top_k=5)                  # doctest: +SKIP
>>> write_logit_lens_json(df, "results/logit_lens.json")                  # doctest: +SKIP

Data flow: the stored hidden_out of every captured layer at one position per step is
read lazily (one Zarr read for all steps), then passed, one step at a time to keep
memory at ``layers x vocabulary``, through the model's final norm and LM head (and gemma2's logit softcap; found by
``actstore.models.architectures.resolve_sites``). Log-softmax gives each layer's
next-token distribution; the table keeps its top-k tokens, its argmax, and
``kl_from_final``. That is Activation Lab's definition, KL(layer || final) =
sum_v p_layer(v) (log p_layer(v) - log p_final(v)), where *final* is the last captured
layer, whether or not ``layers`` selects it. With the model's last layer captured, that
distribution is the model's own output (hidden_out of the last block is taken before
the final norm, as the model does).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from actstore.errors import SelectionError
from actstore.paths import check_file, writing
from actstore.query.states import select, step_index


def lens_function(model: Any) -> Any:
    """hidden_out -> logits: the model's final norm, LM head and (gemma2) logit softcap."""
    import torch

    from actstore.models.architectures import resolve_sites

    sites = resolve_sites(model)
    norm, head = sites.final_norm, sites.lm_head  # modules, found by resolve_sites
    cap = getattr(sites, "logit_softcapping", None)

    def lens(h: Any) -> Any:
        logits = head(norm(h))
        return torch.tanh(logits / cap) * cap if cap else logits

    return lens


def kl_from_final(logp: Any, final: Any) -> Any:
    """KL(layer || final) per row of ``logp`` (torch log-probs, ``(L, V)``) against the
    log-probs ``final`` (``(V,)``): sum_v p_layer (log p_layer - log p_final), Activation
    Lab's direction, so the two tools' numbers agree."""
    return (logp.exp() * (logp - final)).sum(-1)


def check_request(
    run: Any, steps: list[int] | None, position: int = -1, top_k: int = 10, layers: list[int] | None = None
) -> tuple[list[int], list[int]]:
    """(step ids, token positions) of a logit-lens request, or a SelectionError: cheap
    metadata checks, so the CLI makes them before it loads the model."""
    if top_k < 1:
        raise SelectionError(f"--top-k {top_k}: give how many top tokens to keep per layer, 1 or more")
    run.layer_index(layers)
    step_ids = [step_index(run, s) for s in (steps if steps is not None else range(run.n_steps))]
    positions = []
    for s in step_ids:
        rng = run.step_positions(s)
        if not -len(rng) <= position < len(rng):
            raise SelectionError(
                f"step {s} computed {len(rng)} position(s); position {position} is out of range"
            )
        positions.append(rng[position])
    return step_ids, positions


def logit_lens(
    run: Any,
    loaded: Any,
    steps: list[int] | None = None,
    position: int = -1,
    top_k: int = 10,
    layers: list[int] | None = None,
) -> pd.DataFrame:
    """Per step and layer: top-k tokens with log-probabilities, the argmax and
    KL(layer || final) (:func:`kl_from_final`; *final* is the last captured layer, read
    too when ``layers`` leaves it out).
    ``position`` indexes the positions each step computed (-1: the last one; the
    prefill computes the whole prompt). Columns: run, step, position, layer, argmax_id,
    argmax_token, argmax_logprob, kl_from_final, top."""
    import torch

    step_ids, positions = check_request(run, steps, position, top_k, layers)
    lay = list(run.layers) if layers is None else list(layers)
    last = run.layers[-1]
    read = lay if last in lay else [*lay, last]  # the KL reference, in the same read
    hidden = select(run, "hidden_out", positions, read).compute()  # (L, n, H), one read
    ref = read.index(last)
    model, tok = loaded.model, loaded.tokenizer
    lens = lens_function(model)
    param = next(model.parameters())
    rows: list[dict[str, Any]] = []
    with torch.inference_mode():
        for j, (step, pos) in enumerate(zip(step_ids, positions, strict=True)):
            h = torch.from_numpy(np.ascontiguousarray(hidden[:, j])).to(param.device, param.dtype)
            logp = torch.log_softmax(lens(h).float(), dim=-1)  # (L, V)
            kl_t = kl_from_final(logp, logp[ref])
            top_v, top_i = torch.topk(logp, min(top_k, logp.shape[-1]), dim=-1)
            vals, ids = top_v.cpu().numpy(), top_i.cpu().numpy()
            kl = np.maximum(kl_t.cpu().numpy(), 0.0)  # rounding can dip below 0
            for i, layer in enumerate(lay):
                top = [{"token": tok.decode([int(t)]), "id": int(t), "logprob": float(v)}
                       for t, v in zip(ids[i], vals[i], strict=True)]  # fmt: skip
                rows.append({"run": run.id, "step": step, "position": int(pos), "layer": layer,
                             "argmax_id": int(ids[i, 0]), "argmax_token": top[0]["token"],
                             "argmax_logprob": float(vals[i, 0]), "kl_from_final": float(kl[i]),
                             "top": top})  # fmt: skip
    return pd.DataFrame(rows)


def logit_lens_records(df: pd.DataFrame) -> list[dict[str, Any]]:
    """The seed's logit_lens.json entries (plus ``step``), one per step and layer."""
    keys = ["step", "layer", "argmax_token", "argmax_logprob", "kl_from_final"]
    return [
        {
            **{k: (v.item() if hasattr(v, "item") else v) for k, v in zip(keys, rec[:-1], strict=True)},
            "top": [{"token": t["token"], "logprob": t["logprob"]} for t in rec[-1]],
        }  # fmt: skip
        for rec in df[[*keys, "top"]].itertuples(index=False, name=None)
    ]


def write_logit_lens_json(df: pd.DataFrame, path: str | Path) -> Path:
    """Write :func:`logit_lens_records` as JSON; returns the path."""
    p = Path(path)
    check_file(p, "output file")
    with writing(p, "output file"):
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(logit_lens_records(df), indent=2, ensure_ascii=False))
    return p
