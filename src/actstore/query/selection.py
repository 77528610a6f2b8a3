"""Which states a lab query compares: ``RUN@STATE`` items, resolved to runs and states.

>>> parse_item("final")
(None, State(kind='final', arg=None))
>>> parse_item("emotions_20250101T000000_abc123@snapshot:3")
('emotions_20250101T000000_abc123', State(kind='snapshot', arg='3'))

An item is ``RUN@STATE`` or a bare ``STATE`` (see ``query.states``: initial, final,
step:N, pos:N, snapshot:K, snapshot:generated, reference:LABEL). ``RUN`` is any run
selector the store understands (an id, a unique prefix, a scenario-run id, a scenario
name, ``latest``, ``latest:<scenario>``); run ids, selectors and reference labels never
contain ``@``, so the text splits at its one ``@``. ``RUN@STATE`` is that state of every
run ``RUN`` names; a bare ``STATE`` is that state of every run of ``default_runs`` (the
latest run unless a command's ``--runs`` says otherwise). Each resolved state is a
:class:`Selected`: the run reader, the state, and the label ``<run id>@<state>`` tables
print.

A state also names a *full pass* (every position of one forward pass, see
:func:`full_pass`): ``step:N`` is step N's positions (the whole prompt for step 0, one
position for a decode step), ``initial`` is step 0 (its last token is the initial
state), ``final`` the last step, ``snapshot:K`` and ``reference:LABEL`` their stored full
passes (``run.pass_array``). ``pos:N`` is a single position, not a pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import dask.array as da
import numpy as np

from actstore import naming
from actstore.errors import SelectionError
from actstore.query.states import GENERATED, State, parse_state, snapshot_row, step_index

_USAGE = "use STATE or RUN@STATE, e.g. final, step:0 or <run id>@reference:joy"


@dataclass(frozen=True)
class Selected:
    """One resolved state: the run reader it belongs to and the state."""

    run: Any
    state: State

    @property
    def label(self) -> str:
        """``<run id>@<state>``: how tables name this state."""
        return f"{self.run.id}@{self.state}"


def parse_item(text: str) -> tuple[str | None, State]:
    """``"RUN@STATE"`` -> (RUN, State); ``"STATE"`` -> (None, State). One-line
    :class:`SelectionError` for anything else."""
    if not text.strip():
        raise SelectionError(f"empty state: {_USAGE}")
    run, sep, rest = text.partition("@")
    if not sep:
        return None, parse_state(text)
    if "@" in rest:
        raise SelectionError(f"{text!r} has more than one '@' (run ids and states never contain '@'): {_USAGE}")
    if not run.strip():
        raise SelectionError(f"{text!r}: no run before '@' (a bare STATE means the latest run): {_USAGE}")
    if not rest:
        raise SelectionError(f"{text!r}: no state after '@': {_USAGE}")
    try:
        return run, parse_state(rest)
    except SelectionError as e:
        raise SelectionError(f"in {text!r}: {e}") from None


def resolve(store: Any, items: Sequence[str], default_runs: Sequence[str] = ("latest",)) -> list[Selected]:
    """Every item's states, in the order given (an item naming several runs gives one
    state per run, in catalog order). The catalog is read once and each run opened once."""
    parsed = [parse_item(t) for t in items]  # every item checked before the store is read
    entries = store.catalog_entries()
    by_id = {e["id"]: e for e in entries}
    readers: dict[str, Any] = {}

    def open_runs(selectors: Sequence[str]) -> list[Any]:
        ids = store.resolve_many(selectors, entries)
        new = [i for i in ids if i not in readers]
        for reader in store.runs_from([by_id[i] for i in new]):
            readers[reader.id] = reader
        return [readers[i] for i in ids]

    out: list[Selected] = []
    for run_sel, state in parsed:
        out += [Selected(r, state) for r in open_runs([run_sel] if run_sel is not None else default_runs)]
    return out


def expect(selected: list[Selected], n: int, what: str) -> list[Selected]:
    """``selected`` if it holds exactly ``n`` states, else a one-line error naming them."""
    if len(selected) != n:
        shown = ", ".join(s.label for s in selected[:6]) + (", ..." if len(selected) > 6 else "")
        raise SelectionError(
            f"{what} takes {n} state(s), got {len(selected)} ({shown}); "
            "name one run per state with RUN@STATE, or pick one run with --runs"
        )
    return selected


def common_layers(selected: Sequence[Selected], layers: list[int] | None) -> list[int]:
    """``layers`` checked against every run, or (None) the layers every run captured."""
    for s in selected:
        s.run.layer_index(layers)  # validates, naming the run
    if layers is not None:
        return list(layers)
    have = set(selected[0].run.layers)
    for s in selected[1:]:
        have &= set(s.run.layers)
    if not have:
        raise SelectionError("the selected runs share no captured layer; pick runs of one model")
    return sorted(have)


def vector_source(source: str) -> str:
    """A per-layer vector source (not embeddings, logits or attention weights)."""
    naming.check_source(source)
    if source in naming.GLOBAL_SOURCES or source == "attn_weights":
        vectors = ", ".join(s for s in naming.LAYER_SOURCES if s != "attn_weights")
        raise SelectionError(f"--source {source} is not a per-layer vector source; use one of: {vectors}")
    return source


def default_sources(selected: Sequence[Selected], sources: Sequence[str] | None) -> list[str]:
    """``sources`` checked, or (None) the residual-stream sources every run captured."""
    if sources is not None:
        return [vector_source(s) for s in sources]
    return [s for s in naming.RESIDUAL_SOURCES if all(s in x.run.sources for x in selected)]


# ---- full passes ------------------------------------------------------------------------
def pass_key(sel: Selected) -> tuple[str, int | str]:
    """(kind, key) of the state's full pass: ("step", N), ("snapshot", K) or
    ("reference", LABEL); see the module docstring."""
    run, st = sel.run, sel.state
    if st.kind == "initial":
        return "step", 0
    if st.kind == "final":
        return "step", run.n_steps - 1
    if st.kind == "step":
        return "step", step_index(run, int(st.arg or 0))
    if st.kind == "snapshot":
        index = run.snapshot_index
        if not index:
            raise SelectionError(f"run {run.id} has no conversation snapshots")
        row = snapshot_row(run, st.arg or "", len(index))
        return "snapshot", GENERATED if st.arg == GENERATED else int(index[row]["index"])
    if st.kind == "reference":
        return "reference", str(st.arg)
    raise SelectionError(
        f"{sel.label}: a position is not a forward pass; use step:N, initial, final, snapshot:K or reference:LABEL"
    )


def full_pass(sel: Selected, source: str, history: bool = False, dense: bool = False) -> da.Array:
    """Lazy array of the state's full pass: (L, T, W) for a per-layer source, (L, heads,
    T, keys) for attention weights, (T, W) for embeddings and logits.

    For a step, the rows are the step's own positions (a decode step has one) and the
    attention columns are every position up to its last (what its rows attended to);
    ``history=True`` gives rows from position 0 instead (the keys a step's queries
    met). Snapshot and reference passes start at their first token either way.
    ``dense``: for a pass read whole into memory, each stored piece in one Zarr call
    (``RunReader._dask``); leave it off for reductions that stream block by block."""
    kind, key = pass_key(sel)
    run = sel.run
    if kind != "step":
        return run.pass_array(kind, key, source, dense)
    positions = run.step_positions(int(key))
    start, stop = (0 if history else positions.start), positions.stop
    x = run.array(source, dense=dense)
    if source == "attn_weights":
        return x[:, :, start:stop, :stop]
    return x[:, start:stop] if x.ndim == 3 else x[start:stop]


def pass_tokens(sel: Selected) -> np.ndarray:
    """Token ids of the state's full pass (the rows of :func:`full_pass`)."""
    kind, key = pass_key(sel)
    if kind != "step":
        return np.asarray(sel.run.pass_tokens(kind, key))
    positions = sel.run.step_positions(int(key))
    return np.asarray(sel.run.tokens()[positions.start : positions.stop])
