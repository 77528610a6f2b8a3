"""Reading a scenario file's YAML: the one problem that stops reading it (missing, not
UTF-8, invalid YAML, with its line and column), and every key repeated within one mapping,
which YAML itself would silently resolve to the last."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from actstore.scenario_problems import Problem, field_name


def _duplicate_keys(node: Any, loc: tuple[str | int, ...], found: list[Problem], source: str,
                    seen: set[int]) -> None:  # fmt: skip
    """Every key repeated within one mapping of the composed YAML, at its field and line
    (YAML itself would silently keep the last one)."""
    if id(node) in seen:  # an alias: its node was walked where it was anchored
        return
    seen.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _duplicate_keys(item, loc + (i,), found, source, seen)
    if not isinstance(node, yaml.MappingNode):
        return
    keys: set[str] = set()
    for key_node, value_node in node.value:
        if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
            _duplicate_keys(value_node, loc, found, source, seen)
            continue
        key = str(key_node.value)
        if key in keys:
            mark = key_node.start_mark
            found.append(Problem(source, field_name(loc + (key,)),
                                 f"duplicate key {key!r} at line {mark.line + 1}, column {mark.column + 1}",
                                 "keep one of them; YAML would keep only the last"))  # fmt: skip
        keys.add(key)
        _duplicate_keys(value_node, loc + (key,), found, source, seen)


UNREAD = object()  # what _read_yaml gives for a file it could not parse


def read_yaml(p: Path) -> tuple[Any, list[Problem]]:
    """The file's parsed YAML and its problems: repeated keys (the data keeps the last),
    or the one problem that stops reading it (then the data is ``UNREAD``)."""

    def unread(message: str, fix: str) -> tuple[Any, list[Problem]]:
        return UNREAD, [Problem(str(p), "", message, fix)]

    if p.is_dir():
        return unread("is a directory", "pass a .yaml file, or use load_scenarios")
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        return unread("file not found", "check the path")
    except (OSError, UnicodeDecodeError) as exc:
        return unread(f"cannot read file: {exc}", "check it is UTF-8 text")
    loader = yaml.SafeLoader(text)
    duplicates: list[Problem] = []
    try:
        node = loader.get_single_node()
        _duplicate_keys(node, (), duplicates, str(p), set())
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        return unread(f"{where}: invalid YAML: {exc.problem or exc.context or 'invalid YAML'}", "fix the YAML there")
    except yaml.YAMLError as exc:
        return unread(f"YAML error: {exc}", "fix the YAML")
    finally:
        loader.dispose()
    return data, duplicates
