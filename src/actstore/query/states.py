"""Selecting states lazily: which vectors a query compares, as Dask arrays.

>>> from actstore.store.store import ActStore                          # doctest: +SKIP
>>> run = ActStore.open("stores/actstore.zarr").run("latest")          # doctest: +SKIP
>>> state_vectors(run, "final", "hidden_out", layers=[29]).compute()    # doctest: +SKIP

A *state* names one vector per layer: ``initial`` (last prompt token, the seed's prefill
state), ``final`` (last position fed to the model), ``step:N`` (last position of forward
pass N; negative N counts from the end), ``pos:N`` (a token position), ``snapshot:K``
(conversation prefix K; ``snapshot:generated`` is the conversation with the generated
reply appended as an assistant turn, the last row of runs captured with it) and
``reference:LABEL``.

Data flow: a positional selection becomes ONE Dask task per stored array that does a
single Zarr orthogonal read (``layers x positions x width``); Zarr then fetches just the
inner chunks it needs from the shard, concurrently, after one shard-index read.
hidden_in and hidden_out share one read of the residual-boundary array, and a
snapshot or reference stack is one read too. Slicing the reader's per-chunk Dask arrays
gives the same numbers with one task and one synchronous Zarr call per layer and
position block (about 60 instead of one for an intra-run comparison), which dominates
query time on many runs. Derived sources are served as the reader serves them
(residual boundaries for hidden_in/hidden_out, ``mlp_act * mlp_up`` for mlp_down_in
rounded to the store dtype, bfloat16 bits widened); ``tests/query/test_states.py`` checks both paths agree on
every source.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import dask.array as da
import numpy as np
from dask.base import tokenize

from actstore import naming
from actstore.errors import SelectionError
from actstore.store import layout

POSITIONAL = ("initial", "final", "step", "pos")
GENERATED = "generated"  # snapshot:generated, the reply appended as an assistant turn
_NEEDS_ARG = ("step", "pos", "snapshot", "reference")


@dataclass(frozen=True)
class State:
    """A parsed state name: ``kind`` plus its argument (step, position, index, label)."""

    kind: str
    arg: str | None = None

    def __str__(self) -> str:
        return self.kind if self.arg is None else f"{self.kind}:{self.arg}"


def parse_state(text: str) -> State:
    """``"final"`` -> State("final"); ``"step:3"`` -> State("step", "3"). Split on the
    first ``:`` only, so ``"reference:a:b"`` is the reference labelled ``a:b``."""
    kind, sep, arg = text.partition(":")
    if (kind in ("initial", "final") and sep) or (kind in _NEEDS_ARG[:3] and ":" in arg):
        raise SelectionError(f"{text!r} is more than one state (to compare two, use STATE:STATE)")
    state, rest = _take_state([kind, arg] if sep else [kind], text)
    assert not rest
    return state


def parse_state_pair(text: str) -> tuple[State, State]:
    """``"step:0:final"`` -> (step:0, final); ``"snapshot:3:reference:joy"`` likewise.

    Only a reference label may hold ``:``, so the text is cut at every ``:`` and the cut
    where both halves are one state each is the answer; ``reference:a:b:final`` is the
    reference ``a:b`` against final. Text that reads two ways
    (``reference:x:reference:y:reference:z``) is an error."""
    tokens = text.split(":")
    readings = []
    for cut in range(1, len(tokens)):
        try:
            pair = (parse_state(":".join(tokens[:cut])), parse_state(":".join(tokens[cut:])))
        except SelectionError:
            continue
        readings.append(pair)
    if len(readings) == 1:
        return readings[0]
    if len(readings) > 1:
        shown = " or ".join(f"{a} vs {b}" for a, b in readings)
        raise SelectionError(f"{text!r} reads two ways ({shown}); compare those references in Python")
    # No reading: the token-by-token parse says what is wrong.
    _, rest = _take_state(tokens, text)
    _take_state(rest, text)
    raise SelectionError(f"{text!r}: expected exactly two states, e.g. step:0:final")


def _take_state(tokens: list[str], text: str) -> tuple[State, list[str]]:
    if not tokens or not tokens[0]:
        raise SelectionError(
            f"{text!r}: missing state (one of initial, final, step:N, pos:N, snapshot:K, reference:LABEL)"
        )
    kind = tokens[0]
    if kind in ("initial", "final"):
        return State(kind), tokens[1:]
    if kind not in _NEEDS_ARG:
        raise SelectionError(
            f"{text!r}: unknown state {kind!r} (use initial, final, step:N, pos:N, snapshot:K, reference:LABEL)"
        )
    if len(tokens) < 2 or not tokens[1]:
        raise SelectionError(
            f"{text!r}: state {kind!r} needs an argument, e.g. {kind}:{'joy' if kind == 'reference' else 0}"
        )
    if kind != "reference" and not (kind == "snapshot" and tokens[1] == GENERATED):
        _as_int(tokens[1], text)
    return State(kind, tokens[1]), tokens[2:]


def _as_int(value: str, text: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise SelectionError(f"{text!r}: {value!r} is not a whole number") from None


def _index(i: int, n: int, what: str, run: Any) -> int:
    if not -n <= i < n:
        raise SelectionError(f"run {run.id} has {what} 0..{n - 1}, not {i}")
    return i % n


def state_position(run: Any, state: State | str) -> int:
    """Token position of a positional state (initial, final, step:N, pos:N)."""
    st = parse_state(state) if isinstance(state, str) else state
    if st.kind == "initial":
        return int(run.prefill_position)
    if st.kind == "final":
        return int(run.final_position)
    if st.kind == "step":
        step = step_index(run, int(st.arg or 0))
        return int(run.step_positions(step)[-1])
    if st.kind == "pos":
        return _index(int(st.arg or 0), run.n_positions, "positions", run)
    raise SelectionError(f"state {st} is not a token position")


def step_index(run: Any, step: int) -> int:
    """A step number checked against the run (negative counts from the end), 0..n-1."""
    return _index(step, run.n_steps, "steps", run)


def step_last_positions(run: Any, steps: list[int] | None = None) -> list[int]:
    """Last position of each forward pass (the seed's per-step 'last token')."""
    chosen = range(run.n_steps) if steps is None else steps
    return [int(run.step_positions(step_index(run, s))[-1]) for s in chosen]


# ---- positional selections --------------------------------------------------------------
class _OrthogonalRead:
    """Array-like over one Zarr orthogonal selection, read whole by one Dask task."""

    def __init__(self, arr: Any, selection: tuple[Any, ...], shape: tuple[int, ...]):
        self.arr, self.selection = arr, selection
        self.shape, self.dtype, self.ndim = shape, arr.dtype, len(shape)

    def __getitem__(self, key: Any) -> np.ndarray:
        return np.asarray(self.arr.get_orthogonal_selection(self.selection))[key]


def _open(run: Any, path: str) -> Any:
    """The stored array at ``path`` in the run group (guarded: reads of damaged data name
    the run), or None."""
    try:
        return run.open_array(path)
    except KeyError:
        return None


def _read(
    run: Any, path: str, arr: Any, selection: tuple[Any, ...], shape: tuple[int, ...]
) -> da.Array:
    view = _OrthogonalRead(arr, selection, shape)
    name = f"actstore-sel-{run.id}-{path.replace('/', '-')}-{tokenize(selection)}"
    x = da.from_array(view, chunks=shape, name=name, meta=np.empty((0,) * len(shape), arr.dtype))
    if arr.attrs.get("actstore_dtype") == "bfloat16":
        x = x.map_blocks(layout.bfloat16_to_float32, dtype=np.float32)
    return x


def _vectors(run: Any, path: str, rows: list[int] | None, pos: np.ndarray) -> da.Array:
    """(rows, n, W) of a (L, T, W) array, or (n, W) of a (T, W) one: one read.
    Contiguous positions are read as a slice: Zarr 3.1's integer-array selection costs far
    more per chunk (612 prefill positions of the emotions run's logits: 2.7 s as an
    array, 0.1 s as a slice)."""
    arr = _open(run, path)
    if arr is None:
        raise SelectionError(f"run {run.id} has no array {path!r}")
    at = _axis([int(p) for p in pos])
    if rows is None:
        return _read(run, path, arr, (at, slice(None)), (len(pos), arr.shape[-1]))
    return _read(run, path, arr, (_axis(rows), at, slice(None)), (len(rows), len(pos), arr.shape[-1]))


def _axis(values: list[int]) -> slice | np.ndarray:
    # A contiguous run as a slice keeps the Zarr selection (and the graph name) small.
    if values and values == list(range(values[0], values[-1] + 1)):
        return slice(values[0], values[-1] + 1)
    return np.asarray(values, dtype=np.int64)


def _check_source(run: Any, source: str) -> None:
    naming.check_source(source)
    if source not in run.sources:
        raise SelectionError(f"run {run.id} did not capture {source!r}; it has: {', '.join(run.sources)}")
    if source == "attn_weights":
        raise SelectionError("attn_weights is not a vector source; use run.array('attn_weights')")


def check_layer_source(source: str) -> str:
    """A source for a per-layer query: embeddings and logits have no layer axis."""
    naming.check_source(source)
    if source in naming.GLOBAL_SOURCES:
        per_layer = ", ".join(s for s in naming.LAYER_SOURCES if s != "attn_weights")
        raise SelectionError(f"--source {source} has no layers; per-layer queries take one of: {per_layer}")
    return source


def select_many(
    run: Any, sources: list[str], positions: list[int], layers: list[int] | None = None
) -> dict[str, da.Array]:
    """:func:`select` for several sources at once. hidden_in and hidden_out are rows of
    one residual-boundary array: they share ONE read of the union of their rows."""
    for source in sources:
        _check_source(run, source)
    pos = np.asarray([_index(int(p), run.n_positions, "positions", run) for p in positions], dtype=np.int64)
    out: dict[str, da.Array] = {}
    hidden = [s for s in sources if s in ("hidden_in", "hidden_out")]
    if hidden:
        real = [run.layers[i] for i in run.layer_index(layers)]
        bounds: list[int] = run.meta["residual_boundaries"]
        rows = {s: [bounds.index(la + (s == "hidden_out")) for la in real] for s in hidden}
        union = sorted({r for rs in rows.values() for r in rs})
        res = _vectors(run, f"{naming.ACTS_GROUP}/{naming.RESIDUAL_ARRAY}", union, pos)
        for s, rs in rows.items():
            take = [union.index(r) for r in rs]
            contiguous = take == list(range(take[0], take[0] + len(take)))
            out[s] = res[take[0] : take[0] + len(take)] if contiguous else res[take]
    for source in sources:
        if source in out:
            continue
        if source in naming.GLOBAL_SOURCES:
            out[source] = _vectors(run, naming.act_path(source), None, pos)
        elif source == "mlp_down_in" and _open(run, naming.act_path(source)) is None:
            # The reader's derivation, so every path rounds the product alike (bfloat16).
            act = select(run, "mlp_act", list(pos), layers)
            up = select(run, "mlp_up", list(pos), layers) if run.meta["gated_mlp"] else act
            out[source] = layout.derive_down_in(act, up, run.meta["gated_mlp"], run.meta["store_dtype"])
        else:
            out[source] = _vectors(run, naming.act_path(source), run.layer_index(layers), pos)
    return out


def read_region(run: Any, source: str, selection: tuple[Any, ...]) -> np.ndarray:
    """One eager orthogonal Zarr read of a *stored* source (e.g. a block of attention
    weights), bfloat16 bits widened: Zarr fetches the inner chunks concurrently, where
    slicing the reader's Dask array would run one task per inner chunk."""
    arr = _open(run, naming.act_path(source))
    if arr is None:
        raise SelectionError(f"run {run.id} has no stored array for {source!r}")
    x = np.asarray(arr.get_orthogonal_selection(selection))
    return layout.bfloat16_to_float32(x) if arr.attrs.get("actstore_dtype") == "bfloat16" else x


def select(run: Any, source: str, positions: list[int], layers: list[int] | None = None) -> da.Array:
    """Lazy ``(L, n, W)`` vectors of a per-layer source at ``positions`` (``(n, W)`` for
    embeddings and logits). ``layers`` are real layer indices (None: every captured one)."""
    return select_many(run, [source], positions, layers)[source]


def _stack(run: Any, kind: str, source: str, layers: list[int] | None) -> da.Array:
    what = "snapshots" if kind == "snapshot" else "references"
    if source not in naming.RESIDUAL_SOURCES:
        raise SelectionError(f"{what} keep only {', '.join(naming.RESIDUAL_SOURCES)}, not {source!r}")
    path = naming.snapshot_path(source) if kind == "snapshot" else naming.reference_path(source)
    arr = _open(run, path)
    if arr is None:
        raise SelectionError(f"run {run.id} has no {what} of {source!r}")
    li = run.layer_index(layers)
    # One read of the whole (small) stack: its rows are separate chunks, which Zarr
    # then fetches concurrently, instead of one Dask task per row.
    shape = (arr.shape[0], len(li), arr.shape[2])
    return _read(run, path, arr, (slice(None), _axis(li), slice(None)), shape)


def snapshot_stack(run: Any, source: str, layers: list[int] | None = None) -> da.Array:
    """Lazy ``(messages, L, H)``: last-token vector of each conversation prefix."""
    return _stack(run, "snapshot", source, layers)


def snapshot_row(run: Any, arg: str, n: int) -> int:
    """Stack row of ``snapshot:ARG``: a row number (negative counts from the end) or
    ``generated``, the row the run's snapshot index marks as the generated reply."""
    if arg != GENERATED:
        return _index(_as_int(arg, f"snapshot:{arg}"), n, "snapshots", run)
    rows = [i for i, s in enumerate(run.snapshot_index) if s.get("generated")]
    if not rows:
        raise SelectionError(
            f"run {run.id} has no generated-reply snapshot (captured before actstore kept one, "
            f"or the reply did not fit the context); its snapshots are 0..{n - 1}"
        )
    return rows[-1]


def reference_stack(run: Any, source: str, layers: list[int] | None = None) -> da.Array:
    """Lazy ``(references, L, H)``, rows in ``run.reference_labels`` order."""
    return _stack(run, "reference", source, layers)


def state_vectors(run: Any, state: State | str, source: str, layers: list[int] | None = None) -> da.Array:
    """Lazy ``(L, W)``: one vector per selected layer for a state (see module docstring)."""
    st = parse_state(state) if isinstance(state, str) else state
    if st.kind in POSITIONAL:
        x = select(run, source, [state_position(run, st)], layers)
        return x[:, 0] if x.ndim == 3 else x[0]
    if st.kind == "snapshot":
        x = snapshot_stack(run, source, layers)
        return x[snapshot_row(run, st.arg or "", x.shape[0])]
    labels = run.reference_labels
    if st.arg not in labels:
        raise SelectionError(
            f"run {run.id} has no reference {st.arg!r}; it has: {', '.join(labels) or 'none'}"
        )
    return reference_stack(run, source, layers)[labels.index(st.arg)]


def vector_sources(run: Any) -> list[str]:
    """Per-layer vector sources a run serves (everything but attention weights)."""
    return [s for s in run.sources if s in naming.LAYER_SOURCES and s != "attn_weights"]


def position_steps(run: Any) -> np.ndarray:
    """Forward pass that computed each position, from metadata alone (no array read)."""
    steps = np.zeros(run.n_positions, dtype=np.int64)
    steps[run.prompt_len :] = np.arange(1, run.n_positions - run.prompt_len + 1)
    return steps


def as_xarray(run: Any, source: str) -> Any:
    """A lazy ``xarray.DataArray`` of a source with coords layer (real indices), position
    and step. Attention weights get dims (layer, head, query, key)."""
    import xarray as xr

    x = run.array(source)
    pos = np.arange(run.n_positions)
    steps = position_steps(run)
    if source in naming.GLOBAL_SOURCES:
        dims: tuple[str, ...] = ("position", "width")
        coords: dict[str, Any] = {"position": pos, "step": ("position", steps)}
    elif source == "attn_weights":
        dims = ("layer", "head", "query", "key")
        coords = {"layer": run.layers, "query": pos, "key": pos, "step": ("query", steps)}
    else:
        dims = ("layer", "position", "width")
        coords = {"layer": run.layers, "position": pos, "step": ("position", steps)}
    return xr.DataArray(x, dims=dims, coords=coords, name=source, attrs={"run": run.id})
