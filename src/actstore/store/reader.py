"""Lazy read access to one committed run.

The reader hands out Dask arrays over the run's Zarr arrays and serves the derived
sources as if they were stored: ``hidden_in`` / ``hidden_out`` are views of the
residual-boundary array, ``mlp_down_in`` is ``mlp_act * mlp_up`` (gated MLPs) or
``mlp_act`` (plain MLPs), and bfloat16 bits are widened to float32. Nothing is read
until a caller computes; this module is the only place that turns Zarr arrays into Dask
arrays, with deterministic graph names.
"""

from __future__ import annotations

import json
from functools import cached_property
from typing import Any

import dask.array as da
import numpy as np
import zarr

from actstore import naming
from actstore.errors import DamagedRunError, SelectionError
from actstore.store import integrity, layout
from actstore.store import passes as pass_views


class RunReader:
    """One run: metadata, catalog entry, and lazy arrays.

    >>> run = ActStore.open("stores/actstore.zarr").run("latest")   # doctest: +SKIP
    >>> run.array("hidden_out")[:, run.final_position].compute()     # doctest: +SKIP
    """

    def __init__(self, run_id: str, group: zarr.Group, entry: dict[str, Any], store: Any = None):
        self.id = run_id
        self.group = group
        self.entry = entry
        self.store = store  # the ActStore it came from: runs of one file share reference passes
        self._lazy: dict[tuple[str, bool], da.Array] = {}  # a committed run never changes
        with integrity.naming_damage(run_id, "run metadata (zarr.json)"):
            meta = self.meta
            for key in ("layers", "prompt_len", "n_positions", "sources", "store_dtype"):
                if key not in meta:
                    raise ValueError(f"no {key!r} in its attributes")
        if not integrity.has_checksums(meta):  # written before checksums: read as it always did
            integrity.mark_lenient(group, run_id)

    @property
    def checksummed(self) -> bool:
        """Whether damage to this run's chunks is detected (runs written before
        checksums read as they always did, damage unseen)."""
        return integrity.has_checksums(self.meta)

    def open_array(self, path: str) -> integrity.GuardedArray:
        """The stored Zarr array at ``path`` (KeyError if absent), whose reads name this
        run when its data is damaged."""
        arr = self.group[path]
        if not isinstance(arr, zarr.Array):
            raise KeyError(path)
        return integrity.GuardedArray(arr, self.id, path)

    # ---- metadata -----------------------------------------------------------------
    @cached_property
    def meta(self) -> dict[str, Any]:
        run = self.group.attrs.get("run")
        if not isinstance(run, dict):
            raise DamagedRunError(self.id, "its group has no run metadata")
        return dict(run)

    @property
    def scenario(self) -> dict[str, Any]:
        return self.meta["scenario"]

    @property
    def layers(self) -> list[int]:
        """Real layer indices of the captured layers (the layer coordinate)."""
        return list(self.meta["layers"])

    @cached_property
    def _steps(self) -> list[dict[str, Any]]:
        if "steps" in self.meta:  # runs written before the steps array kept them in the attributes
            return list(self.meta["steps"])
        arr = self.open_array(naming.STEPS_ARRAY)
        with integrity.naming_damage(self.id, naming.STEPS_ARRAY):
            return list(json.loads(np.asarray(arr[:]).tobytes()))

    @property
    def steps(self) -> list[dict[str, Any]]:
        """Per forward pass: kind, fed and generated tokens, top-k log-probs (one read,
        on first use)."""
        return list(self._steps)

    @property
    def prompt_len(self) -> int:
        return int(self.meta["prompt_len"])

    @property
    def n_positions(self) -> int:
        return int(self.meta["n_positions"])

    @property
    def n_steps(self) -> int:
        return int(self.meta["n_steps"]) if "n_steps" in self.meta else len(self._steps)

    @property
    def prefill_position(self) -> int:
        """Position of the last prompt token: the seed's 'initial' state."""
        return self.prompt_len - 1

    @property
    def final_position(self) -> int:
        """Position fed to the last forward pass: the seed's 'final' state."""
        return self.n_positions - 1

    def step_positions(self, step: int) -> range:
        """Positions computed by one forward pass (all prompt positions for step 0)."""
        if not 0 <= step < self.n_steps:
            raise SelectionError(f"run {self.id} has steps 0..{self.n_steps - 1}, not {step}")
        if step == 0:
            return range(0, self.prompt_len)
        p = self.prompt_len + step - 1
        return range(p, p + 1)

    def layer_index(self, layers: list[int] | None) -> list[int]:
        """Positions along the layer axis of real layer indices (None = every layer)."""
        if layers is None:
            return list(range(len(self.layers)))
        missing = [layer for layer in layers if layer not in self.layers]
        if missing:
            raise SelectionError(
                f"run {self.id} did not capture layer(s) {missing}; captured: {_ranges(self.layers)}"
            )
        return [self.layers.index(layer) for layer in layers]

    @property
    def sources(self) -> tuple[str, ...]:
        """Every step source this run can serve, stored or derived."""
        return tuple(self.meta["sources"])

    @property
    def snapshot_index(self) -> list[dict[str, Any]]:
        return list(self.meta.get("snapshots", []))

    @property
    def reference_labels(self) -> list[str]:
        return list(self.meta.get("references", []))

    # ---- arrays -------------------------------------------------------------------
    def _dask(self, path: str, dense: bool = False) -> da.Array:
        """``dense``: one task for the whole array, so a slice of it is ONE Zarr read that
        decodes its chunks concurrently (a 612-token pass of q: 38 ms, against 88 ms as a
        task per inner chunk); for what is read whole into memory anyway. Otherwise a
        task per inner chunk, which a streaming reduction holds a few of at a time.
        Made once per reader: an export asks for each array once per pass it writes."""
        if (path, dense) in self._lazy:
            return self._lazy[path, dense]
        arr = self.open_array(path)
        x = da.from_array(
            arr, chunks=arr.shape if dense else _task_chunks(arr),
            name=f"actstore-{self.id}-{path.replace('/', '-')}{'-dense' if dense else ''}",
            meta=np.empty((0,) * arr.ndim, dtype=arr.dtype),
        )  # fmt: skip
        if arr.attrs.get("actstore_dtype") == "bfloat16":
            x = x.map_blocks(layout.bfloat16_to_float32, dtype=np.float32)
        self._lazy[path, dense] = x
        return x

    def array(self, source: str, dense: bool = False) -> da.Array:
        """Lazy step array of a source: (L, T, W), (L, heads, T, T) or (T, W). Also
        ``attn_entropy``, (L, T, heads), where :attr:`has_attn_entropy`. ``dense``: read
        a slice in one call (see ``_dask``), for slices read whole."""
        if source == naming.ATTN_ENTROPY_ARRAY and self.has_attn_entropy:
            return self._source(source, dense=dense)
        naming.check_source(source)
        if source not in self.sources:
            raise SelectionError(
                f"run {self.id} did not capture {source!r}; it has: {', '.join(self.sources)}"
            )
        return self._source(source, dense=dense)

    def hook(self, name: str) -> da.Array:
        """Lazy array of a TransformerLens hook name (``blocks.16.hook_resid_post``):
        (T, W) for a layer source, (heads, T, T) for ``attn.hook_pattern``, (T, W) for
        ``hook_embed``. See :mod:`actstore.tl_names` for the mapping and shapes."""
        from actstore import tl_names

        source, layer = tl_names.for_run(name, self)
        x = self.array(source)
        if layer is None:
            return x
        if layer not in self.layers:
            raise SelectionError(
                f"{name}: run {self.id} did not capture layer {layer}; it has {_ranges(self.layers)}"
            )
        return x[self.layers.index(layer)]

    def _source(self, source: str, prefix: str = "", dense: bool = False) -> da.Array:
        """A source's array under ``prefix`` (the run's positions, or with ``passes/``
        the own rows of its full passes), derived sources served as if stored."""
        if source in ("hidden_in", "hidden_out"):
            res = self._dask(f"{prefix}{naming.ACTS_GROUP}/{naming.RESIDUAL_ARRAY}", dense)
            bounds: list[int] = self.meta["residual_boundaries"]
            shift = 0 if source == "hidden_in" else 1
            idx = [bounds.index(layer + shift) for layer in self.layers]
            if idx == list(range(idx[0], idx[0] + len(idx))):
                return res[idx[0] : idx[0] + len(idx)]
            return res[idx]
        if source == "mlp_down_in" and prefix + naming.act_path(source) not in self.group:
            return layout.derive_down_in(
                self._source("mlp_act", prefix, dense), self._source("mlp_up", prefix, dense),
                self.meta["gated_mlp"], self.meta["store_dtype"],
            )  # fmt: skip
        if source == naming.ATTN_ENTROPY_ARRAY:
            return self._dask(f"{prefix}{naming.ACTS_GROUP}/{source}", dense)
        return self._dask(prefix + naming.act_path(source), dense)

    @cached_property
    def has_attn_entropy(self) -> bool:
        """Whether capture stored every attention row's entropy (runs captured with
        attention weights since it does; imported runs and older ones do not)."""
        return f"{naming.ACTS_GROUP}/{naming.ATTN_ENTROPY_ARRAY}" in self.group

    # ---- full passes of snapshots and references (see store.passes) ----------------
    @cached_property
    def passes(self) -> list[pass_views.PassInfo]:
        """Every full snapshot and reference pass this run serves, in stored order."""
        return pass_views.pass_infos(self)

    def pass_info(self, kind: str, key: int | str) -> pass_views.PassInfo:
        """The pass of ``snapshot`` K (an index, or ``"generated"``) or ``reference``
        LABEL."""
        return pass_views.find(self._pass_owner(kind), kind, key)

    def pass_array(self, kind: str, key: int | str, source: str, dense: bool = False) -> da.Array:
        """Lazy array of one full pass, shaped like a step array over its own positions:
        (L, T, W), (L, heads, T, T) or (T, W). Positions it shares with the run (or an
        earlier pass) are read from there; only the rest is stored for it."""
        owner = self._pass_owner(kind)
        return pass_views.full_array(owner, pass_views.find(owner, kind, key), source, dense)

    def pass_tokens(self, kind: str, key: int | str) -> np.ndarray:
        """Token ids of one full pass."""
        owner = self._pass_owner(kind)
        return pass_views.full_tokens(owner, pass_views.find(owner, kind, key))

    def pass_qkv_last(self, kind: str, key: int | str) -> np.ndarray | None:
        """The ``qkv_last`` an Activation Lab import kept for one pass (None otherwise)."""
        owner = self._pass_owner(kind)
        return pass_views.stored_qkv_last(owner, pass_views.find(owner, kind, key))

    def _pass_owner(self, kind: str) -> RunReader:
        """The run holding this run's passes of ``kind``: itself, or for the reference
        passes of a later run of a multi-prompt file, the file's first run."""
        other = self.meta.get("references_run")
        if kind != "reference" or not other or other == self.id:
            return self
        if self.store is None:
            raise SelectionError(f"run {self.id}'s reference passes are in run {other}: open it from its store")
        return self._references_run

    @cached_property
    def _references_run(self) -> RunReader:
        return self.store.run(self.meta["references_run"])  # type: ignore[union-attr]

    def snapshots(self, source: str) -> da.Array:
        """(messages, L, H) last-token vectors of each conversation prefix."""
        return self._stacked(naming.snapshot_path(source), "snapshots", source)

    def references(self, source: str) -> da.Array:
        """(references, L, H) last-token vectors of each reference state."""
        return self._stacked(naming.reference_path(source), "references", source)

    def _stacked(self, path: str, what: str, source: str) -> da.Array:
        if source not in naming.RESIDUAL_SOURCES:
            raise SelectionError(f"{what} keep only {', '.join(naming.RESIDUAL_SOURCES)}, not {source!r}")
        if path not in self.group:
            raise SelectionError(f"run {self.id} has no {what} of {source!r}")
        return self._dask(path)

    def tokens(self) -> np.ndarray:
        """Token id at every position (prompt, then each generated token fed back)."""
        return np.asarray(self.open_array(naming.TOKENS_ARRAY)[...])

    def position_steps(self) -> np.ndarray:
        return np.asarray(self.open_array(naming.POSITION_STEP_ARRAY)[...])

    def generated_text(self) -> str:
        return str(self.meta.get("generated_text", ""))

    def __repr__(self) -> str:
        return (
            f"RunReader({self.id!r}, positions={self.n_positions}, steps={self.n_steps}, "
            f"layers={_ranges(self.layers)}, sources={list(self.sources)})"
        )


def _ranges(values: list[int]) -> str:
    """'0-29' or '0,5,10' for a list of layer indices."""
    if not values:
        return "none"
    if values == list(range(values[0], values[-1] + 1)) and len(values) > 2:
        return f"{values[0]}-{values[-1]}"
    return ",".join(map(str, values))


# Position tiles per dask task of an attention array: its inner chunks are small tiles
# (one layer, every head, 64 x 64), and a task per tile costs a separate read, ~1 ms
# each: a full 600-token pass over 30 layers is 3,000 of them. Four tiles a side read
# together from their shard in one call (a 600-token layer: 0.19 s as tiles, 0.03 s
# whole), and a small slice still reads no more than one such block per layer. Vector
# arrays keep a task per inner chunk (every layer of a few positions): grouping four
# read a 612-token pass in 65 ms instead of 124, but a streaming reduction then held
# more decoded bytes at once than a query over a store larger than memory may.
_TILES_PER_TASK = 4


def _task_chunks(arr: Any) -> tuple[int, ...]:
    chunks = tuple(arr.chunks)
    shards = getattr(arr, "shards", None) or chunks
    if len(chunks) == 4:  # (L, heads, T, T): rows and columns
        rows, cols = (min(c * _TILES_PER_TASK, s) for c, s in zip(chunks[2:], shards[2:], strict=True))
        return (chunks[0], chunks[1], rows, cols)
    return chunks
