"""The README documents every command and option of the CLI."""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from actstore.cli import main

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _commands(group: click.Group, prefix: str = "actstore") -> list[tuple[str, click.Command]]:
    out = []
    for name, cmd in sorted(group.commands.items()):
        full = f"{prefix} {name}"
        if isinstance(cmd, click.Group):
            out += _commands(cmd, full)
        else:
            out.append((full, cmd))
    return out


def test_every_command_is_in_the_cli_reference() -> None:
    reference = README.split("## CLI reference", 1)[1]
    missing = [name for name, _ in _commands(main) if name not in reference]
    assert not missing, f"README's CLI reference lacks: {missing}"


def test_every_option_is_documented() -> None:
    missing = []
    for name, cmd in _commands(main):
        for param in cmd.params:
            if isinstance(param, click.Option):
                longs = [o for o in param.opts if o.startswith("--")]
                if longs and not any(re.search(re.escape(o) + r"\b", README) for o in longs):
                    missing.append(f"{name} {longs[0]}")
    assert not missing, f"README never mentions: {missing}"


def test_readme_starts_with_the_two_commands() -> None:
    head = README.split("##", 1)[0]
    assert "bash scripts/setup.sh && .venv/bin/actstore capture scenarios/emotions.yaml" in head
    assert "bash scripts/setup.sh --dev && .venv/bin/python -m pytest" in head


@pytest.mark.slow
def test_readme_examples_run_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every ```python block runs in order in one namespace, then every `actstore query`
    line of the ```bash blocks, in a fresh folder holding the bundled scenarios."""
    shutil.copytree(ROOT / "scenarios", tmp_path / "scenarios")
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {}
    for block in re.findall(r"```python\n(.*?)```", README, re.S):
        exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - the docs are the test
    lines = [
        line.split("#", 1)[0].strip()
        for block in re.findall(r"```bash\n(.*?)```", README, re.S)
        for line in block.splitlines()
        if line.startswith("actstore query")
    ]
    assert lines, "README shows no query commands"
    for line in lines:
        result = CliRunner().invoke(main, shlex.split(line)[1:])
        assert result.exit_code == 0, (line, result.output)
        assert result.stdout.strip(), line
