"""One work unit of a corpus capture, written and committed as one run of the store.

A unit run holds the same position-major arrays as a scenario run (``run.array(source)``
works), where T is the kept positions of the unit's sequences back to back, plus the
row-aligned arrays of :mod:`actstore.store.rows`. Its catalog entry, written last, is
the unit's commit marker: a unit killed half-way is an orphan group that ``actstore gc``
removes and a rerun redoes under a new run id.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from actstore import naming
from actstore.capture.provenance import provenance
from actstore.capture.runner import _plans as array_plans  # the scenario runs' array plans, shared
from actstore.dataset.batches import BatchRows
from actstore.dataset.layout_sink import LayoutSink, layout_sites
from actstore.dataset.settings import UNIT_TAG
from actstore.errors import StoreError
from actstore.models.architectures import ModelSites
from actstore.models.loading import LoadedModel
from actstore.paths import describe, user_error_in
from actstore.store import layout, rows
from actstore.store import train_layout as tl
from actstore.store.store import ActStore, catalog_entry
from actstore.store.writer import RunWriter, write_run_meta, write_small_array


def unit_run_name(name: str, unit: int) -> str:
    """The name a unit's run id starts with: ``<dataset>.u00012``."""
    return f"{name}{UNIT_TAG}{unit:05d}"


def write_unit(
    store: ActStore,
    batches: Iterable[BatchRows],
    *,
    dataset: dict[str, Any],
    loaded: LoadedModel,
    sites: ModelSites,
    layers: list[int],
    sources: set[str],
    store_dtype: str,
    max_rows: int,
    max_tokens: int | None = None,
) -> dict[str, Any]:
    """Write one unit from ``batches`` and commit it; returns its catalog entry.

    ``max_rows`` bounds the unit's positions (its arrays are sized for it, then shrunk);
    ``max_tokens``: stop after that many rows (the dataset's token budget ends here).
    ``dataset``: name, unit, n_units, fingerprint, settings (kept in meta and entry)."""
    run_id = store.new_run_id(unit_run_name(dataset["name"], dataset["unit"]))
    to_layout = dataset["settings"].get("layout") == "train"
    writer: RunWriter | LayoutSink | None = None
    n = 0
    facts: list[BatchRows] = []  # row facts only: activations go to the writer
    budget_reached = False
    try:
        group = store.create_run_group(run_id)  # inside: an interrupt right after it still discards it
        for batch in batches:
            if max_tokens is not None and n + len(batch) >= max_tokens:
                batch, budget_reached = batch.head(max_tokens - n), True
            if len(batch):
                if writer is None and to_layout:
                    writer = LayoutSink(store, dataset["name"], unit_run_name(dataset["name"], dataset["unit"]),
                                        batch, sources, layers, store_dtype, sites.gated_mlp, run_id)  # fmt: skip
                elif writer is None:
                    writer = RunWriter(group, array_plans(batch.tensors, sources, layers, max_rows, store_dtype))
                if isinstance(writer, LayoutSink):
                    writer.add(batch)
                else:
                    writer.submit(n, batch.tensors)
                facts.append(BatchRows({}, batch.token_ids, batch.sequence_index, batch.position, batch.labels))
                n += len(batch)
            if budget_reached:
                break
        if writer is None:  # no position kept (every sequence empty or excluded)
            raise StoreError(
                f"unit {dataset['unit']} of {dataset['name']} keeps no position "
                "(check --positions, --exclude-special and the input)"
            )
        if isinstance(writer, LayoutSink):
            writer.commit()  # the unit's run, committed next, then says the unit is done
        else:
            writer.finish(n)
        _write_rows(group, facts)
        meta = _unit_meta(dataset, loaded, sites, layers, sources, store_dtype, n, facts, budget_reached)
        if to_layout:  # the activations live in the layout; the run keeps the rows and commits the unit
            meta["sources"] = []
            meta["residual_boundaries"] = []
            meta["dataset"]["layout"] = {"name": dataset["name"], "segment": unit_run_name(dataset["name"], dataset["unit"]),
                                         "sites": [tl.site_name(x) for x in layout_sites(sources, layers)]}  # fmt: skip
        entry = catalog_entry(write_run_meta(group, meta), run_id)
        entry["dataset"] = meta["dataset"]
        store.commit(run_id, entry)
        return {**entry, "id": run_id}
    except BaseException as e:
        if writer is not None:
            writer.abort()
        store.discard(run_id)
        cause = user_error_in(e)
        if cause is not None:
            raise StoreError(f"{describe(cause, '--store', store.location)}; nothing was committed") from e
        raise


def _write_rows(group: Any, facts: list[BatchRows]) -> None:
    cat = np.concatenate
    token_ids = cat([f.token_ids for f in facts])
    for path, data in ((rows.TOKEN_IDS, token_ids), (rows.SEQUENCE_INDEX, cat([f.sequence_index for f in facts])),
                       (rows.POSITION, cat([f.position for f in facts]))):  # fmt: skip
        write_small_array(group, path, data.astype(str(rows.ROW_DTYPES[path])))
    for column in facts[0].labels:
        values = [v for f in facts for v in f.labels[column]]
        write_small_array(group, f"{rows.LABELS_GROUP}/{column}", _label_array(values))
    # What a scenario run's readers look for: every position is its own "prompt" token.
    write_small_array(group, naming.TOKENS_ARRAY, token_ids.astype(np.int64))
    write_small_array(group, naming.POSITION_STEP_ARRAY, np.zeros(len(token_ids), dtype=np.int32))


def _label_array(values: list[Any]) -> np.ndarray:
    """A label column as a NumPy array: bool, int64, float64 or variable-length text
    (zarr's string type has a v3 specification; fixed-width UTF-32 has none)."""
    if all(isinstance(v, bool) for v in values):
        return np.asarray(values, dtype=bool)
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return np.asarray(values, dtype=np.int64)
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        return np.asarray(values, dtype=np.float64)
    return np.asarray(["" if v is None else str(v) for v in values], dtype=np.dtypes.StringDType())


def _unit_meta(
    dataset: dict[str, Any], loaded: LoadedModel, sites: ModelSites, layers: list[int], sources: set[str],
    store_dtype: str, n: int, facts: list[BatchRows], budget_reached: bool,
) -> dict[str, Any]:  # fmt: skip
    seqs = np.unique(np.concatenate([f.sequence_index for f in facts]))
    ds = {**dataset, "n_sequences": int(len(seqs)), "n_tokens": n, "budget_reached": budget_reached}
    return {
        # what run-level readers look up in a scenario: its name and how to load its model
        "scenario": {"name": dataset["name"], "kind": "dataset", "model": {
            "id": loaded.model_id, "dtype": dataset["settings"]["model_dtype"], "device": "auto",
            "gguf_file": dataset["settings"]["gguf_file"]}},  # fmt: skip
        **provenance(loaded, sites),
        # A unit reads like one prefill of n positions (step 0), so run-level readers work.
        "prompt_token_ids": [],
        "prompt_tokens": [],
        "prompt_len": n,
        "n_positions": n,
        "layers": layers,
        "sources": [s for s in naming.ALL_SOURCES if s in sources],
        "residual_boundaries": layout.residual_boundaries(layers) if "hidden_in" in sources else [],
        "gated_mlp": sites.gated_mlp,
        "store_dtype": store_dtype,
        "steps": [{"step": 0, "kind": "corpus", "seq_len": n, "generated_token_id": None,
                   "generated_token": "", "top_k": [], "positions": [0, n]}],  # fmt: skip
        "generated_token_ids": [],
        "generated_text": "",
        "snapshots": [],
        "references": [],
        "passes": [],
        "token_strings": {},
        "dataset": ds,
    }
