"""skipping_damaged with stand-in runs: which runs each attempt gets, what is warned, raised."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import pytest

from actstore.errors import DamagedRunError, DamageWarning, SelectionError
from actstore.query import damaged
from actstore.query.damaged import skipping_damaged


@dataclass
class FakeRun:
    id: str


def _answer(damaged: set[str], calls: list[list[str]]):  # type: ignore[no-untyped-def]
    """A many-run computation that reads its runs in order and fails at the first damaged one."""

    def compute(runs: list[FakeRun]) -> list[str]:
        ids = [r.id for r in runs]
        calls.append(ids)
        if len(calls) > 10:
            raise AssertionError(f"retried without end: {calls[-3:]}")
        for i in ids:
            if i in damaged:
                raise DamagedRunError(i, "a chunk fails its checksum")
        return ids

    return compute


RUNS = [FakeRun("a"), FakeRun("b"), FakeRun("c"), FakeRun("d")]


def test_damaged_runs_are_skipped_by_default_and_named() -> None:
    calls: list[list[str]] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = skipping_damaged(_answer({"b", "d"}, calls), RUNS)
    assert got == ["a", "c"]
    assert calls == [["a", "b", "c", "d"], ["a", "c", "d"], ["a", "c"]]  # each retry without the damaged run
    assert [w.category for w in caught] == [DamageWarning, DamageWarning]
    assert [str(w.message) for w in caught] == [
        "skipped: run b is damaged: a chunk fails its checksum (`actstore check b` lists every damaged piece)",
        "skipped: run d is damaged: a chunk fails its checksum (`actstore check d` lists every damaged piece)",
    ]
    # The warning points at the caller (here this file), not into damaged.py or pytest.
    # (Not "== __file__": under mutation testing a wrapper frame sits in between.)
    assert not any(w.filename in (damaged.__file__,) or "_pytest" in w.filename for w in caught)


def test_without_skip_or_for_another_run_the_error_propagates() -> None:
    calls: list[list[str]] = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is skipped, so nothing is warned
        with pytest.raises(DamagedRunError, match="run b is damaged"):
            skipping_damaged(_answer({"b"}, calls), RUNS, skip=False)
        assert calls == [["a", "b", "c", "d"]]

        def elsewhere(runs: list[FakeRun]) -> None:  # damage in a run that was not selected
            raise DamagedRunError("z", "metadata does not parse")

        with pytest.raises(DamagedRunError, match="run z is damaged"):
            skipping_damaged(elsewhere, RUNS)
        assert skipping_damaged(_answer(set(), calls), RUNS) == ["a", "b", "c", "d"]


def test_when_every_run_is_damaged_nothing_is_answered() -> None:
    calls: list[list[str]] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(SelectionError, match=r"^every selected run is damaged; nothing left to answer from$") as e:
            skipping_damaged(_answer({"a", "b"}, calls), RUNS[:2])
    assert isinstance(e.value.__cause__, DamagedRunError) and e.value.__cause__.run_id == "b"
    assert calls == [["a", "b"], ["b"]] and len(caught) == 2
