"""What is wrong with a scenario, said at its field: the :class:`Problem` every check
returns, and the translation of pydantic's errors into one line each, worded for the person
who wrote the YAML (``FILE: FIELD: WHAT (FIX)``).

Kept apart from the scenario models so that what a scenario is and how its mistakes are
explained can each be read on their own; :mod:`actstore.scenario` re-exports ``Problem``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError

from actstore.errors import ScenarioError


class Invalid(ValueError):
    """A validator failure that carries its own fix and, optionally, a deeper field path."""

    def __init__(self, what: str, fix: str, at: tuple[str | int, ...] = (), others: tuple[Invalid, ...] = ()) -> None:
        super().__init__(f"{what} ({fix})")
        self.what, self.fix, self.at = what, fix, at
        self.others = others  # more failures of the same validator, each at its own field

    @classmethod
    def raise_all(cls, found: list[Invalid]) -> None:
        """Raise the first of ``found`` carrying the others (pydantic takes one error per
        validator); nothing when it is empty."""
        if found:
            raise cls(found[0].what, found[0].fix, found[0].at, tuple(found[1:]))


Severity = Literal["error", "warning"]


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a scenario, at its field.

    ``field`` is the dotted path as the file spells it (``generation.temperature``,
    ``prompt[1].messages[0].role``), or "" for the file as a whole (unreadable, invalid
    YAML, not a mapping). An error stops the scenario from loading; a warning (an unknown
    key, ignored unless ``strict``) does not."""

    file: str  # the file's path as given, or "<dict>"
    field: str
    message: str  # what is wrong
    fix: str  # how to fix it
    severity: Severity = "error"

    def line(self) -> str:
        """The one-line text of CLI errors: ``FILE: FIELD: MESSAGE (FIX)``."""
        where = f"{self.file}: {self.field}: " if self.field else f"{self.file}: "
        return one_line(f"{where}{self.message} ({self.fix})")

    def to_dict(self) -> dict[str, str]:
        """The problem as JSON-ready keys: file, field, severity, message, fix."""
        return {k: getattr(self, k) for k in ("file", "field", "severity", "message", "fix")}



def show_value(value: Any) -> str:
    """A value as the user wrote it in YAML, kept short."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


PROMPT_TAGS = ("mapping", "list")  # appear in pydantic's error locations after "prompt"


def _strip_tags(loc: tuple[str | int, ...]) -> tuple[str | int, ...]:
    """Drop the prompt union's tags, so paths read as the user wrote them."""
    return tuple(p for i, p in enumerate(loc) if not (i and loc[i - 1] == "prompt" and p in PROMPT_TAGS))


def field_name(loc: tuple[str | int, ...]) -> str:
    """A field's path as the user reads it: ``prompt[1].messages[0].role`` ("" for the file)."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _field_path(loc: tuple[str | int, ...]) -> str:
    return field_name(loc) or "<top level>"


def submodel(ann: Any) -> type[BaseModel] | None:
    """The model class inside an annotation (through lists, unions and Annotated)."""
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    if get_origin(ann) in (list, Union, UnionType, Annotated):
        for arg in get_args(ann):
            found = submodel(arg)
            if found is not None:
                return found
    return None


def _model_at(root: type[BaseModel], loc: tuple[str | int, ...]) -> type[BaseModel] | None:
    """The model class whose keys live at ``loc`` under ``root`` (list indices skipped)."""
    cls: type[BaseModel] | None = root
    for part in loc:
        if isinstance(part, int):
            continue
        field = cls.model_fields.get(part) if cls is not None else None
        if field is None:
            return None
        cls = submodel(field.annotation)
    return cls


_TYPE_WORDS: dict[str, tuple[str, str]] = {
    "int_type": ("an integer", "write a whole number without quotes"),
    "float_type": ("a number", "write a number without quotes"),
    "bool_type": ("true or false", "write true or false without quotes"),
    "string_type": ("text", "quote the value"),
    "list_type": ("a list", "write a YAML list of '- ' items"),
    "model_type": ("a mapping", "write indented 'key: value' lines"),
    "dict_type": ("a mapping", "write indented 'key: value' lines"),
}


def describe_error(err: Mapping[str, Any], root: type[BaseModel]) -> tuple[tuple[str | int, ...], str, str]:
    """(field loc, what is wrong, how to fix) for one pydantic error of validating ``root``."""
    loc, kind, ctx, value = _strip_tags(tuple(err["loc"])), err["type"], err.get("ctx") or {}, err.get("input")
    if kind == "value_error" and isinstance(ctx.get("error"), Invalid):
        e = ctx["error"]
        return loc + e.at, e.what, e.fix
    if kind == "missing":
        where = f"under {_field_path(loc[:-1])}" if len(loc) > 1 else "at the top level"
        return loc, "missing required key", f"add '{loc[-1]}:' {where}"
    if kind == "extra_forbidden":
        model = _model_at(root, loc[:-1])
        allowed = ", ".join(model.model_fields) if model else "see the scenario format"
        return loc, f"unknown key {loc[-1]!r}", f"allowed keys: {allowed}"
    if kind in _TYPE_WORDS:
        want, fix = _TYPE_WORDS[kind]
        return loc, f"expected {want}, got {show_value(value)}", fix
    if kind == "literal_error":
        options = re.findall(r"'([^']*)'", str(ctx.get("expected", "")))
        return loc, f"{loc[-1]} {show_value(value)} is not allowed", f"use one of: {', '.join(options)}"
    if kind == "too_short":
        entry = {"messages": "message with role and content", "prompt": "prompt with messages"}.get(
            str(loc[-1]), "entry"
        )
        return loc, "must not be empty", f"add at least one {entry}"
    bounds = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}
    if kind in bounds:
        limit = next(iter(ctx.values()))
        return (
            loc,
            f"must be {bounds[kind]} {limit}, got {show_value(value)}",
            f"use a value {bounds[kind]} {limit}",
        )
    # Anything unforeseen: pydantic's own short message, without its URL or traceback.
    return loc, str(err["msg"]).rstrip("."), "see the scenario format in the README"


def pydantic_problems(exc: ValidationError, source: str, root: type[BaseModel]) -> list[Problem]:
    """Every error pydantic collected validating ``root``, each at its field."""
    problems = []
    for err in exc.errors():
        loc, what, fix = describe_error(err, root)
        problems.append(Problem(source, field_name(loc), what, fix))
        invalid = (err.get("ctx") or {}).get("error")
        if isinstance(invalid, Invalid):  # the same validator's other failures
            base = loc[: len(loc) - len(invalid.at)]
            problems += [Problem(source, field_name(base + o.at), o.what, o.fix) for o in invalid.others]
    return problems


def first_error(problems: list[Problem]) -> ScenarioError | None:
    """The ScenarioError loading raises for ``problems``: the first error's line, with a
    count of the others; None when none is an error."""
    errors = [p for p in problems if p.severity == "error"]
    if not errors:
        return None
    more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
    return ScenarioError(errors[0].line() + more)


def one_line(text: str) -> str:
    return " ".join(text.split())
