"""PyTorch access to a train layout: :class:`ActivationDataset`, shuffled batches of one or
more (source, layer) sites for probe and SAE training.

>>> ds = ActivationDataset("stores/actstore.zarr", "probes", [("hidden_out", 8)], batch_size=4096)
>>> loader = ds.loader(num_workers=4)            # a DataLoader that records what it served
>>> for epoch in range(3):                                           # doctest: +SKIP
...     ds.set_epoch(epoch)
...     for batch in loader:                     # batch["hidden_out.8"]: (4096, 576) bfloat16
...         ...                                  # batch["token_ids"], batch["labels"]...
>>> ds.stats(("hidden_out", 8)).mean             # normalisation statistics, stored at write

The dataset yields whole batches (use ``batch_size=None`` in a plain DataLoader, or
:meth:`ActivationDataset.loader`). Each epoch permutes the chunks (seeded by ``seed`` and
the epoch), splits them between distributed ranks and DataLoader workers, and shuffles
rows within a buffer of ``buffer_chunks`` chunks: every token once per epoch. See
store/train_shuffle.py for the exact order.

Resuming mid-epoch: :meth:`state_dict` says how many rows each reader (rank x worker)
has handed to the training loop; :meth:`load_state_dict` makes the next iteration skip
exactly those. The count is kept by :meth:`loader` (or :meth:`record` on each batch of
your own DataLoader); iterating the dataset directly in the main process counts itself.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from actstore.errors import SelectionError
from actstore.store import train_layout as tl
from actstore.store.train_read import TrainLayout
from actstore.store.train_shuffle import EpochPlan, iter_batches, reader_rows

WORKER_KEY = "reader"  # batch key: the reader (rank x worker) that made it, for record()

_TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _dist_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class ActivationDataset(IterableDataset):  # type: ignore[type-arg]
    """Shuffled batches of a train layout's sites.

    ``store``: an ActStore or a location (local path or URL; ``storage_options`` for
    object storage). ``sites``: (source, layer) pairs (None: all). ``dtype``: a torch
    dtype to convert values to (None: the store dtype, bfloat16 kept as bfloat16).
    ``rank`` / ``world_size``: this process's share (default: torch.distributed when
    initialised, else the whole layout). Ranks get whole chunks, so their row counts
    can differ by up to a chunk per reader; ``drop_last`` drops each reader's last
    short batch.
    """

    def __init__(
        self,
        store: Any,
        layout: str,
        sites: list[tl.Site] | None = None,
        *,
        batch_size: int = 1024,
        shuffle: bool = True,
        buffer_chunks: int = 64,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        drop_last: bool = False,
        dtype: torch.dtype | None = None,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        from actstore.store.store import ActStore

        if isinstance(store, ActStore):
            self.location, self.storage_options = store.location, storage_options
            self._store: Any = store
        else:
            self.location, self.storage_options = str(store), storage_options
            self._store = ActStore.open(self.location, storage_options=storage_options)
        self.name = layout
        self._layout: TrainLayout | None = TrainLayout.open(self._store, layout)
        self._pid = os.getpid()  # a forked worker must not share the parent's zarr store
        self.sites = self._layout.check_sites(sites)
        if batch_size < 1:
            raise SelectionError(f"batch_size must be >= 1, not {batch_size}")
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.buffer_chunks = buffer_chunks
        self.seed = seed
        if (rank is None) != (world_size is None):
            raise SelectionError("give both rank and world_size, or neither")
        if rank is None or world_size is None:
            rank, world_size = _dist_rank_world()
        if not 0 <= rank < world_size:
            raise SelectionError(f"rank {rank} is not in 0..{world_size - 1}")
        self.rank, self.world_size = rank, world_size
        self.drop_last = drop_last
        self.dtype = dtype
        self.epoch = 0
        self.consumed: dict[int, int] = {}  # reader -> rows handed to the training loop
        self._num_workers: int | None = None  # the worker count consumed[] was counted with
        self._external_count = False  # a loader() is counting: direct iteration must not

    # ---- the layout ----------------------------------------------------------------------
    @property
    def layout(self) -> TrainLayout:
        if self._layout is None or self._pid != os.getpid():  # a worker process: open it there
            self._pid = os.getpid()
            from actstore.store.store import ActStore

            self._store = ActStore.open(self.location, storage_options=self.storage_options)
            self._layout = TrainLayout.open(self._store, self.name)
        return self._layout

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_store"] = state["_layout"] = None  # workers reopen: zarr stores do not pickle
        return state

    @property
    def n_rows(self) -> int:
        """Rows of the whole layout (every rank together)."""
        return self.layout.n_rows

    @property
    def store_dtype(self) -> str:
        return self.layout.store_dtype

    def stats(self, site: tl.Site | None = None) -> tl.SiteStats:
        """Mean / std per dimension, mean and RMS row norm of a site (default: the only
        one), over every row of the layout."""
        if site is None:
            if len(self.sites) != 1:
                raise SelectionError(
                    f"name a site: the dataset reads {', '.join(map(tl.site_name, self.sites))}"
                )
            site = self.sites[0]
        return self.layout.stats(site)

    # ---- epochs and resuming -------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch`` (its own chunk and row order); forgets what was consumed."""
        self.epoch = int(epoch)
        self.consumed = {}

    def record(self, batch: dict[str, Any]) -> None:
        """Count a batch as handed to the training loop (for :meth:`state_dict`)."""
        reader = int(batch[WORKER_KEY])
        self.consumed[reader] = self.consumed.get(reader, 0) + len(batch["token_ids"])

    def state_dict(self) -> dict[str, Any]:
        return {
            "layout": self.name, "epoch": self.epoch, "seed": self.seed, "shuffle": self.shuffle,
            "buffer_chunks": self.buffer_chunks, "rank": self.rank, "world_size": self.world_size,
            "num_workers": self._num_workers, "n_rows": self.n_rows, "consumed": dict(self.consumed),
        }  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the epoch ``state`` was taken in, skipping the rows it had consumed.
        The next iteration must use the same worker count (the readers' shares depend
        on it) and the layout must not have grown."""
        if state["n_rows"] != self.n_rows:
            raise SelectionError(f"layout {self.name} now holds {self.n_rows} rows, {state['n_rows']} when the "
                                 "state was saved: resume needs the same layout")  # fmt: skip
        self.epoch, self.seed, self.shuffle = int(state["epoch"]), int(state["seed"]), bool(state["shuffle"])
        self.buffer_chunks = int(state["buffer_chunks"])
        self.consumed = {int(k): int(v) for k, v in state["consumed"].items()}
        self._num_workers = state["num_workers"]

    # ---- iterating -----------------------------------------------------------------------
    def _reader(self) -> tuple[int, int, int]:
        info = get_worker_info()
        workers, worker = (1, 0) if info is None else (info.num_workers, info.id)
        if self.consumed and self._num_workers is not None and self._num_workers != workers:
            raise SelectionError(f"resuming with {workers} loader worker(s); the state was saved with "
                                 f"{self._num_workers}: use the same num_workers")  # fmt: skip
        return self.rank * workers + worker, self.world_size * workers, workers

    def plan(self, reader: int, readers: int) -> EpochPlan:
        return EpochPlan(self.seed, self.epoch, reader, readers, self.shuffle, self.buffer_chunks)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        reader, readers, workers = self._reader()
        self._num_workers = workers
        count_here = get_worker_info() is None and not self._external_count
        plan = self.plan(reader, readers)
        names = [tl.site_name(s) for s in self.sites]
        torch_dtype = _TORCH_DTYPES[self.layout.store_dtype]
        for batch in iter_batches(self.layout, self.sites, plan, self.batch_size,
                                  skip=self.consumed.get(reader, 0), drop_last=self.drop_last):  # fmt: skip
            out: dict[str, Any] = {}
            for key, values in batch.items():
                if key in names:
                    t = torch.from_numpy(values.view(np.int16) if values.dtype == np.uint16 else values)
                    t = t.view(torch_dtype)
                    out[key] = t if self.dtype is None else t.to(self.dtype)
                elif values.dtype.kind in "OUT":  # text labels stay NumPy arrays of str
                    out[key] = values
                else:
                    out[key] = torch.from_numpy(values)
            out[WORKER_KEY] = reader
            if count_here:
                self.record(out)
            yield out
        if count_here:  # the epoch is done: iterating again replays it whole (set_epoch moves on)
            self.consumed.pop(reader, None)

    def rows_per_reader(self, workers: int = 1) -> list[int]:
        """Rows each reader of this rank yields this epoch, with ``workers`` loader workers."""
        readers = self.world_size * workers
        return [reader_rows(self.layout, self.plan(self.rank * workers + w, readers)) for w in range(workers)]

    def loader(self, **kwargs: Any) -> _CountingLoader:
        """A DataLoader over this dataset (``batch_size=None``: the dataset batches) that
        records every batch it hands out, so :meth:`state_dict` is exact."""
        kwargs.setdefault("batch_size", None)
        if kwargs.get("num_workers", 0) > 0:
            kwargs.setdefault("persistent_workers", False)
        return _CountingLoader(self, DataLoader(self, **kwargs))


class _CountingLoader:
    def __init__(self, dataset: ActivationDataset, loader: DataLoader) -> None:  # type: ignore[type-arg]
        self.dataset = dataset
        self.loader = loader

    def __iter__(self) -> Iterator[dict[str, Any]]:
        workers = max(1, self.loader.num_workers)
        ds = self.dataset
        if ds.consumed and ds._num_workers is not None and ds._num_workers != workers:
            raise SelectionError(f"resuming with {workers} loader worker(s); the state was saved with "
                                 f"{ds._num_workers}: use the same num_workers")  # fmt: skip
        ds._num_workers = workers
        ds._external_count = True
        try:
            for batch in self.loader:
                self.dataset.record(batch)
                yield batch
            ds.consumed = {}  # the epoch is done: iterating again replays it whole
        finally:
            self.dataset._external_count = False

    def __len__(self) -> int:
        workers = max(1, self.loader.num_workers)
        bs = self.dataset.batch_size
        rows = self.dataset.rows_per_reader(workers)
        return sum(r // bs if self.dataset.drop_last else -(-r // bs) for r in rows)
