"""A corpus unit written straight into the dataset's train layout (``--layout train``).

The unit's kept rows go, batch by batch, into one segment of the token-major layout named
after the dataset (:mod:`actstore.store.train_layout`), so training reads need no
``materialize`` pass over position-major arrays. The segment id is the unit's name
(``<dataset>.u00012``): a unit redone after a kill writes the same segment again, and
the last commit wins whole, so every unit is in the layout exactly once.

Sites are every captured per-layer vector source at every captured layer, served as a
unit run would serve them: ``hidden_in``/``hidden_out`` from the residual boundaries and
``mlp_down_in`` derived from ``mlp_act`` and ``mlp_up`` with the same rounding
(``store.layout.derive_down_in``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from actstore import naming
from actstore.dataset.batches import BatchRows
from actstore.store import layout
from actstore.store import train_layout as tl
from actstore.store.rows import Rows
from actstore.store.train_writer import SegmentWriter
from actstore.store.writer import to_numpy


def layout_sites(sources: set[str], layers: list[int]) -> list[tl.Site]:
    """The (source, layer) sites a unit of these sources and layers fills."""
    return [(s, layer) for s in naming.LAYER_SOURCES if s in sources and s != "attn_weights" for layer in layers]


class LayoutSink:
    """One unit's segment: created at its first batch (widths and label types come from
    it), then fed every batch; :meth:`commit` before the unit's run commits."""

    def __init__(self, store: Any, name: str, segment: str, first: BatchRows, sources: set[str],
                 layers: list[int], store_dtype: str, gated: bool, run_id: str):  # fmt: skip
        self.sites = layout_sites(sources, layers)
        self.store_dtype, self.gated = store_dtype, gated
        widths = {site: self._values(first, site).shape[-1] for site in self.sites}
        labels = {c: _label_dtype(v) for c, v in first.labels.items()}
        self.writer = SegmentWriter(store, name, segment, self.sites, widths, store_dtype, labels=labels,
                                    source_run=run_id, replace=True)  # fmt: skip

    def add(self, batch: BatchRows) -> None:
        labels = {c: _label_values(v, self.writer.label_dtypes[c]) for c, v in batch.labels.items()}
        rows = Rows(batch.token_ids, batch.sequence_index, batch.position, labels)
        self.writer.append({site: self._values(batch, site) for site in self.sites}, rows)

    def commit(self) -> None:
        self.writer.commit()

    def abort(self) -> None:
        self.writer.abort()

    def _values(self, batch: BatchRows, site: tl.Site) -> np.ndarray:
        """(rows, width) of one site, in the store dtype's physical form."""
        source, layer = site
        t = batch.tensors
        if source in ("hidden_in", "hidden_out"):
            return to_numpy(t[("residual", layer + (source == "hidden_out"))])
        if source == "mlp_down_in" and ("mlp_down_in", layer) not in t:
            act, up = to_numpy(t[("mlp_act", layer)]), to_numpy(t[("mlp_up", layer)])
            if not self.gated:
                return act
            if self.store_dtype == "bfloat16":  # the product rounded once, kept as bfloat16 bits
                wide = layout.bfloat16_to_float32(act) * layout.bfloat16_to_float32(up)
                return (layout.round_to_bfloat16(wide).view(np.uint32) >> np.uint32(16)).astype(np.uint16)
            return act * up  # float16 / float32: NumPy rounds the product once, as a read does
        return to_numpy(t[(source, layer)])


def _label_dtype(values: list[Any]) -> np.dtype:
    """Numbers keep their type; anything else is text (object, stored as strings)."""
    if all(isinstance(v, bool) for v in values):
        return np.dtype(bool)
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return np.dtype(np.int64)
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        return np.dtype(np.float64)
    return np.dtype(object)


def _label_values(values: list[Any], dtype: np.dtype) -> np.ndarray:
    if dtype.kind == "O":
        return np.asarray(["" if v is None else str(v) for v in values], dtype=object)
    return np.asarray(values, dtype=dtype)
