"""``actstore ls`` and ``actstore inspect`` (what a store holds), ``actstore check`` (verify
every object of a store) and ``actstore gc`` (remove what killed captures and interrupted
writes left behind). Thin commands over :mod:`actstore.store`; ``actstore.cli`` calls
:func:`register`."""

from __future__ import annotations

import sys

import click

from actstore.cli.common import _fail_cleanly, _quiet_option, open_store, render_frame, store_options


@click.command("ls")
@store_options
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table")
@_fail_cleanly
def ls_cmd(store_location: str | None, storage_options: tuple[str, ...], fmt: str) -> None:
    """List the committed runs in a store (reads the catalog only). scenario_run is the
    id shared by the runs captured from one scenario file; it selects them all. A corpus
    capture (capture-dataset) is one row: its name, units done/total, sequences, tokens."""
    from actstore.dataset.status import listing

    store = open_store(store_location, storage_options)
    runs, datasets = listing(store.catalog_entries())
    df = store.catalog(runs)
    cols = [
        "id",
        "scenario",
        "scenario_run",
        "model",
        "created_at",
        "prompt_len",
        "n_steps",
        "n_layers",
        "n_snapshots",
        "n_references",
    ]
    df = df[cols]
    if datasets:  # a corpus capture is one row, not one per unit
        import pandas as pd

        extra = ["units", "sequences", "tokens"]
        parts = [df.astype(object), pd.DataFrame(datasets, dtype=object)]
        df = pd.concat(parts, ignore_index=True)[cols + extra]
        df = df.where(df.notna(), "")
    click.echo(render_frame(df, fmt))


@click.command()
@click.argument("run", default="latest")
@store_options
@_fail_cleanly
def inspect(run: str, store_location: str | None, storage_options: tuple[str, ...]) -> None:
    """Summarise one run: model, prompt, generated text, steps, arrays."""
    from actstore.store.inspect import describe_run

    store = open_store(store_location, storage_options)
    click.echo(describe_run(store.run(run)))


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n} B"


def _age(s: float | None) -> str:
    if s is None:
        return "age ?"
    return f"{s / 3600:.1f} h old" if s >= 3600 else f"{s / 60:.0f} min old" if s >= 60 else f"{s:.0f} s old"


def register(main: click.Group) -> None:
    main.add_command(ls_cmd)
    main.add_command(inspect)

    @main.command("check")
    @click.argument("runs", nargs=-1, metavar="[RUN]...")
    @store_options
    @_quiet_option
    @_fail_cleanly
    def check_cmd(runs: tuple[str, ...], store_location: str | None, storage_options: tuple[str, ...],
                  quiet: bool) -> None:  # fmt: skip
        """Verify every object of every run (or of RUN...): checksums, missing chunks,
        metadata, catalog; list orphans and temp files. Exit 1 when anything is wrong."""
        from actstore.store.check import PROBLEMS, check_store

        store = open_store(store_location, storage_options)
        result = check_store(store, runs, progress=None if not quiet else False)
        for f in result.findings:
            age = f"  ({_age(f.age_s)})" if f.age_s is not None else ""
            click.echo(f"{f.problem:<12} {f.key}  {f.detail}{age}")
        for run_id in result.unchecksummed:
            click.echo(f"note: run {run_id} was written before checksums: flipped bytes in it go undetected")
        problems = {p: sum(f.problem == p for f in result.findings) for p in PROBLEMS}
        summary = ", ".join(f"{n} {p}" for p, n in problems.items() if n) or "no problems"
        segments = f", {result.layout_segments} layout segments" if result.layout_segments else ""
        click.echo(f"checked {result.runs} runs{segments}, {result.objects} chunk objects: {summary}")
        if any(f.problem in ("orphaned", "temporary") for f in result.findings):
            click.echo("`actstore gc` lists what it would remove; `actstore gc --apply` removes it")
        if not result.ok:
            sys.exit(1)

    @main.command("gc")
    @click.option("--apply", is_flag=True, help="remove (without it, only list what would be removed)")
    @click.option("--min-age", type=click.FloatRange(min=0), default=1800.0, show_default=True, metavar="SECONDS",
                  help="keep orphans and temp files younger than this: a capture may still be writing them")  # fmt: skip
    @click.option("--no-cache", is_flag=True, help="leave the model cache's half-built folders alone")
    @store_options
    @_fail_cleanly
    def gc_cmd(apply: bool, min_age: float, no_cache: bool, store_location: str | None,
               storage_options: tuple[str, ...]) -> None:  # fmt: skip
        """Remove orphaned run groups (killed captures), temp files of interrupted writes and
        half-built model-cache folders. A dry run unless --apply; committed runs are never touched."""
        from actstore.models.gguf_cache import cache_root
        from actstore.store.check import collect_garbage

        store = open_store(store_location, storage_options)
        found = collect_garbage(store, apply=apply, min_age=min_age, cache=None if no_cache else cache_root())
        for g in found:
            state = "removed" if g.removed else "would remove" if g.removable else "kept (too recent)"
            click.echo(f"{state:<17} {g.what:<18} {g.where}  {_size(g.bytes)}, {_age(g.age_s)}")
        n = sum(g.removed for g in found) if apply else sum(g.removable for g in found)
        total = sum(g.bytes or 0 for g in found if (g.removed if apply else g.removable))
        verb = "removed" if apply else "would remove"
        click.echo(f"{verb} {n} item(s), {_size(total)}" + ("" if apply or not n else "; run with --apply"))
