"""Choosing the next token, and the per-step facts the seed records about it.

Sampling runs on the CPU with a seeded ``torch.Generator`` so a run reproduces on any
device. Filtering follows transformers' warpers: temperature, then top-k, then top-p
(nucleus, always keeping the most likely token).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Choice:
    token_id: int
    argmax_id: int
    argmax_logprob: float
    top_k: list[tuple[int, float]]  # (token id, logprob) of the k most likely tokens
    # Activation Lab's distribution facts over the whole vocabulary: entropy (nats),
    # effective_vocab (exp of it) and top1_prob.
    logit_stats: dict[str, float]


def make_generator(seed: int) -> torch.Generator:
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed)
    return gen


def filter_logits(
    logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None
) -> torch.Tensor:
    """Scaled, filtered logits (filtered entries -inf), as transformers' warpers do."""
    x = logits / temperature
    if top_k is not None and top_k < x.numel():
        kth = torch.topk(x, top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_x, order = torch.sort(x, descending=False)
        cum = sorted_x.softmax(-1).cumsum(-1)
        drop_sorted = cum <= (1 - top_p)
        drop_sorted[-1] = False  # keep at least the most likely token
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        x = x.masked_fill(drop, float("-inf"))
    return x


def choose(
    logits: torch.Tensor,
    *,
    do_sample: bool,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator,
    n_top: int,
) -> Choice:
    """Pick the next token from one position's logits (any device, any dtype)."""
    x = logits.detach().float().cpu()
    logprobs = torch.log_softmax(x, dim=-1)
    argmax = int(torch.argmax(x))
    if do_sample:
        probs = torch.softmax(filter_logits(x, temperature, top_k, top_p), dim=-1)
        token = int(torch.multinomial(probs, 1, generator=generator))
    else:
        token = argmax
    top: list[tuple[int, float]] = []
    if n_top > 0:
        vals, ids = torch.topk(logprobs, min(n_top, logprobs.numel()))
        top = [(int(i), float(v)) for i, v in zip(ids, vals, strict=True)]
    return Choice(token, argmax, float(logprobs[argmax]), top, logit_stats(logprobs))


def logit_stats(logprobs: torch.Tensor) -> dict[str, float]:
    """Entropy, its exponent and the top probability of one position's log-probabilities,
    computed as Activation Lab does (float32); a -inf log-probability adds nothing."""
    probs = logprobs.exp()
    entropy = float(-torch.where(probs > 0, probs * logprobs, 0.0).sum())
    return {
        "entropy": entropy,
        "effective_vocab": float(torch.exp(torch.tensor(entropy))),
        "top1_prob": float(probs.max()),
    }


def step_record(
    step: int, input_ids: list[int], choice: Choice, tokenizer: Any, positions: range
) -> dict[str, Any]:
    """The seed's steps.json entry for one forward pass (plus its positions)."""
    tok = tokenizer.convert_ids_to_tokens
    return {
        "step": step,
        "kind": "prefill" if step == 0 else "decode",
        "seq_len": len(input_ids),
        "input_token_ids": list(input_ids),
        "input_tokens": tok(list(input_ids)),
        "generated_token_id": choice.token_id,
        "generated_token": tok(choice.token_id),
        "logit_argmax_id": choice.argmax_id,
        "logit_argmax_logprob": choice.argmax_logprob,
        "top_k": [{"id": i, "token": tok(i), "logprob": lp} for i, lp in choice.top_k],
        "logit_stats": choice.logit_stats,
        "positions": [positions.start, positions.stop],
    }
