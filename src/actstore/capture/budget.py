"""Will a capture fit? Prompt length against the model's context, and memory against the machine.

Both checks run after the model loads (its config and tokenizer are the truth) and before
anything is allocated or created: a 1 MB message used to make eager attention ask for
30.6 GB, and 10,000 messages spent minutes rendering snapshot prefixes before failing.

The memory figure is an estimate of the prefill's peak, the largest pass of a capture:
eager attention scores (heads x T x T, float32, one layer at a time, as scores and as
probabilities), the recorded activations of every captured layer (held until the writer
takes them), attention weights kept per layer, and full-sequence logits.
"""

from __future__ import annotations

import os
import resource
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from actstore import naming
from actstore.errors import ResourceError, ScenarioError
from actstore.scenario import Problem

# Config attributes that bound the positions a model can attend over, most specific first.
_CONTEXT_ATTRS = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length")


def context_limit(config: Any) -> int | None:
    """The most positions ``config``'s model handles, or None if the config does not say."""
    for cfg in (config, getattr(config, "text_config", None)):
        for attr in _CONTEXT_ATTRS:
            value = getattr(cfg, attr, None) if cfg is not None else None
            if isinstance(value, int) and value > 0:
                return value
    return None


def context_problems(scenario: Any, model_id: str, limit: int | None, prompt_len: int,
                     ref_lens: Sequence[int]) -> list[Problem]:  # fmt: skip
    """Where prompt + generated tokens, or a reference prompt, overflow the model's context."""
    if limit is None:
        return []
    out = []
    gen = scenario.generation.max_new_tokens
    positions = prompt_len + gen - 1  # the last generated token is never fed back
    if positions > limit:
        field = scenario.prompt_field
        out.append(Problem(
            scenario.source, f"{field}.messages",
            f"the prompt is {prompt_len} tokens and generation.max_new_tokens is {gen}, {positions} "
            f"positions, but {model_id} handles {limit}",
            f"shorten {field}.messages or lower generation.max_new_tokens",
        ))  # fmt: skip
    for i, n in enumerate(ref_lens):
        if n > limit:
            out.append(Problem(scenario.source, f"reference_states[{i}].messages",
                               f"{n} tokens, but {model_id} handles {limit}",
                               "shorten that reference's messages"))  # fmt: skip
    return out


def check_context(scenario: Any, model_id: str, limit: int | None, prompt_len: int,
                  ref_lens: Sequence[int]) -> None:  # fmt: skip
    """Prompt + generated tokens, and every reference prompt, fit the model's context."""
    problems = context_problems(scenario, model_id, limit, prompt_len, ref_lens)
    if problems:
        raise ScenarioError(problems[0].line())


def check_prefix(scenario: Any, model_id: str, limit: int | None, k: int, n: int) -> None:
    """Snapshot prefix ``messages[:k + 1]`` fits (its generation prompt can add a few tokens)."""
    if limit is not None and n > limit:
        raise ScenarioError(
            f"{scenario.source}: {scenario.prompt_field}.messages[{k}]: the conversation up to this message is {n} "
            f"tokens, but {model_id} handles {limit} (shorten {scenario.prompt_field}.messages)"
        )


@dataclass(frozen=True)
class Estimate:
    """Bytes the prefill needs, by part."""

    attention_scores: int
    attention_weights: int
    activations: int
    logits: int

    @property
    def total(self) -> int:
        return self.attention_scores + self.attention_weights + self.activations + self.logits

    def describe(self) -> str:
        parts = [("attention scores", self.attention_scores), ("attention weights", self.attention_weights),
                 ("activations", self.activations), ("logits", self.logits)]  # fmt: skip
        return ", ".join(f"{name} {_gib(b)}" for name, b in parts if b)


def _width(source: str, sites: Any) -> int:
    """Values per position and layer of a recorded source (derived sources record nothing)."""
    return {
        "hidden_in": sites.hidden_size,  # the residual array: one row per boundary
        "hidden_out": 0,
        "q": sites.q_width,
        "k": sites.kv_width,
        "v": sites.kv_width,
        "attn_out": sites.hidden_size,
        "mlp_gate": sites.intermediate_size,
        "mlp_up": sites.intermediate_size,
        "mlp_act": sites.intermediate_size,
        "mlp_down_in": 0,
        "mlp_down_out": sites.hidden_size,
        "embeddings": 0,
        "logits": 0,
    }.get(source, 0)


def estimate(sites: Any, n_layers: int, sources: Sequence[str], tokens: int, store_bytes: int,
             eager: bool) -> Estimate:  # fmt: skip
    """The prefill's peak for ``tokens`` prompt tokens and ``n_layers`` captured layers."""
    t = tokens
    scores = 2 * sites.num_heads * t * t * 4 if eager else 0
    weights = n_layers * sites.num_heads * t * t * store_bytes if "attn_weights" in sources else 0
    per_layer = sum(_width(s, sites) for s in sources if s in naming.LAYER_SOURCES)
    acts = n_layers * t * per_layer * store_bytes
    if "embeddings" in sources:
        acts += t * sites.hidden_size * store_bytes
    logits = t * sites.vocab_size * (4 + store_bytes) if "logits" in sources else 0
    return Estimate(scores, weights, acts, logits)


def available_memory(device: Any = None) -> int | None:
    """Bytes this process can still allocate: free GPU memory on a CUDA device; else the
    smaller of MemAvailable and what ``ulimit -v`` leaves. None when unknown."""
    if device is not None and getattr(device, "type", None) == "cuda":
        import torch

        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except Exception:  # noqa: BLE001 - unknown means skip the check
            return None
    known = [v for v in (_mem_available(), _address_space_left()) if v is not None]
    return min(known) if known else None


def _mem_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _address_space_left() -> int | None:
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    try:
        with open("/proc/self/status") as f:
            used = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    except (OSError, ValueError, StopIteration):
        return None
    return max(soft - used, 0)


def check_memory(scenario: Any, need: Estimate, available: int | None, force: bool) -> None:
    if force or available is None or need.total <= available:
        return
    raise ResourceError(
        f"{scenario.source}: {scenario.prompt_field}.messages: capturing needs about {_gib(need.total)} "
        f"({need.describe()}) but {_gib(available)} is available (shorten {scenario.prompt_field}.messages, "
        "set capture.attention_weights: false, capture fewer capture.layers, or pass --force to try anyway)"
    )


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 / 10 else f"{n / 2**20:.1f} MiB"
