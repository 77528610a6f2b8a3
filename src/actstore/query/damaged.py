"""Many-run answers around a damaged run: skip it by name, or stop and name it.

Damage in a run's chunks surfaces only when they are read, mid-computation, as a
:class:`~actstore.errors.DamagedRunError` that names the run. To skip it, the answer is
computed again without that run: every number in it then comes from undamaged data, and
the caller is told which runs are missing from it.

>>> rows = skipping_damaged(lambda rs: intra_run(rs), store.runs(["all"]), skip=True)  # doctest: +SKIP
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from actstore.errors import DamagedRunError, DamageWarning, SelectionError

T = TypeVar("T")


def skipping_damaged(compute: Callable[[list[Any]], T], runs: Sequence[Any], *, skip: bool = True) -> T:
    """``compute(runs)``; with ``skip``, a run found damaged on the way is dropped (a
    DamageWarning names it) and the answer computed from the rest. Without ``skip``, or
    when no run is left, the DamagedRunError propagates."""
    runs = list(runs)
    while True:
        try:
            return compute(runs)
        except DamagedRunError as e:
            if not skip or e.run_id not in {r.id for r in runs}:
                raise
            warnings.warn(f"skipped: {e}", DamageWarning, stacklevel=2)
            runs = [r for r in runs if r.id != e.run_id]
            if not runs:
                raise SelectionError("every selected run is damaged; nothing left to answer from") from e
