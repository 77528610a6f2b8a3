"""Writers that start together on a store nobody has written to yet."""

from __future__ import annotations

import multiprocessing as mp
import time
from pathlib import Path

from actstore.store.store import ActStore

WRITERS, TRIALS = 6, 8


def _create_run(args: tuple[str, str, float]) -> str:
    location, run_id, start = args
    store = ActStore.open(location, create=True)
    time.sleep(max(0.0, start - time.time()))  # all writers reach the first run group together
    try:
        store.create_run_group(run_id)
    except Exception as e:  # noqa: BLE001 - reported to the test, which names it
        return f"{run_id}: {e!r}"
    return ""


def test_first_run_groups_of_a_new_store_do_not_collide(tmp_path: Path) -> None:
    # Separate processes (zarr serialises one process's calls on its event loop): the
    # first captures race to create the store's "runs" group between zarr's existence
    # check and its write; before the fix about one trial in three failed here.
    with mp.get_context("spawn").Pool(WRITERS) as pool:
        pool.map(time.sleep, [0.0] * WRITERS)  # workers started and imported
        for trial in range(TRIALS):
            location = str(tmp_path / f"s{trial}.zarr")
            start = time.time() + 0.5
            errors = [e for e in pool.map(_create_run, [(location, f"r{i}", start) for i in range(WRITERS)]) if e]
            assert not errors, f"trial {trial}: {errors[0]}"
