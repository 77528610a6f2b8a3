"""Full snapshot and reference passes, stored as views over positions already stored.

A conversation snapshot is a prefill of ``messages[:k]`` with the generation prompt.
Its first tokens are the main prompt's first tokens, and with causal attention their
activations are the main prefill's, so a pass stores only its *own* rows: the
positions from the first token it does not share with its base (the generation-prompt
suffix, usually three tokens). A reference stores what it does not share with the run
or with an earlier reference (references share their system preamble).

Layout, inside the run group::

    passes/acts/<array>     like the run's acts/, over the own rows of every pass in
                            order; attention is (L, heads, rows, W) with a row's
                            columns being the positions of its own pass
    passes/tokens           (rows,) the own rows' token ids (-1: not known, e.g. the
                            references Activation Lab imports, whose tokens it never
                            records)
    passes/qkv_last         (passes, num_layers, Dv) float32, only in runs imported
                            from Activation Lab's files: its per-pass ``qkv_last``, kept
                            because those files leave out the v it was computed from
    run meta "passes"       one record per pass: kind, key, length, base, shared,
                            start, rows

Reading a pass concatenates its base's first ``shared`` positions (recursively) with
its own rows; attention rows of the shared part are the base's, zero-padded on the
right (causal: a row never sees later columns). A pass the base holds whole (a prefix
that ends where the prompt's next turn is the assistant's) stores no rows at all.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import dask.array as da
import numpy as np

from actstore import naming
from actstore.errors import DamagedRunError, SelectionError

PREFIX = naming.PASSES_GROUP + "/"
TOKENS = PREFIX + naming.TOKENS_ARRAY
QKV_LAST = PREFIX + naming.QKV_LAST_ARRAY
KINDS = ("snapshot", "reference")


@dataclass(frozen=True)
class PassInfo:
    """Where one full pass lives: ``shared`` leading positions read from ``base`` (None:
    the run's own positions; an int: an earlier entry of the run's passes), then
    ``rows`` own rows starting at row ``start`` of the passes arrays."""

    kind: str  # "snapshot" or "reference"
    key: int | str  # snapshot index, or reference label
    length: int  # tokens in the pass: shared + rows
    base: int | None
    shared: int
    start: int
    rows: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def pass_infos(run: Any) -> list[PassInfo]:
    """The pass records of a run's metadata ([] for runs captured before full passes)."""
    records = run.meta.get("passes", [])
    try:
        infos = [PassInfo(**r) for r in records]
    except TypeError as e:
        raise DamagedRunError(run.id, f"its pass records ({e})") from e
    for i, p in enumerate(infos):
        if p.length != p.shared + p.rows or (p.base is not None and not 0 <= p.base < i):
            raise DamagedRunError(run.id, f"pass record {i} (inconsistent lengths or base)")
    return infos


def find(run: Any, kind: str, key: int | str) -> PassInfo:
    """The pass of snapshot ``key`` (index or ``"generated"``) or reference ``key``."""
    if kind not in KINDS:
        raise SelectionError(f"a full pass is a snapshot or a reference, not {kind!r}")
    infos = [p for p in run.passes if p.kind == kind]
    if not infos:
        raise SelectionError(f"run {run.id} has no full {kind} passes (captured before they were kept)")
    if kind == "snapshot" and key == "generated":
        gen = [s["index"] for s in run.snapshot_index if s.get("generated")]
        if not gen:
            raise SelectionError(f"run {run.id} has no generated-reply snapshot")
        key = gen[0]
    for p in infos:
        if p.key == key:
            return p
    have = ", ".join(str(p.key) for p in infos)
    raise SelectionError(f"run {run.id} has no {kind} {key!r}; it has: {have}")


def full_array(run: Any, info: PassInfo, source: str, dense: bool = False) -> da.Array:
    """One pass's (L, T, W), (L, heads, T, T) or (T, W) array (``dense``: each stored
    piece read in one call, see ``RunReader._dask``)."""
    base = run.array(source, dense=dense)  # checks the source; the run's own positions
    if info.base is not None:
        base = full_array(run, run.passes[info.base], source, dense)
    n = info.shared
    if info.rows == 0:  # every position is the base's
        return base[:, :, :n, :n] if source == "attn_weights" else base[:, :n] if base.ndim == 3 else base[:n]
    try:
        own = run._source(source, PREFIX, dense)
    except KeyError:
        raise SelectionError(
            f"run {run.id}'s full passes hold no {source!r} (imported from files that leave it out)"
        ) from None
    s, e = info.start, info.start + info.rows
    if source == "attn_weights":
        mine = own[:, :, s:e, : info.length]
    else:
        mine = own[:, s:e] if own.ndim == 3 else own[s:e]
    if n == 0:
        return mine
    if source == "attn_weights":
        head = base[:, :, :n, :n]
        pad = da.zeros((*head.shape[:3], info.length - n), dtype=head.dtype, chunks=head.chunksize[:3] + (-1,))
        return da.concatenate([da.concatenate([head, pad], axis=3), mine], axis=2)
    if base.ndim == 3:
        return da.concatenate([base[:, :n], mine], axis=1)
    return da.concatenate([base[:n], mine], axis=0)


def full_tokens(run: Any, info: PassInfo) -> np.ndarray:
    """Token ids of one pass."""
    own = np.asarray(run.open_array(TOKENS)[info.start : info.start + info.rows]) if info.rows else np.zeros(0, np.int64)
    if info.shared == 0:
        return own
    base = run.tokens() if info.base is None else full_tokens(run, run.passes[info.base])
    return np.concatenate([base[: info.shared], own])


def stored_qkv_last(run: Any, info: PassInfo) -> np.ndarray | None:
    """The (num_layers, Dv) ``qkv_last`` an import kept for this pass, or None (a captured
    run's is computed from its q, k and v)."""
    if QKV_LAST not in run.group:
        return None
    return np.asarray(run.open_array(QKV_LAST)[run.passes.index(info)])
