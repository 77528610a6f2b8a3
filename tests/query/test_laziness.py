"""Building a query reads nothing; only compute() touches array data."""

from __future__ import annotations

from typing import Any

import dask
import pytest

from actstore.query import analyses, compare, states
from actstore.query.plan import compute_plans

from .helpers import counting_store


def _refuse(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("a query computed while it was being built")


def test_building_queries_reads_no_array_data(synth_store: Any) -> None:
    store, cs = counting_store(synth_store.location)
    runs = store.runs(["all"])
    cs.reset()
    with dask.config.set(scheduler=_refuse):
        plans = [
            compare.compare_states_plan(runs, "initial", "final"),
            compare.compare_states_plan(runs, "step:1", "snapshot:2"),
            compare.inter_run_plan(runs),
            compare.snapshots_vs_references_plan(runs),
            analyses.cross_layer_plan(runs[0]),
        ]
        lazy = [states.state_vectors(runs[0], "reference:joy", "hidden_in"), states.as_xarray(runs[0], "q")]
    assert cs.data_reads() == []  # metadata (zarr.json) only
    frames = compute_plans(*plans)
    assert all(len(f) for f in frames)
    assert cs.data_reads()  # now it did read
    assert all(hasattr(x, "compute") or hasattr(x, "data") for x in lazy)


def test_compute_happens_only_on_request(synth_store: Any) -> None:
    run = synth_store.runs(["all"])[0]
    with dask.config.set(scheduler=_refuse):
        x = states.select(run, "hidden_out", [0, 1, 2])
        with pytest.raises(AssertionError, match="computed while"):
            x.compute()
