"""``actstore materialize``: a train layout (token-major rows of chosen sites) from runs.
A thin command over :func:`actstore.store.materialize.materialize`."""

from __future__ import annotations

import click

from actstore.cli.common import _fail_cleanly, _quiet_option, open_store, store_options


@click.command("materialize")
@click.argument("runs", nargs=-1, metavar="[RUN]...")
@store_options
@click.option("--name", "name", required=True, help="the layout's name (extended if it exists)")
@click.option("--source", "sources", multiple=True, default=("hidden_out",), show_default=True,
              help="per-layer source (repeatable)")  # fmt: skip
@click.option("--layers", required=True, help="layers, e.g. 8,16 or 4-7")
@click.option("--chunk-rows", type=click.IntRange(min=1), default=None,
              help="rows per chunk (default: the measured default)")  # fmt: skip
@_quiet_option
@_fail_cleanly
def materialize_cmd(runs: tuple[str, ...], store_location: str | None, storage_options: tuple[str, ...],
                    name: str, sources: tuple[str, ...], layers: str, chunk_rows: int | None,
                    quiet: bool) -> None:  # fmt: skip
    """Copy every position of RUN... (ids, scenario names, `all`; default: latest) into the
    train layout NAME: one row per token for each (source, layer) site, read fast in
    shuffled order by actstore.torch.ActivationDataset. Each run becomes one segment,
    committed on its own; runs already in the layout are skipped."""
    from actstore.store import train_layout as tl
    from actstore.store.materialize import materialize

    store = open_store(store_location, storage_options)
    result = materialize(store, runs or ("latest",), name, list(sources), layers,
                         chunk_rows=chunk_rows or tl.CHUNK_ROWS, progress=False if quiet else None)  # fmt: skip
    for run_id in result.skipped:
        click.echo(f"skipped {run_id} (already in layout {name})")
    click.echo(f"layout {name}: {len(result.written)} segment(s) written, {result.rows} rows, "
               f"{result.bytes / 2**20:.1f} MB in {result.seconds:.1f} s ({result.mb_per_s:.0f} MB/s)")  # fmt: skip


def register(main: click.Group) -> None:
    main.add_command(materialize_cmd)
