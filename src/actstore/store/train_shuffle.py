"""Shuffled epochs over a train layout, as NumPy batches (torch.py wraps this for torch).

The order of one epoch is a pure function of (seed, epoch, reader count), so every reader
computes its own share without talking to the others, and a resumed reader recomputes
where it was:

1. the layout's chunks are permuted with ``default_rng([seed, epoch])``;
2. reader ``g`` of ``G`` (one per DataLoader worker on each rank) takes every G-th chunk
   of that permutation, so every chunk, hence every token, is read exactly once;
3. a reader reads its chunks ``buffer_chunks`` at a time into one buffer, permutes the
   buffer's rows with ``default_rng([seed, epoch, g, group])`` and cuts batches from the
   stream of permuted rows (a batch may span two buffers).

Resuming skips ``consumed[g]`` rows of reader g's stream: whole buffers are skipped
without being read (their sizes are known from the chunk table), then the one buffer
holding the resume point is read and the stream continues mid-buffer.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np

from actstore.store import train_layout as tl
from actstore.store.train_read import Chunk, TrainLayout

# Object storage: a buffer's chunks are fetched concurrently (latency, not CPU, is the
# limit). A local store reads them one after another: measured on 2 cores, threads made
# an epoch slower (0.69x of a memory map alone, 0.32-0.48x with 2-4 threads).
READ_THREADS = 8


@dataclass(frozen=True)
class EpochPlan:
    """Who reads what in one epoch."""

    seed: int
    epoch: int
    reader: int  # g: rank * workers + worker
    readers: int  # G
    shuffle: bool = True
    buffer_chunks: int = 64

    def chunk_order(self, n_chunks: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(n_chunks)
        return np.random.default_rng([self.seed, self.epoch]).permutation(n_chunks)

    def my_chunks(self, n_chunks: int) -> np.ndarray:
        return self.chunk_order(n_chunks)[self.reader :: self.readers]

    def row_order(self, group: int, n_rows: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(n_rows)
        return np.random.default_rng([self.seed, self.epoch, self.reader, group]).permutation(n_rows)


def reader_rows(layout: TrainLayout, plan: EpochPlan) -> int:
    """Rows reader ``plan.reader`` yields in the epoch."""
    return int(sum(layout.chunks[i].n_rows for i in plan.my_chunks(len(layout.chunks))))


def _read_group(layout: TrainLayout, chunks: list[Chunk], sites: list[tl.Site], pool: ThreadPoolExecutor | None,
                buf: dict[str, np.ndarray]) -> None:  # fmt: skip
    """Read ``chunks`` back to back into the first rows of the buffers ``buf``."""
    offsets = np.cumsum([0] + [c.n_rows for c in chunks[:-1]])
    jobs = list(zip(chunks, offsets.tolist(), strict=True))
    list((pool.map if pool is not None else map)(lambda j: layout.read_into(j[0], sites, buf, j[1]), jobs))


def iter_batches(
    layout: TrainLayout,
    sites: list[tl.Site],
    plan: EpochPlan,
    batch_size: int,
    *,
    skip: int = 0,
    drop_last: bool = False,
) -> Iterator[dict[str, np.ndarray]]:
    """Batches of reader ``plan.reader``'s share of one epoch, after its first ``skip``
    rows: dicts of site name -> (B, d) stored values (bfloat16 as uint16 bits) plus
    token_ids, sequence_index, position and each label column, (B,)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, not {batch_size}")
    mine = [layout.chunks[i] for i in plan.my_chunks(len(layout.chunks))]
    k = max(1, plan.buffer_chunks)
    groups = [mine[i : i + k] for i in range(0, len(mine), k)]
    carry: dict[str, np.ndarray] | None = None  # rows of a batch the previous buffer started
    full: dict[str, np.ndarray] | None = None  # the shuffle buffer
    threads = READ_THREADS if not layout.local else 1
    with ThreadPoolExecutor(threads) if threads > 1 else nullcontext() as pool:
        for gi, group in enumerate(groups):
            size = sum(c.n_rows for c in group)
            if skip >= size:
                skip -= size
                continue
            if full is None or len(next(iter(full.values()))) < size:
                full = layout.empty(sites, size)  # reused: no fresh pages for every buffer
            _read_group(layout, group, sites, pool, full)
            buf = {key: v[:size] for key, v in full.items()}
            order = plan.row_order(gi, size)[skip:]
            skip = 0
            pos = 0
            if carry is not None:
                need = batch_size - len(next(iter(carry.values())))
                take = order[:need]
                carry = {key: np.concatenate([carry[key], v[take]]) for key, v in buf.items()}
                pos = len(take)
                if len(next(iter(carry.values()))) < batch_size:
                    continue
                yield carry
                carry = None
            while pos < len(order):
                idx = order[pos : pos + batch_size]
                pos += len(idx)
                batch = {key: v[idx] for key, v in buf.items()}
                if len(idx) < batch_size:
                    carry = batch
                else:
                    yield batch
    if carry is not None and not drop_last:
        yield carry
