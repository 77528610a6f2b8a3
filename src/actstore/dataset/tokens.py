"""Corpus rows to token ids: plain text through the tokenizer (with its own special
tokens, e.g. BOS), messages through its chat template; both cut to the context."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from actstore.capture.prompts import render_ids
from actstore.dataset.batches import TokenizedSequence
from actstore.dataset.inputs import Row


def row_ids(tokenizer: Any, row: Row, *, generation_prompt: bool) -> list[int]:
    if row.messages is None:
        assert row.text is not None
        return list(tokenizer(row.text)["input_ids"])
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(row.messages, add_generation_prompt=generation_prompt, tokenize=False)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return render_ids(tokenizer, row.messages)  # no template: contents joined by newlines


def tokenize(
    tokenizer: Any, rows: Sequence[Row], first_index: int, *, limit: int | None, generation_prompt: bool
) -> list[TokenizedSequence]:
    """Sequences numbered from ``first_index``, each cut to its first ``limit`` tokens."""
    out = []
    for k, row in enumerate(rows):
        ids = row_ids(tokenizer, row, generation_prompt=generation_prompt)
        out.append(TokenizedSequence(first_index + k, ids[:limit] if limit is not None else ids, row.labels))
    return out
