"""Run metadata: what a query's open of a run parses, and runs written before the
per-step records moved to their own array."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import zarr

from actstore import naming
from actstore.capture.runner import capture_run
from actstore.scenario import scenario_from_dict
from actstore.store.reader import RunReader
from actstore.store.store import ActStore
from actstore.testing import SAMPLE_MESSAGES, tiny_loaded


def _capture(tmp_path: Path) -> Any:
    store = ActStore.open(tmp_path / "s.zarr", create=True)
    sc = scenario_from_dict({
        "name": "meta", "model": {"id": "tiny", "dtype": "float32", "device": "cpu"},
        "prompt": {"messages": SAMPLE_MESSAGES}, "generation": {"max_new_tokens": 6},
        "capture": {"store_dtype": "float32", "top_k_probs": 20},
    })  # fmt: skip
    return store.run(capture_run(sc, store, tiny_loaded("llama"), progress=False).run_id)


def test_group_attributes_leave_the_step_records_out(tmp_path: Path) -> None:
    run = _capture(tmp_path)
    attrs = run.group.attrs["run"]
    steps_bytes = len(json.dumps(run.steps))
    assert "steps" not in attrs and attrs["n_steps"] == 6 == len(run.steps)
    assert steps_bytes > len(json.dumps(attrs)) / 2  # the bulk of what used to be parsed
    # stored as one chunk of JSON text
    arr = run.group[naming.STEPS_ARRAY]
    assert isinstance(arr, zarr.Array) and arr.nchunks == 1


def test_runs_with_steps_in_their_attributes_still_read(tmp_path: Path) -> None:
    run = _capture(tmp_path)
    old_meta = {k: v for k, v in run.meta.items() if k != "n_steps"} | {"steps": run.steps}
    group = zarr.open_group(store=zarr.storage.MemoryStore(), mode="w")
    group.attrs["run"] = old_meta
    old = RunReader(run.id, group, run.entry)
    assert old.steps == run.steps and old.n_steps == run.n_steps
    assert old.step_positions(old.n_steps - 1) == run.step_positions(run.n_steps - 1)


def test_catalog_frame_leads_with_the_listed_columns_and_agrees_with_the_run(tmp_path: Path) -> None:
    """``ActStore.catalog()``: one row per run, the columns `actstore ls` shows first and in
    that order, each value what the run's own metadata says."""
    run = _capture(tmp_path)
    df = run.store.catalog()
    leading = ["id", "scenario", "model", "created_at", "prompt_len", "n_steps", "n_positions", "n_layers",
               "sources", "n_snapshots", "n_references", "scenario_run"]  # fmt: skip
    assert list(df.columns[: len(leading)]) == leading and len(df) == 1
    row = df.iloc[0]
    assert (row["id"], row["scenario"], row["model"]) == (run.id, "meta", "tiny-llama")
    assert (row["prompt_len"], row["n_steps"], row["n_positions"]) == (run.prompt_len, 6, run.n_positions)
    assert row["n_layers"] == len(run.layers) and list(row["sources"]) == list(run.sources)
    assert row["n_snapshots"] == len(run.snapshot_index) and row["n_references"] == len(run.reference_labels)
