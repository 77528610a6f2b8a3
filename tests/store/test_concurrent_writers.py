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


def test_discard_waits_for_writes_in_flight_but_not_for_itself() -> None:
    """Before a failed run's group is deleted, the writes still running on zarr's event loop
    finish (one landing after the delete would leave half a group). The wait runs as a task
    on that loop and must leave itself out: waiting on itself it would sit out its whole
    timeout (30 s by default; 600 s here, so a wait that includes itself cannot pass)."""
    import asyncio
    import threading

    from zarr.core.sync import sync

    from actstore.store.store import _settle

    landed: list[str] = []
    started = threading.Event()

    async def write() -> None:
        started.set()
        await asyncio.sleep(0.5)
        landed.append("write")

    threading.Thread(target=lambda: sync(write()), daemon=True).start()  # a task on zarr's loop
    assert started.wait(timeout=60)
    settle = threading.Thread(target=lambda: sync(_settle(timeout=600)), daemon=True)
    settle.start()
    settle.join(timeout=120)
    assert not settle.is_alive(), "the wait included its own task"
    assert landed == ["write"]  # the write in flight finished first
