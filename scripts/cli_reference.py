"""Print the CLI reference (every command, argument and option) as markdown.

The README's "CLI reference" section is this script's output; tests/test_docs.py checks
every command and option appears there. Regenerate with:
``.venv/bin/python scripts/cli_reference.py``
"""

from __future__ import annotations

import click

from actstore.cli import main


def _walk(group: click.Group, prefix: str) -> list[tuple[str, click.Command]]:
    out: list[tuple[str, click.Command]] = []
    for name in sorted(group.commands):
        cmd = group.commands[name]
        full = f"{prefix} {name}"
        out += _walk(cmd, full) if isinstance(cmd, click.Group) else [(full, cmd)]
    return out


def reference() -> str:
    ctx = click.Context(main, info_name="actstore")
    lines = []
    for name, cmd in _walk(main, "actstore"):
        args = " ".join(p.human_readable_name.upper() for p in cmd.params if isinstance(p, click.Argument))
        summary = " ".join((cmd.help or "").strip().split("\n\n")[0].split())
        lines += [f"### `{name}{' ' + args if args else ''}`", "", summary, ""]
        for p in cmd.params:
            if isinstance(p, click.Option) and p.name != "help":
                record = p.get_help_record(ctx)
                if record:
                    opts, text = record
                    lines.append(f"- `{opts}`: {text}")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    print(reference())
