"""Full snapshot and reference passes, sharing the computation of common prefixes.

A conversation snapshot is the prefill of ``messages[:k]``; with causal attention, the
keys and values of the tokens that prefix shares with the full prompt are exactly those
the main prefill already computed. So each snapshot is a short forward pass (the few
tokens after the shared prefix, usually the generation prompt) over a slice of the main
prefill's KV cache, instead of a prefill of the whole prefix, and its shared positions
are read back from the run (store/passes.py). References share their own common prefix
(the system preamble) with earlier references the same way.

Snapshots that extend one base are also packed into a single forward pass
(:func:`base_passes`): their own tokens side by side, each at its own positions, under
a mask that lets each see only the base's first positions it shares and its own
earlier tokens. A pass over a few tokens costs what reading the weights costs, so one
pass for twenty snapshots instead of twenty saves most of their time.

A slice is only taken from a plain ``DynamicCache``; anything else (sliding-window or
hybrid caches) falls back to a separate prefill, which is always correct.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from actstore.capture.hooks import Key, Recorder
from actstore.capture.prompts import common_prefix


@dataclass
class Base:
    """A token sequence whose KV cache can seed other passes; ``index`` is where its
    positions are stored (None: the run's own, else the number of a full pass)."""

    tokens: list[int]
    cache: Any
    index: int | None = None


@dataclass
class Pass:
    """One full pass: every position from ``shared`` on (``own``, store dtype), the
    last position's residual-stream vectors (``last``, float32), its base and cache."""

    own: dict[Key, torch.Tensor]
    last: dict[Key, torch.Tensor]
    base: Base | None
    shared: int
    cache: Any
    covered: bool = False  # every token is in the base: nothing of its own to store


def sliced_cache(cache: Any, n: int) -> DynamicCache | None:
    """A new cache holding the first ``n`` positions of ``cache``, or None if unsafe."""
    if type(cache) is not DynamicCache or not cache.layers:
        return None
    if any(type(layer) is not DynamicLayer for layer in cache.layers):
        return None
    new = DynamicCache()
    for i, layer in enumerate(cache.layers):
        keys, values = layer.keys, layer.values  # type: ignore[union-attr]
        assert keys is not None and values is not None
        new.update(keys[..., :n, :], values[..., :n, :], i)
    return new


def forward(
    model: Any,
    input_ids: torch.Tensor,
    *,
    cache: Any = None,
    use_cache: bool = True,
    last_logits_only: bool = True,
    **extra: Any,
) -> Any:
    """One forward pass; asks for last-position logits only where the model supports it."""
    params = _forward_params(type(model))  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {"input_ids": input_ids, "use_cache": use_cache, **extra}
    if cache is not None:
        # transformers 5.2x renamed past_key_values to cache
        kwargs["cache" if "cache" in params else "past_key_values"] = cache
    if last_logits_only and "logits_to_keep" in params:
        kwargs["logits_to_keep"] = 1
    return model(**kwargs)


@functools.cache
def _forward_params(cls: Any) -> frozenset[str]:
    return frozenset(inspect.signature(cls.forward).parameters)


def cache_of(output: Any) -> Any:
    """The KV cache a forward pass returned (``cache``, formerly ``past_key_values``)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


def best_base_index(seq: list[int], candidates: Sequence[list[int]]) -> int | None:
    """The candidate ``seq`` shares most of its prefix with (the first of equals; at
    least its last token stays its own), or None if it shares nothing."""
    best, best_n = None, 0
    for i, tokens in enumerate(candidates):
        n = min(common_prefix(seq, tokens), len(seq) - 1)
        if n > best_n:
            best, best_n = i, n
    return best


@torch.inference_mode()
def full_pass(
    model: Any,
    recorder: Recorder,
    seq: list[int],
    bases: Sequence[Base],
    device: torch.device,
    logits_dtype: torch.dtype | None = None,
) -> Pass:
    """Run ``seq`` from the base sharing most of its prefix, capturing every position
    after the shared part (and always the last token, so the hooks see it). With
    ``logits_dtype`` the own positions' logits are kept too, in that dtype. A sequence
    the base holds whole (a prefix ending where the prompt's next turn is the
    assistant's) is ``covered``: its positions are all the base's."""
    best = best_base_index(seq, [base.tokens for base in bases])
    best_base = bases[best] if best is not None else None
    common = common_prefix(seq, best_base.tokens) if best_base is not None else 0
    best_n, covered = min(common, len(seq) - 1), common == len(seq)
    cache = sliced_cache(best_base.cache, best_n) if best_base is not None else None
    if cache is None:
        best_n, best_base, covered = 0, None, False
    recorder.mode = "full"
    try:
        out = forward(model, torch.tensor([seq[best_n:]], device=device), cache=cache,
                      last_logits_only=logits_dtype is None)  # fmt: skip
    finally:
        recorder.mode = None
    own, last = recorder.take(), recorder.take_last()
    if logits_dtype is not None:
        own[("logits", None)] = out.logits[0].to(logits_dtype)
    return Pass(own, last, best_base, best_n, cache_of(out), covered)


# Most tokens packed into one pass: its mask is (tokens, base + tokens), and a longer own
# part gains nothing from packing (its own matrix products already amortise the weights).
PACK_TOKENS = 256


def base_passes(
    model: Any,
    recorder: Recorder,
    seqs: Sequence[list[int]],
    base: Base,
    device: torch.device,
    logits_dtype: torch.dtype | None = None,
) -> list[Pass]:
    """:func:`full_pass` of every sequence from ``base``, in order, short ones packed
    into shared forward passes (at most :data:`PACK_TOKENS` tokens each)."""
    results: list[Pass | None] = [None] * len(seqs)
    group: list[int] = []

    def flush() -> None:
        packed = _packed(model, recorder, [seqs[i] for i in group], base, device, logits_dtype)
        for j, i in enumerate(group):
            results[i] = (
                packed[j] if packed else full_pass(model, recorder, seqs[i], [base], device, logits_dtype)
            )
        group.clear()

    def own_tokens(seq: list[int]) -> int:
        return len(seq) - min(common_prefix(seq, base.tokens), len(seq) - 1)

    for i, seq in enumerate(seqs):
        if group and sum(own_tokens(seqs[j]) for j in group) + own_tokens(seq) > PACK_TOKENS:
            flush()
        group.append(i)
    if group:
        flush()
    return [r for r in results if r is not None]


@torch.inference_mode()
def _packed(
    model: Any,
    recorder: Recorder,
    seqs: list[list[int]],
    base: Base,
    device: torch.device,
    logits_dtype: torch.dtype | None,
) -> list[Pass] | None:
    """One forward pass for several sequences extending ``base``; None where that cannot
    be done exactly (one sequence, a cache that cannot be sliced, a model that builds
    its own mask), and the caller runs them one by one."""
    shared = [min(common_prefix(seq, base.tokens), len(seq) - 1) for seq in seqs]
    covered = [common_prefix(seq, base.tokens) == len(seq) for seq in seqs]
    width = max(shared)
    if len(seqs) < 2 or width == 0 or "position_ids" not in _forward_params(type(model)):  # type: ignore[arg-type]
        return None
    window = getattr(getattr(model, "config", None), "sliding_window", None)
    if window and max(map(len, seqs)) > window:
        return None  # the custom mask would replace the model's window
    cache = sliced_cache(base.cache, width)
    if cache is None:
        return None
    ids: list[int] = []
    positions: list[int] = []
    starts: list[int] = []
    for seq, n in zip(seqs, shared, strict=True):
        starts.append(len(ids))
        ids.extend(seq[n:])
        positions.extend(range(n, len(seq)))
    q = len(ids)
    dtype = next(model.parameters()).dtype
    # Additive mask (batch, 1, q, base + q): each sequence sees the base's first
    # ``shared`` positions and its own tokens causally; nothing of the others.
    allowed = torch.zeros((q, width + q), dtype=torch.bool)
    for start, n, seq in zip(starts, shared, seqs, strict=True):
        m = len(seq) - n
        allowed[start : start + m, :n] = True
        allowed[start : start + m, width + start : width + start + m] = torch.ones(
            m, m, dtype=torch.bool
        ).tril()
    mask = torch.zeros((1, 1, q, width + q), dtype=dtype)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    ends = [start + len(seq) - n - 1 for start, n, seq in zip(starts, shared, seqs, strict=True)]
    recorder.mode, recorder.last_rows = "full", ends
    try:
        out = forward(
            model,
            torch.tensor([ids], device=device),
            cache=cache,
            last_logits_only=logits_dtype is None,
            attention_mask=mask.to(device),
            position_ids=torch.tensor([positions], device=device),
        )
    finally:
        recorder.mode, recorder.last_rows = None, None
    tensors, last = recorder.take(), recorder.take_last()
    if logits_dtype is not None:
        tensors[("logits", None)] = out.logits[0].to(logits_dtype)
    results = []
    for k, (start, n, seq) in enumerate(zip(starts, shared, seqs, strict=True)):
        rows = slice(start, start + len(seq) - n)
        own = {}
        for key, t in tensors.items():
            if key[0] == "attn_weights":  # (heads, q, base + q) -> (heads, rows, n + rows)
                cols = t.shape[-1]
                if cols != width + q:
                    return None  # a cache that keeps fewer columns (a sliding window)
                own[key] = torch.cat(
                    [t[:, rows, :n], t[:, rows, width + rows.start : width + rows.stop]], dim=-1
                )
            else:
                own[key] = t[rows]
        results.append(Pass(own, {key: v[k] for key, v in last.items()}, base, n, None, covered[k]))
    return results
