"""``actstore capture``: run the model on scenarios and store the runs. A thin command
over :mod:`actstore.capture`; ``actstore.cli`` calls :func:`register`."""

from __future__ import annotations

from typing import Any

import click

from actstore.cli.common import (
    _fail_cleanly,
    _quiet_option,
    parse_storage_options,
    store_options,
)
from actstore.distributed import scheduler_address_option


def _quiet_hf_loading() -> None:
    """transformers' per-tensor loading bar is noise next to our own progress."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


@click.command()
@click.argument("scenario_path", metavar="SCENARIO.yaml|DIR")
@store_options
@scheduler_address_option
@_quiet_option
@click.option("--progress", "force_progress", is_flag=True,
              help="progress bars even when stderr is not a terminal (a log file, a background job)")
@click.option("--force", is_flag=True, help="capture even if the memory estimate exceeds what is available")
@click.option("--strict", is_flag=True, help="refuse a scenario with an unknown key (default: warn and ignore it)")
@_fail_cleanly
def capture(
    scenario_path: str, store_location: str | None, storage_options: tuple[str, ...],
    scheduler_address: str | None, quiet: bool, force_progress: bool, force: bool, strict: bool,
) -> None:  # fmt: skip
    """Run the model on a scenario file (or every scenario in a folder) and store the runs.

    A file whose prompt is a list gives one run per prompt (one per message prefix
    where a prompt has run_at_each_message), in order, sharing one scenario-run id
    (see `actstore ls`) and one capture of the references.

    Each run keeps a full pass of every conversation snapshot (each message prefix,
    then the conversation with the generated reply) and every reference: every captured
    source at every position, stored as views, only the positions not shared with the
    run (see README, "Full snapshots and references").

    With --scheduler, each scenario is one task on the cluster's workers, which write into
    the store directly: give a store they can all reach (an s3:// URL or a shared path)."""
    from actstore.scenario import DEFAULT_STORE, load_scenarios

    scenarios = load_scenarios(scenario_path, strict=strict)  # validate everything before any work
    _quiet_hf_loading()
    if scheduler_address:
        from actstore.distributed import capture_with_scheduler

        opts = parse_storage_options(storage_options)
        for result in capture_with_scheduler(scenarios, scheduler_address, store_location,
                                             storage_options=opts, progress=not quiet):  # fmt: skip
            click.echo(f"{result.run_id}\t{result.store}\t{result.n_steps} steps, "
                       f"{result.n_positions} positions, {result.seconds:.1f}s")  # fmt: skip
        return
    from actstore.capture.runner import attn_implementation
    from actstore.capture.runner import capture as do_capture
    from actstore.models.loading import load_model
    from actstore.store.store import check_location

    opts = parse_storage_options(storage_options)
    for sc in scenarios:  # a --store that cannot be written fails before any model loads
        check_location(store_location or sc.output.store or DEFAULT_STORE, create=True)
    loaded: dict[tuple[Any, ...], Any] = {}
    for sc in scenarios:
        location = store_location or sc.output.store or DEFAULT_STORE
        key = (sc.model.id, sc.model.dtype, sc.model.device, sc.model.gguf_file)
        if key not in loaded:
            loaded[key] = load_model(sc.model, attn_implementation=attn_implementation(sc))
        # capture() creates the store only once the scenario fits the model (layers,
        # context, memory)
        progress = False if quiet else (True if force_progress else None)  # None: when stderr is a terminal
        for result in do_capture(sc, location, loaded=loaded[key], progress=progress,
                                 storage_options=opts, force=force):  # fmt: skip
            click.echo(
                f"{result.run_id}\t{result.store}\t{result.n_steps} steps, "
                f"{result.n_positions} positions, {result.seconds:.1f}s"
            )


def register(main: click.Group) -> None:
    """Add ``capture`` to the ``actstore`` group."""
    main.add_command(capture)
