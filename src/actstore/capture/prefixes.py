"""Full snapshot and reference passes, sharing the computation of common prefixes.

A conversation snapshot is the prefill of ``messages[:k]``; with causal attention, the
keys and values of the tokens that prefix shares with the full prompt are exactly those
the main prefill already computed. So each snapshot is a short forward pass (the few
tokens after the shared prefix, usually the generation prompt) over a slice of the main
prefill's KV cache, instead of a prefill of the whole prefix, and its shared positions
are read back from the run (store/passes.py). References share their own common prefix
(the system preamble) with earlier references the same way.

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
) -> Any:
    """One forward pass; asks for last-position logits only where the model supports it."""
    params = _forward_params(type(model))  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {"input_ids": input_ids, "use_cache": use_cache}
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
    best_n, best_base, covered = 0, None, False
    for base in bases:
        common = common_prefix(seq, base.tokens)
        n = min(common, len(seq) - 1)
        if n > best_n:
            best_n, best_base, covered = n, base, common == len(seq)
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
