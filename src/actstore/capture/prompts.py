"""Turning message lists into token ids, the same way for prompts, snapshots and references.

Every message list is rendered with the tokenizer's chat template with the generation
prompt appended; a tokenizer without a template gets the messages' contents joined by
newlines (with the tokenizer's own special tokens).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def as_dicts(messages: Sequence[Any]) -> list[dict[str, str]]:
    return [m if isinstance(m, dict) else {"role": m.role, "content": m.content} for m in messages]


def render_ids(tokenizer: Any, messages: Sequence[Any]) -> list[int]:
    msgs = as_dicts(messages)
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer("\n".join(m["content"] for m in msgs))["input_ids"])


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
