"""``actstore capture-dataset`` (activations over a whole corpus, resumable) and
``actstore status`` (a dataset's done, pending and orphaned units). Thin commands over
:mod:`actstore.dataset`; ``actstore.cli`` calls :func:`register`."""

from __future__ import annotations

import click

from actstore.cli.common import (
    _fail_cleanly,
    _quiet_option,
    open_store,
    parse_storage_options,
    store_options,
)
from actstore.distributed import scheduler_address_option


@click.command("capture-dataset")
@click.argument("input_path", metavar="INPUT")
@click.option("--name", required=True, help="the dataset's name (its units' run ids start with it)")
@click.option("--model", default="smollm2", show_default=True, help="model id, local folder, or smollm2 (built in)")
@click.option("--gguf-file", default=None, help="GGUF file inside --model's folder")
@click.option("--model-dtype", default="float32", show_default=True, help="dtype the model runs in")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N, mps")
@click.option("--capture", "capture", multiple=True, metavar="FLAG",
              help="what to keep, as a scenario's capture section names it: hidden_states (default), qkv, mlp, "
                   "logits (repeatable; attention_weights is refused)")  # fmt: skip
@click.option("--layers", default="all", show_default=True, help="all, a range like 2-5, or a list like 0,3,7")
@click.option("--positions", default="all", show_default=True,
              help="per sequence: all, last, or a slice A:B of its positions (e.g. 0:64, -16:)")  # fmt: skip
@click.option("--exclude-special", is_flag=True, help="drop special tokens (BOS, chat-template markers)")
@click.option("--context", type=int, default=None, help="keep each sequence's first N tokens (default: the model's context)")
@click.option("--max-tokens", type=int, default=None, help="stop after this many stored positions")
@click.option("--max-new-tokens", type=int, default=0, show_default=True,
              help="also generate greedily; the generated tokens fed back are stored too")  # fmt: skip
@click.option("--batch-size", type=int, default=8, show_default=True, help="sequences per forward pass")
@click.option("--unit-size", type=int, default=64, show_default=True,
              help="sequences per work unit (one committed run; the grain of resume)")  # fmt: skip
@click.option("--store-dtype", default="float16", show_default=True, help="float16, bfloat16 or float32")
@click.option("--text-column", default="text", show_default=True, help="the column holding each sequence's text")
@click.option("--messages-column", default=None, help="a column of chat messages, rendered with the chat template")
@click.option("--label-column", "label_columns", multiple=True, metavar="COLUMN",
              help="a column kept with every stored position (repeatable)")  # fmt: skip
@click.option("--layout", type=click.Choice(["runs", "train"]), default="runs", show_default=True,
              help="runs: each unit a run of position-major arrays (queries, exports); train: each unit's rows "
                   "straight into the token-major train layout NAME that actstore.torch.ActivationDataset reads")  # fmt: skip
@click.option("--force", is_flag=True, help="recapture a dataset of this name captured with other input or settings")
@store_options
@scheduler_address_option
@_quiet_option
@_fail_cleanly
def capture_dataset_cmd(input_path: str, store_location: str | None, storage_options: tuple[str, ...],
                        scheduler_address: str | None, quiet: bool, capture: tuple[str, ...],
                        label_columns: tuple[str, ...], **options: object) -> None:  # fmt: skip
    """Capture activations over a whole corpus, in batches, one committed run per unit.

    INPUT: a .jsonl or .parquet file, a .txt file (one sequence per non-empty line), a
    folder of .txt files (one sequence per file) or a folder written by datasets'
    save_to_disk. Rerun the same command after a kill: committed units are skipped and
    only the interrupted one is redone. `actstore status NAME` shows where it stands."""
    from actstore.cli.capture import _quiet_hf_loading
    from actstore.dataset.capture import capture_dataset

    _quiet_hf_loading()
    r = capture_dataset(
        input_path, store_location, capture=capture or ("hidden_states",), label_columns=label_columns,
        storage_options=parse_storage_options(storage_options), scheduler=scheduler_address,
        progress=False if quiet else None, **options,  # type: ignore[arg-type]
    )  # fmt: skip
    click.echo(
        f"{r.name}\t{r.store}\t{len(r.skipped) + len(r.captured)}/{r.n_units} units ({len(r.captured)} captured now, "
        f"{len(r.skipped)} already committed), {r.n_sequences} sequences, {r.n_tokens} tokens, {r.seconds:.1f}s"
    )


@click.command("status")
@click.argument("name")
@store_options
@_fail_cleanly
def status_cmd(name: str, store_location: str | None, storage_options: tuple[str, ...]) -> None:
    """Where the corpus capture NAME stands: done, pending and orphaned units (orphaned:
    a unit killed mid-write; `actstore gc` removes it, a rerun redoes the unit)."""
    from actstore.dataset.status import dataset_status

    s = dataset_status(open_store(store_location, storage_options), name)
    total = "?" if s.n_units is None else str(s.n_units)
    click.echo(f"dataset {s.name}: {len(s.done)}/{total} units done, {s.n_sequences} sequences, {s.n_tokens} tokens"
               + (f", model {s.model}" if s.model else ""))  # fmt: skip
    click.echo(f"done      {_ranges(s.done)}")
    click.echo(f"pending   {_ranges(s.pending)}")
    click.echo(f"orphaned  {len(s.orphaned)}" + "".join(f"\n  {r}" for r in s.orphaned))
    if s.pending or s.orphaned:
        click.echo("rerun the capture-dataset command to finish it; `actstore gc --apply` removes orphans")


def _ranges(units: list[int]) -> str:
    if not units:
        return "-"
    parts, start = [], units[0]
    for a, b in zip(units, [*units[1:], None], strict=True):
        if b != a + 1:
            parts.append(f"{start}" if start == a else f"{start}-{a}")
            start = b  # type: ignore[assignment]
    return ",".join(parts)


def register(main: click.Group) -> None:
    main.add_command(capture_dataset_cmd)
    main.add_command(status_cmd)
