"""``actstore export npz`` and ``actstore import npz``: the seed's run directories.

Thin commands over :mod:`actstore.store.npz`; ``actstore.cli`` calls :func:`register`.
"""

from __future__ import annotations

import click

from actstore.cli.common import _fail_cleanly, _quiet_option, open_store, store_options


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
                  help="parent folder: lab writes DIR/<scenario>_<time>, readme DIR/<run_id>")  # fmt: skip
    @click.option("--layout", type=click.Choice(["lab", "readme"]), default="lab", show_default=True,
                  help="lab: what Activation Lab writes (every run of RUN's scenario run, full "
                       "snapshot and reference passes); readme: the older layout its README "
                       "describes (RUN alone, last-token snapshot and reference vectors)")  # fmt: skip
    @click.option("--overwrite", is_flag=True, help="replace an existing export of the run")
    @store_options
    @_quiet_option
    @_fail_cleanly
    def export_npz_cmd(
        run: str, out: str, layout: str, overwrite: bool, store_location: str | None,
        storage_options: tuple[str, ...], quiet: bool,
    ) -> None:  # fmt: skip
        """Write RUN as Activation Lab's run directory; prints its path.

        lab (the default): the directory Activation Lab's `run` writes for one capture of a
        scenario file, holding every run of RUN's scenario run (RUN may name one run, or
        the scenario run): scenario.json, references/ref_<label>.npz, and per run a
        prompt_<i>/ (or prompt_<i>_msg<k>of<m>/ for run_at_each_message) with run.json,
        steps.json, tensors/step_NNN.npz and conversation_snapshots/, whose files hold the
        full prefill of each prefix (every source but v at every position, attention
        weights, and qkv_last). Runs captured before full passes were kept, or imported
        from the readme layout, need --layout readme."""
        from actstore.store.npz import default_export_dir, export_npz
        from actstore.store.npz_lab import scenario_runs

        reader = open_store(store_location, storage_options).run(run)
        runs = [reader] if layout == "readme" else scenario_runs(reader)
        path = export_npz(runs, default_export_dir(out, runs, layout), layout=layout, quiet=quiet,
                          overwrite=overwrite)  # fmt: skip
        click.echo(str(path))

    @import_group.command("npz")
    @click.argument("run_dir", metavar="DIR")
    @store_options
    @_quiet_option
    @_fail_cleanly
    def import_npz_cmd(
        run_dir: str, store_location: str | None, storage_options: tuple[str, ...], quiet: bool
    ) -> None:
        """Read a run directory (ours or Activation Lab's) into the store as new runs.

        DIR is Activation Lab's top-level run directory (scenario.json, references/, one
        prompt_N*/ per prompt): one run per prompt directory, in order, one scenario run,
        each answering for the shared references; or one run directory (run.json,
        steps.json, ...). Full snapshot and reference files are kept whole, bit for bit,
        so an export writes them back. Prints the run ids.
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
