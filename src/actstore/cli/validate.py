"""``actstore validate``: check scenario files without running anything, every problem
at its field. A thin command over :mod:`actstore.scenario_check`; ``actstore.cli``
calls :func:`register`."""

from __future__ import annotations

import json
import sys

import click

from actstore.cli.common import _fail_cleanly


@click.command()
@click.argument("paths", nargs=-1, required=True, metavar="FILE_OR_DIR...")
@click.option("--strict", is_flag=True, help="an unknown key is an error (default: a warning; the file still loads)")
@click.option(
    "--model-check",
    is_flag=True,
    help="also check capture.layers and each prompt's token count against the scenario's model, "
    "reading its config and tokenizer only (never its weights; never downloads)",
)
@click.option("--json", "as_json", is_flag=True, help="print a JSON list of {file, field, severity, message, fix}")
@_fail_cleanly
def validate(paths: tuple[str, ...], strict: bool, model_check: bool, as_json: bool) -> None:
    """Check scenario files (a folder: its *.yaml and *.yml files) and print every problem, not only the first.

    One line per problem, `error:` or `warning:`, naming the file, the field and the
    fix; `FILE: ok` for a file that loads. Exit code 2 when any file has an error (a
    warning alone, such as an ignored unknown key, exits 0)."""
    from actstore.scenario_check import validate_files

    results = validate_files(paths, strict=strict, model=model_check or None)
    problems = [p for found in results.values() for p in found]
    if as_json:
        click.echo(json.dumps([p.to_dict() for p in problems], indent=2))
    else:
        for file, found in results.items():
            for p in found:
                click.echo(f"{p.severity}: {p.line()}")
            if not any(p.severity == "error" for p in found):
                warned = len(found)
                click.echo(f"{file}: ok" + (f" ({warned} warning{'s' if warned > 1 else ''})" if warned else ""))
    if any(p.severity == "error" for p in problems):
        sys.exit(2)


def register(main: click.Group) -> None:
    """Add ``validate`` to the ``actstore`` group."""
    main.add_command(validate)
