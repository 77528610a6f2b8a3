"""``actstore export hf-dataset``: runs as the Hugging Face dataset SAELens trains from.

A thin command over :func:`actstore.store.hf_dataset.export_hf_dataset`; ``actstore.cli``
calls :func:`register`.
"""

from __future__ import annotations

import click

from actstore.cli.common import _fail_cleanly, _quiet_option, open_store, store_options
from actstore.cli.npz import _subgroup


def register(main: click.Group) -> None:
    export_group = _subgroup(main, "export", "Write runs in other formats.")

    @export_group.command("hf-dataset")
    @click.argument("runs", nargs=-1)
    @click.option("--out", "out", required=True, metavar="DIR", help="the dataset folder (save_to_disk)")
    @click.option("--hook", "hooks", multiple=True, required=True, metavar="NAME",
                  help="TransformerLens hook name, one column each (repeatable), e.g. blocks.16.hook_resid_post")  # fmt: skip
    @click.option("--context", type=click.IntRange(1), required=True, metavar="N",
                  help="tokens per row; each sequence's last len % N tokens are left out")  # fmt: skip
    @click.option("--overwrite", is_flag=True, help="replace an existing dataset at --out")
    @store_options
    @_quiet_option
    @_fail_cleanly
    def export_hf_cmd(
        runs: tuple[str, ...], out: str, hooks: tuple[str, ...], context: int, overwrite: bool,
        store_location: str | None, storage_options: tuple[str, ...], quiet: bool,
    ) -> None:  # fmt: skip
        """Write RUNS (default: latest; ids, prefixes, scenario names, all) as a `datasets` dataset
        SAELens reads as cached activations; prints its path.

        One row per window of --context consecutive tokens of a sequence (a scenario run is one
        sequence, a corpus unit many): a column per --hook, shape (context, d), the store's
        dtype (bfloat16 widened to float32 exactly), and token_ids (context,) int32, plus run,
        sequence_index and position (the window's first position). Train on it with SAELens's
        cached_activations_path=DIR and hook_name set to one --hook."""
        from actstore.store.hf_dataset import export_hf_dataset

        readers = open_store(store_location, storage_options).runs(runs or ("latest",))
        path = export_hf_dataset(readers, out, hooks, context, quiet=quiet, overwrite=overwrite)
        click.echo(str(path))
