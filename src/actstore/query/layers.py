"""``--layers`` text (``all``, ``29-33``, ``0,5,10``, ``0-3,10``) against the captured layers.

>>> choose_layers("28-99", range(30)).layers
[28, 29]
>>> choose_layers("0-99999999999", [0, 1]).note
'--layers 0-99999999999: using [0, 1] (captured: 0,1)'

One meaning in every command: a range is clipped to the captured layers (with a note)
and must keep at least one; a listed layer must have been captured. A range is never
expanded: it is a pair of bounds tested against each captured layer, so
``0-99999999999`` costs what ``0-29`` costs.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from actstore.errors import SelectionError
from actstore.store.reader import _ranges

_PART = re.compile(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?")
_USAGE = "use all, a range like 29-33, or a list like 0,5,10"


@dataclass(frozen=True)
class LayerChoice:
    """The layers picked (None: every captured layer) and a note when a range was clipped."""

    layers: list[int] | None
    note: str | None = None


def parse_layers(text: str) -> list[tuple[int, int]] | None:
    """``"all"`` -> None; otherwise one ``(lo, hi)`` per comma part (``lo == hi`` for a
    single layer, kept apart from a range by ``_is_range``)."""
    if text.strip().lower() == "all":
        return None
    parts = []
    for part in text.split(","):
        m = _PART.fullmatch(part)
        if m is None:
            raise SelectionError(f"--layers {text!r}: {_USAGE}")
        lo, hi = int(m.group(1)), int(m.group(2) if m.group(2) is not None else m.group(1))
        if hi < lo:
            raise SelectionError(f"--layers {text!r}: range {lo}-{hi} runs backwards; write {hi}-{lo}")
        parts.append((lo, hi))
    return parts


def _is_range(part: str) -> bool:
    return "-" in part


def choose_layers(text: str, captured: Iterable[int]) -> LayerChoice:
    """The captured layers ``text`` selects, in the order written, each once."""
    spans = parse_layers(text)
    if spans is None:
        return LayerChoice(None)
    have = sorted(set(captured))
    have_set = set(have)
    out: list[int] = []
    seen: set[int] = set()
    clipped = False
    for raw, (lo, hi) in zip(text.split(","), spans, strict=True):
        if _is_range(raw):
            kept = [layer for layer in have if lo <= layer <= hi]  # bounded by the captured layers
            if not kept:
                raise SelectionError(
                    f"--layers {text}: range {lo}-{hi} holds no captured layer; captured: {_ranges(have)}"
                )
            clipped = clipped or len(kept) < hi - lo + 1
        else:
            if lo not in have_set:
                raise SelectionError(f"--layers {text}: layer {lo} was not captured; captured: {_ranges(have)}")
            kept = [lo]
        for layer in kept:
            if layer not in seen:
                seen.add(layer)
                out.append(layer)
    note = f"--layers {text}: using {out} (captured: {_ranges(have)})" if clipped else None
    return LayerChoice(out, note)


def common_layers(runs: Sequence[Any]) -> list[int]:
    """Layers every run captured (a multi-run query compares those)."""
    if not runs:
        return []
    have = set(runs[0].layers)
    for run in runs[1:]:
        have &= set(run.layers)
    return sorted(have)
