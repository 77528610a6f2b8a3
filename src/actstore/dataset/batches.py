"""Batched forward passes over tokenized sequences, yielding the kept rows of each batch.

Data flow of one batch::

    sequences --left pad + attention mask, position ids from the mask--> prefill (hooks)
              [--greedy decode, one token per pass, same hooks--> ...]
    every pass's (B, S, W) tensors --gather the kept (sequence, position) pairs-->
    BatchRows: (n_rows, W) per (source, layer) key, rows in sequence order, plus the
    token id, dataset sequence index, position and labels of every row

Pads are never kept (they are outside every sequence's positions). :func:`batch_rows`
knows nothing of stores: the unit writer consumes its output, and any other writer
(a token-major layout) can too.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from actstore.capture import prefixes
from actstore.capture.hooks import Key, Recorder
from actstore.dataset.settings import kept_positions


@dataclass(frozen=True)
class TokenizedSequence:
    index: int  # the sequence's index in the whole corpus
    ids: list[int]
    labels: dict[str, Any] = field(default_factory=dict)


@dataclass
class BatchRows:
    """The kept rows of one batch: activations and what every row is."""

    tensors: dict[Key, torch.Tensor]  # (n_rows, W) in the store dtype, on the model's device
    token_ids: np.ndarray  # (n_rows,) int32
    sequence_index: np.ndarray  # (n_rows,) int64
    position: np.ndarray  # (n_rows,) int32
    labels: dict[str, list[Any]]  # column -> one value per row

    def __len__(self) -> int:
        return len(self.token_ids)

    def head(self, n: int) -> BatchRows:
        """The first ``n`` rows (a token budget that ends inside this batch)."""
        return BatchRows(
            {k: v[:n] for k, v in self.tensors.items()}, self.token_ids[:n], self.sequence_index[:n],
            self.position[:n], {c: v[:n] for c, v in self.labels.items()},
        )  # fmt: skip


class BatchRecorder(Recorder):
    """The capture hooks, keeping the batch axis (a scenario pass has batch size 1)."""

    def _keep(self, key: Key, kind: str, t: torch.Tensor) -> None:
        if self.mode == "step" and (kind in self.sources or (kind == "residual" and "hidden_in" in self.sources)):
            self.tensors[key] = t.detach().to(self.dtype)


@dataclass(frozen=True)
class ForwardPlan:
    """What every batch needs to know, fixed for a capture."""

    pad_id: int
    eos_ids: frozenset[int]
    special_ids: frozenset[int] | None  # None: special tokens are kept
    positions: tuple[str, int | None, int | None]
    max_new_tokens: int
    logits: bool  # logits are a captured source
    store_dtype: torch.dtype


def batch_rows(
    model: Any,
    rec: BatchRecorder,
    sequences: Sequence[TokenizedSequence],
    batch_size: int,
    plan: ForwardPlan,
    device: torch.device,
) -> Iterator[BatchRows]:
    """One BatchRows per batch of ``batch_size`` sequences, in order (empty sequences
    have no positions and are skipped)."""
    seqs = [s for s in sequences if s.ids]
    for start in range(0, len(seqs), batch_size):
        yield _one_batch(model, rec, seqs[start : start + batch_size], plan, device)


@torch.inference_mode()
def _one_batch(
    model: Any, rec: BatchRecorder, seqs: Sequence[TokenizedSequence], plan: ForwardPlan, device: torch.device
) -> BatchRows:
    b, width = len(seqs), max(len(s.ids) for s in seqs)
    ids = torch.full((b, width), plan.pad_id, dtype=torch.long)
    mask = torch.zeros((b, width), dtype=torch.long)
    for i, s in enumerate(seqs):  # left padding: every sequence ends in the last column
        ids[i, width - len(s.ids) :] = torch.tensor(s.ids)
        mask[i, width - len(s.ids) :] = 1
    ids, mask = ids.to(device), mask.to(device)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    gen = plan.max_new_tokens
    passes: list[dict[Key, torch.Tensor]] = []
    fed = [list(s.ids) for s in seqs]
    rec.mode = "step"
    try:
        out = prefixes.forward(model, ids, attention_mask=mask, position_ids=pos, use_cache=gen > 1,
                               last_logits_only=not plan.logits)  # fmt: skip
        passes.append(_with_logits(rec.take(), out, plan))
        # Greedy decoding: a sequence chooses up to gen tokens and stops at EOS; the last
        # token it chose is never fed, so (like a scenario run) it has no activations.
        done = [False] * b
        cache = prefixes.cache_of(out)
        for _step in range(1, gen):
            nxt = out.logits[:, -1].argmax(-1)
            for i in range(b):
                done[i] = done[i] or int(nxt[i]) in plan.eos_ids
                if not done[i]:
                    fed[i].append(int(nxt[i]))
            if all(done):
                break
            mask = torch.cat([mask, torch.ones((b, 1), dtype=mask.dtype, device=device)], dim=1)
            pos = pos[:, -1:] + 1
            out = prefixes.forward(model, nxt[:, None], cache=cache, attention_mask=mask, position_ids=pos,
                                   last_logits_only=not plan.logits)  # fmt: skip
            cache = prefixes.cache_of(out)
            passes.append(_with_logits(rec.take(), out, plan))
    finally:
        rec.mode = None
        rec.take()
    return _gather(passes, seqs, fed, width, plan)


def _with_logits(tensors: dict[Key, torch.Tensor], out: Any, plan: ForwardPlan) -> dict[Key, torch.Tensor]:
    if plan.logits:
        tensors[("logits", None)] = out.logits.to(plan.store_dtype)
    return tensors


def _gather(
    passes: list[dict[Key, torch.Tensor]],
    seqs: Sequence[TokenizedSequence],
    fed: list[list[int]],
    width: int,
    plan: ForwardPlan,
) -> BatchRows:
    """Rows of every sequence's kept positions, sequence by sequence. Sequence i's
    position p sits in column ``width - len(prompt_i) + p`` of the passes laid side by side."""
    rows_b, rows_c, tok, seq_index, position = [], [], [], [], []
    labels: dict[str, list[Any]] = {c: [] for c in (seqs[0].labels if seqs else {})}
    for i, (s, f) in enumerate(zip(seqs, fed, strict=True)):
        special = [t in plan.special_ids for t in f] if plan.special_ids is not None else None
        kept = kept_positions(len(f), plan.positions, special)
        offset = width - len(s.ids)
        rows_b += [i] * len(kept)
        rows_c += [offset + p for p in kept]
        tok += [f[p] for p in kept]
        seq_index += [s.index] * len(kept)
        position += kept
        for c in labels:
            labels[c] += [s.labels[c]] * len(kept)
    bi = torch.tensor(rows_b, dtype=torch.long)
    ci = torch.tensor(rows_c, dtype=torch.long)
    tensors = {}
    for key in passes[0]:
        full = passes[0][key] if len(passes) == 1 else torch.cat([p[key] for p in passes], dim=1)
        tensors[key] = full[bi.to(full.device), ci.to(full.device)]
    return BatchRows(
        tensors,
        np.asarray(tok, dtype=np.int32),
        np.asarray(seq_index, dtype=np.int64),
        np.asarray(position, dtype=np.int32),
        labels,
    )
