"""What each stored position of a run *is*: its token, its sequence and its place in it.

A scenario run is one sequence: position p holds token ``tokens[p]`` of sequence 0 at
position p. A corpus work unit (``actstore capture-dataset``) packs many sequences into
one run: its positions are the kept tokens of each sequence, back to back, pads never
stored, and three row-aligned arrays say what every position is:

    <run>/rows/token_ids        (T,) int32   the token at this position
    <run>/rows/sequence_index   (T,) int64   the sequence's index in the whole dataset
    <run>/rows/position         (T,) int32   the position inside that sequence
    <run>/rows/labels/<column>  (T,)         a label column, repeated on every row

:func:`run_rows` answers the same question for both kinds of run, so training reads
and exports never need to know which one they have.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

ROWS_GROUP = "rows"
TOKEN_IDS = f"{ROWS_GROUP}/token_ids"
SEQUENCE_INDEX = f"{ROWS_GROUP}/sequence_index"
POSITION = f"{ROWS_GROUP}/position"
LABELS_GROUP = f"{ROWS_GROUP}/labels"

ROW_DTYPES = {TOKEN_IDS: np.dtype("int32"), SEQUENCE_INDEX: np.dtype("int64"), POSITION: np.dtype("int32")}


@dataclass(frozen=True)
class Rows:
    """Row-aligned facts about every stored position of one run."""

    token_ids: np.ndarray
    sequence_index: np.ndarray
    position: np.ndarray
    labels: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.token_ids)


def has_rows(run: Any) -> bool:
    """True for a corpus work unit (it stores ``rows/``)."""
    return TOKEN_IDS in run.group


def run_rows(run: Any) -> Rows:
    """The rows of a :class:`~actstore.store.reader.RunReader`, corpus unit or scenario run."""
    if has_rows(run):
        labels: dict[str, np.ndarray] = {}
        if LABELS_GROUP in run.group:
            for name in sorted(run.group[LABELS_GROUP].array_keys()):
                labels[name] = np.asarray(run.open_array(f"{LABELS_GROUP}/{name}")[...])
        return Rows(
            token_ids=np.asarray(run.open_array(TOKEN_IDS)[...]),
            sequence_index=np.asarray(run.open_array(SEQUENCE_INDEX)[...]),
            position=np.asarray(run.open_array(POSITION)[...]),
            labels=labels,
        )
    tokens = np.asarray(run.tokens(), dtype=np.int32)
    n = len(tokens)
    return Rows(
        token_ids=tokens,
        sequence_index=np.zeros(n, dtype=np.int64),
        position=np.arange(n, dtype=np.int32),
    )
