"""``actstore export npz`` and ``actstore import npz``: the seed's run directories.

Thin commands over :mod:`actstore.store.npz`; ``actstore.cli`` calls :func:`register`.
"""

from __future__ import annotations

import click

from actstore.cli.common import _fail_cleanly, _interruptible, _quiet_option, open_store, store_options


def _subgroup(main: click.Group, name: str, help_text: str) -> click.Group:
    """The ``export`` / ``import`` group, shared with other modules that add formats."""
    group = main.commands.get(name)
    if isinstance(group, click.Group):
        return group
    group = click.Group(name, help=help_text)
    main.add_command(group)
    return group


def register(main: click.Group) -> None:
    export_group = _subgroup(main, "export", "Write runs in other formats.")
    import_group = _subgroup(main, "import", "Read runs from other formats into a store.")

    @export_group.command("npz")
    @click.argument("run", default="latest")
    @click.option("--out", "out", default="exports", show_default=True, metavar="DIR",
                  help="parent folder: the run directory is DIR/<run_id>")  # fmt: skip
    @click.option("--overwrite", is_flag=True, help="replace an existing export of the run")
    @store_options
    @_quiet_option
    @_interruptible
    @_fail_cleanly
    def export_npz_cmd(
        run: str, out: str, overwrite: bool, store_location: str | None,
        storage_options: tuple[str, ...], quiet: bool,
    ) -> None:  # fmt: skip
        """Write RUN as the seed's run directory (run.json, steps.json, tensors/*.npz, ...)."""
        from actstore.store.npz import default_export_dir, export_npz

        reader = open_store(store_location, storage_options).run(run)
        path = export_npz(reader, default_export_dir(out, reader), quiet=quiet, overwrite=overwrite)
        click.echo(str(path))

    @import_group.command("npz")
    @click.argument("run_dir", metavar="DIR")
    @store_options
    @_quiet_option
    @_interruptible
    @_fail_cleanly
    def import_npz_cmd(
        run_dir: str, store_location: str | None, storage_options: tuple[str, ...], quiet: bool
    ) -> None:
        """Read a seed run directory (ours or the original tool's) into the store as new runs.

        DIR is a run directory (run.json, steps.json, ...) or Activation Lab's top-level
        run directory (scenario.json, references/, one prompt_N*/ per prompt): one run per
        prompt directory, in order, each with the shared references. Prints the run ids.
        The whole directory is checked before the store is opened: names (scenario,
        labels, roles) follow the scenario rule; every file must lie inside DIR (no
        absolute path, no .., no symlink leading out); every NPZ member's header is read
        before its data and must have the shape steps.json declares and a float dtype
        (nothing is unpickled), and no member may expand like a zip bomb; the import must
        fit in half the machine's memory."""
        from actstore.store.npz import import_npz_dirs, read_seed_dirs

        seeds = read_seed_dirs(run_dir)  # every check first: a refused directory creates no store
        store = open_store(store_location, storage_options, create=True)
        for run_id in import_npz_dirs(store, seeds, quiet=quiet):
            click.echo(run_id)
