"""Collects a run's full snapshot and reference passes and writes them as views.

Each pass arrives from :func:`actstore.capture.prefixes.full_pass` with the positions
it does not share with its base; the log numbers it, keeps host copies of those rows
and, at the end of the run, writes them as the run's ``passes/`` arrays with one record
per pass (layout in :mod:`actstore.store.passes`). Passes are written at the end
because the attention array's width is the longest pass, known only once the
generated reply's snapshot has run; their own rows are a few per snapshot, so the
copies stay small. An import (store/npz_import.py) adds whole passes read from files
with :meth:`PassLog.add_stored`: each is loaded only when written, one at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import zarr

from actstore.capture.prefixes import Base, Pass
from actstore.store import passes
from actstore.store.passes import PassInfo
from actstore.store.writer import ArrayPlan, RunWriter, to_numpy, write_small_array

# plans(first pass's own tensors, total rows, attention width) -> array plans
Planner = Callable[[dict[Any, np.ndarray], int, int], list[ArrayPlan]]
# A pass read from files (an import): its tensors, loaded only when written
Loader = Callable[[], dict[Any, Any]]


class PassLog:
    """The full passes of one run, in stored order."""

    def __init__(self) -> None:
        self.infos: list[PassInfo] = []
        self._own: list[dict[Any, np.ndarray] | Loader] = []
        self._tokens: list[int] = []
        self.rows = 0

    def add(self, kind: str, key: int | str, seq: list[int], result: Pass) -> Base:
        """Record one pass; returns it as a base later passes can extend."""
        index = len(self.infos)
        shared = len(seq) if result.covered else result.shared
        rows = len(seq) - shared
        base = result.base.index if result.base is not None else None
        self.infos.append(PassInfo(kind, key, len(seq), base, shared, self.rows, rows))
        self._own.append({k: to_numpy(v) for k, v in result.own.items()} if rows else {})
        self._tokens.extend(seq[shared:])
        self.rows += rows
        return Base(seq, result.cache, index)

    def add_stored(self, kind: str, key: int | str, seq: list[int], load: Loader) -> None:
        """Record a pass read from files (an import): all of its ``len(seq)`` positions are
        its own (shared=0, so it reads back bit for bit), and ``load`` gives its tensors
        (keyed as the writer's) when :meth:`write` reaches it, one pass in memory at a time."""
        self.infos.append(PassInfo(kind, key, len(seq), None, 0, self.rows, len(seq)))
        self._own.append(load)
        self._tokens.extend(seq)
        self.rows += len(seq)

    def write(self, group: zarr.Group, planner: Planner) -> list[dict[str, Any]]:
        """Write the passes' arrays and tokens; returns the records for the run meta."""
        if not self.rows:
            return [info.as_dict() for info in self.infos]
        width = max(info.length for info in self.infos)
        first_index = next(i for i, info in enumerate(self.infos) if info.rows)
        first = _loaded(self._own[first_index])
        writer = RunWriter(group, planner(first, self.rows, width), prefix=passes.PREFIX)
        try:
            for i, (info, own) in enumerate(zip(self.infos, self._own, strict=True)):
                if info.rows:
                    writer.submit(info.start, first if i == first_index else _loaded(own), kv_end=info.length)
            writer.finish(self.rows)
        except BaseException:
            writer.abort()
            raise
        write_small_array(group, passes.TOKENS, np.asarray(self._tokens, dtype=np.int64))
        return [info.as_dict() for info in self.infos]


def _loaded(own: dict[Any, np.ndarray] | Loader) -> dict[Any, np.ndarray]:
    return own() if callable(own) else own
