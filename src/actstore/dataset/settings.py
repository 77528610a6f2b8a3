"""The settings of a corpus capture, checked once, and the positions they keep.

Everything that changes what is stored is a field here and goes into the dataset's
fingerprint (the device does not: the same capture resumed on another device is the
same dataset, within that device's float rounding).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

from actstore import naming
from actstore.errors import ActstoreError
from actstore.store.layout import STORE_DTYPES

# A unit's run id is <name>.u<unit>_<stamp>_<hex>: the name leaves room for the unit tag.
UNIT_TAG = ".u"
MAX_DATASET_NAME = naming.MAX_NAME - 7
CAPTURE_FLAGS = tuple(naming.FLAG_SOURCES)
LAYOUTS = ("runs", "train")
_SLICE = re.compile(r"^(-?\d+)?:(-?\d+)?$")


class DatasetError(ActstoreError, ValueError):
    """A corpus capture cannot run as asked (options, a name taken by other settings)."""


@dataclass(frozen=True)
class DatasetSettings:
    model: str
    capture: tuple[str, ...] = ("hidden_states",)  # scenario capture flags (naming.FLAG_SOURCES)
    layers: str = "all"  # all, 2-5, 0,3,7 (the --layers syntax of queries)
    positions: str = "all"  # all, last, or a slice A:B of each sequence's positions
    exclude_special: bool = False
    context: int | None = None  # tokens kept from each sequence's start
    max_tokens: int | None = None  # stop after this many stored positions
    max_new_tokens: int = 0  # greedy generation after the prefill (its fed positions stored)
    batch_size: int = 8
    unit_size: int = 64  # sequences per work unit (one run of the store)
    store_dtype: str = "float16"
    model_dtype: str = "float32"
    gguf_file: str | None = None
    text_column: str = "text"
    messages_column: str | None = None
    label_columns: tuple[str, ...] = field(default_factory=tuple)
    # "runs": each unit a run of position-major arrays (queries, exports); "train": each
    # unit's rows go straight into the token-major train layout named after the dataset
    # (store/train_layout.py), the layout training reads take; the unit's run keeps only
    # its row facts and commits the unit.
    layout: str = "runs"

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise DatasetError(f"--layout {self.layout!r}: use one of {', '.join(LAYOUTS)}")
        for flag in self.capture:
            if flag == "attention_weights":
                raise DatasetError(
                    "--capture attention_weights: attention weights are one square matrix per "
                    "sequence and do not pack into a corpus unit; capture them with a scenario"
                )
            if flag not in CAPTURE_FLAGS:
                raise DatasetError(f"--capture {flag!r}: use one of {', '.join(f for f in CAPTURE_FLAGS if f != 'attention_weights')}")
        if not self.capture:
            raise DatasetError("--capture: name at least one of hidden_states, qkv, mlp, logits")
        for name, value, low in (("--batch-size", self.batch_size, 1), ("--unit-size", self.unit_size, 1),
                                 ("--context", self.context, 1), ("--max-tokens", self.max_tokens, 1),
                                 ("--max-new-tokens", self.max_new_tokens, 0)):  # fmt: skip
            if value is not None and value < low:
                raise DatasetError(f"{name} {value}: must be {low} or more")
        if self.store_dtype not in STORE_DTYPES:
            raise DatasetError(f"--store-dtype {self.store_dtype!r}: use one of {', '.join(STORE_DTYPES)}")
        parse_positions(self.positions)

    def flags(self) -> dict[str, bool]:
        return {f: f in self.capture for f in CAPTURE_FLAGS}

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["capture"], d["label_columns"] = list(self.capture), list(self.label_columns)
        return d


def check_dataset_name(name: str) -> str:
    return naming.check_name(name, "dataset name", "--name", max_len=MAX_DATASET_NAME)


def parse_positions(text: str) -> tuple[str, int | None, int | None]:
    """``("all"|"last"|"slice", start, stop)``."""
    t = text.strip().lower()
    if t in ("all", "last"):
        return t, None, None
    m = _SLICE.match(t)
    if m is None:
        raise DatasetError(f"--positions {text!r}: use all, last, or a slice A:B like 0:16 or -8:")
    return "slice", int(m.group(1)) if m.group(1) else None, int(m.group(2)) if m.group(2) else None


def kept_positions(
    n: int, positions: tuple[str, int | None, int | None], special: list[bool] | None
) -> list[int]:
    """Which of a sequence's ``n`` fed positions are stored. ``special[p]``: position p
    holds a special token and ``--exclude-special`` drops it (``last`` is then the last
    ordinary token)."""
    kind, start, stop = positions
    ordinary = [p for p in range(n) if special is None or not special[p]]
    if kind == "all":
        return ordinary
    if kind == "last":
        return ordinary[-1:]
    chosen = set(range(n)[slice(start, stop)])
    return [p for p in ordinary if p in chosen]
