"""A corpus capture fanned out to a dask.distributed cluster: one task per pending unit.

The client reads the corpus (rows are small: text and labels) and submits each pending
unit with its rows; a worker loads the model once (kept for its next unit), captures
the unit and commits it into the shared store. Units commit independently, so a worker
lost mid-unit leaves an orphan group and the scheduler reruns the task elsewhere.
"""

from __future__ import annotations

import itertools
import os
import threading
from typing import Any

from actstore.dataset.inputs import Corpus, Row
from actstore.dataset.settings import DatasetSettings

# Worker-side: the last setup (model loaded, sites resolved), and one unit at a time
# per worker process (a model's hooks serve one capture at a time).
_SETUPS: dict[tuple[Any, ...], Any] = {}
_LOCK = threading.Lock()


def unit_task(
    location: str, storage_options: dict[str, Any] | None, settings: DatasetSettings, rows: list[Row],
    name: str, unit: int, n_units: int, fp: str, device: str,
) -> dict[str, Any]:  # fmt: skip
    """What one worker runs for one unit: returns its catalog entry."""
    from actstore.dataset.capture import _load, _setup, capture_unit
    from actstore.store.store import ActStore

    with _LOCK:
        key = (settings.model, settings.model_dtype, settings.gguf_file, device, settings.layers,
               settings.capture, settings.positions, settings.exclude_special, settings.context,
               settings.max_new_tokens, settings.store_dtype)  # fmt: skip
        if key not in _SETUPS:
            _SETUPS.clear()
            _SETUPS[key] = _setup(_load(settings, device), settings)
        store = ActStore.open(location, create=True, storage_options=storage_options)
        return capture_unit(store, _SETUPS[key], settings, rows, name=name, unit=unit, n_units=n_units, fp=fp)


def capture_units_on_cluster(
    store: Any, corpus: Corpus, settings: DatasetSettings, *, name: str, n_units: int, fp: str,
    done: dict[int, Any], address: str, storage_options: dict[str, Any] | None, device: str,
    progress: bool | None,
) -> list[dict[str, Any]]:  # fmt: skip
    """Capture every unit not in ``done`` on the cluster at ``address``; the new entries."""
    from distributed import as_completed
    from tqdm.auto import tqdm

    from actstore.distributed import ClusterError, gpu_resources, scheduler, worker_location

    location = worker_location(store.location)
    with scheduler(address) as client:
        assert client is not None
        resources = gpu_resources(client)
        rows = corpus.rows()
        futures = {}
        for unit in range(n_units):
            unit_rows = list(itertools.islice(rows, settings.unit_size))
            if unit in done:
                continue
            fut = client.submit(unit_task, location, storage_options, settings, unit_rows, name, unit, n_units, fp,
                                device, resources=resources, pure=False,
                                key=f"actstore-unit-{name}-{unit}-{os.urandom(4).hex()}")  # fmt: skip
            futures[fut] = unit
        entries, failures = [], []
        with tqdm(total=len(futures), desc=f"capture {name} on cluster", unit="unit", disable=progress is False) as bar:
            for fut in as_completed(futures):
                try:
                    entries.append(fut.result())
                except Exception as e:  # noqa: BLE001 - report every failure at the end
                    failures.append(f"unit {futures[fut]}: {type(e).__name__}: {e}")
                bar.update()
    if failures:
        raise ClusterError(
            f"{len(failures)} of {len(futures)} units failed (rerun to retry them): " + "; ".join(failures[:3])
        )
    return sorted(entries, key=lambda e: e["dataset"]["unit"])
