"""Collects a run's full snapshot and reference passes and writes them as views.

Each pass arrives from :func:`actstore.capture.prefixes.full_pass` with the positions
it does not share with its base; the log numbers it and writes its own rows as the
run's ``passes/`` arrays, with one record per pass (layout in
:mod:`actstore.store.passes`). The attention array's width is the longest pass, known
only once the generated reply's snapshot has run, so passes are kept as host copies
(a few rows per snapshot) until :meth:`PassLog.start` is told the width; from then on
each pass goes straight to a writer thread, so the reference passes' writes overlap
their forward passes and the main writer's last blocks. An import
(store/npz_import.py) adds whole passes read from files with :meth:`PassLog.add_stored`:
each is loaded only when written, one at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr

from actstore.store import passes
from actstore.store.passes import PassInfo
from actstore.store.writer import ArrayPlan, RunWriter, to_numpy, write_small_array

if TYPE_CHECKING:  # prefixes imports torch and transformers, which an import does not need
    from actstore.capture.prefixes import Base, Pass

# plans(first pass's own tensors, rows to plan for, attention width) -> array plans
Planner = Callable[[dict[Any, np.ndarray], int, int], list[ArrayPlan]]
# A pass read from files (an import): its tensors, loaded only when written
Loader = Callable[[], dict[Any, Any]]


class PassLog:
    """The full passes of one run, in stored order."""

    def __init__(self) -> None:
        self.infos: list[PassInfo] = []
        self._pending: list[tuple[PassInfo, dict[Any, Any] | Loader]] = []  # not yet submitted
        self._tokens: list[int] = []
        self.rows = 0
        self._group: zarr.Group | None = None
        self._planner: Planner | None = None
        self._width = 0
        self._max_rows = 0
        self._writer: RunWriter | None = None

    def add(self, kind: str, key: int | str, seq: list[int], result: Pass) -> Base:
        """Record one pass; returns it as a base later passes can extend."""
        index = len(self.infos)
        shared = len(seq) if result.covered else result.shared
        rows = len(seq) - shared
        base = result.base.index if result.base is not None else None
        info = PassInfo(kind, key, len(seq), base, shared, self.rows, rows)
        self.infos.append(info)
        self._tokens.extend(seq[shared:])
        self.rows += rows
        if rows:
            # Held until start(): on the host, not on the accelerator.
            own = result.own if self._group is not None else {k: to_numpy(v) for k, v in result.own.items()}
            self._pending.append((info, own))
            self._submit_pending()
        from actstore.capture.prefixes import Base

        return Base(seq, result.cache, index)

    def add_stored(self, kind: str, key: int | str, seq: list[int], load: Loader) -> None:
        """Record a pass read from files (an import): all of its ``len(seq)`` positions are
        its own (shared=0, so it reads back bit for bit), and ``load`` gives its tensors
        (keyed as the writer's) when it is written, one pass in memory at a time."""
        info = PassInfo(kind, key, len(seq), None, 0, self.rows, len(seq))
        self.infos.append(info)
        self._pending.append((info, load))
        self._tokens.extend(seq)
        self.rows += len(seq)
        self._submit_pending()

    def start(self, group: zarr.Group, planner: Planner, width: int, max_rows: int) -> None:
        """Write the passes so far, and every later one as it is added. ``width``: the
        longest pass there will be; ``max_rows``: at most how many rows all passes will
        hold (the arrays shrink to the real count at :meth:`finish`)."""
        self._group, self._planner, self._width, self._max_rows = group, planner, width, max_rows
        self._submit_pending()

    def finish(self) -> list[dict[str, Any]]:
        """Wait for the writes, fit the arrays to the rows stored and write the tokens;
        returns the records for the run meta."""
        assert self._group is not None, "start() first"
        if self._writer is not None:
            self._writer.finish(self.rows)
            write_small_array(self._group, passes.TOKENS, np.asarray(self._tokens, dtype=np.int64))
        return [info.as_dict() for info in self.infos]

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.abort()

    def write(self, group: zarr.Group, planner: Planner) -> list[dict[str, Any]]:
        """Every pass already added, written at once (an import)."""
        width = max((info.length for info in self.infos), default=0)
        try:
            self.start(group, planner, width, self.rows)
            return self.finish()
        except BaseException:
            self.abort()
            raise

    def _submit_pending(self) -> None:
        if self._group is None or self._planner is None:
            return
        for info, own in self._pending:
            tensors = own() if callable(own) else own
            if self._writer is None:
                plans = self._planner(tensors, max(self._max_rows, self.rows), self._width)
                self._writer = RunWriter(self._group, plans, prefix=passes.PREFIX)
            self._writer.submit(info.start, tensors, kv_end=info.length)
        self._pending.clear()
