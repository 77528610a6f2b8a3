"""Scenario files: the seed's YAML format, validated, with every default in one place.

A scenario says which model to load, which conversation to feed it, how to generate and
what to capture. This module parses YAML into frozen pydantic models and collects every
validation failure as a :class:`Problem` at its field (``check_file``, ``check_data``:
what ``actstore validate`` prints); loading raises the first as one ``ScenarioError``
line: ``<file>: <field.path>: <what> (<fix>)``.
The format is the seed's unchanged, plus ``output.store`` (where the Zarr store goes).

Every file Activation Lab accepts loads and means the same: ``prompt`` may be a list of
prompts (one run each), sampling numbers are checked only when ``do_sample`` is true, and
an unknown key is a ``ScenarioWarning`` naming the nearest known key (``strict=True``
makes it the error it is in actstore's own format).
"""

from __future__ import annotations

import difflib
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    PrivateAttr,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from actstore import naming
from actstore.errors import ScenarioError, ScenarioWarning

DEFAULT_STORE = "stores/actstore.zarr"  # used when output.store is null; relative to the cwd

Dtype = Literal["float16", "bfloat16", "float32"]
Role = Literal["system", "user", "assistant"]

_DEVICE = re.compile(r"^(auto|cuda|mps|cpu|cuda:\d+)$")


class _Invalid(ValueError):
    """A validator failure that carries its own fix and, optionally, a deeper field path."""

    def __init__(self, what: str, fix: str, at: tuple[str | int, ...] = (), others: tuple[_Invalid, ...] = ()) -> None:
        super().__init__(f"{what} ({fix})")
        self.what, self.fix, self.at = what, fix, at
        self.others = others  # more failures of the same validator, each at its own field

    @classmethod
    def raise_all(cls, found: list[_Invalid]) -> None:
        """Raise the first of ``found`` carrying the others (pydantic takes one error per
        validator); nothing when it is empty."""
        if found:
            raise cls(found[0].what, found[0].fix, found[0].at, tuple(found[1:]))


def _check_safe_name(value: str, kind: str, example: str) -> str:
    # Names and labels become run ids and file names: the one rule import also applies.
    problem = naming.name_problem(value, example=example)
    if problem is None:
        return value
    raise _Invalid(f"{kind} {naming.show_name(value)} {problem[0]}", problem[1])


def _parse_layers(value: Any) -> Any:
    """Accept "all" or a list of unique non-negative ints; store the list sorted."""
    if value == "all":
        return value
    if not isinstance(value, list):
        raise _Invalid(
            f'expected "all" or a list of layer indices, got {_show(value)}', "write all or e.g. [0, 5, 10]"
        )
    seen: set[int] = set()
    for i, idx in enumerate(value):
        if not isinstance(idx, int) or isinstance(idx, bool):
            raise _Invalid(f"expected a layer index, got {_show(idx)}", "write a whole number", (i,))
        if idx < 0:
            raise _Invalid(f"layer index {idx} is negative", "layer indices count from 0", (i,))
        if idx in seen:
            raise _Invalid(f"layer index {idx} is listed twice", "list each layer once", (i,))
        seen.add(idx)
    return sorted(value)


class _Strict(BaseModel):
    # strict: YAML already gives real types, so "50" or "yes" is a mistake, not a number or bool.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class ModelConfig(_Strict):
    id: str
    dtype: Dtype = "float16"
    device: str = "auto"
    gguf_file: str | None = None
    trust_remote_code: bool = False

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not _DEVICE.match(v):
            raise _Invalid(f"unknown device {v!r}", "use one of auto, cuda, cuda:N, mps, cpu")
        return v


class Message(_Strict):
    role: Role
    content: str


class PromptConfig(_Strict):
    messages: list[Message] = Field(min_length=1)
    run_at_each_message: bool = False


class GenerationConfig(_Strict):
    max_new_tokens: int = Field(default=50, ge=1)
    do_sample: bool = False
    # Plain numbers, as in Activation Lab: greedy decoding never reads them, so
    # `do_sample: false, temperature: 0` is a valid file. Checked only when sampling.
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 42

    @model_validator(mode="after")
    def _sampling_numbers(self) -> GenerationConfig:
        if not self.do_sample:
            return self
        fix = "or set do_sample: false"
        found = []
        if self.temperature <= 0:
            found.append(_Invalid(f"must be > 0 when do_sample is true, got {_show(self.temperature)}",
                                  f"use a value > 0, {fix}", ("temperature",)))  # fmt: skip
        if self.top_k is not None and self.top_k < 1:
            found.append(_Invalid(f"must be >= 1 when do_sample is true, got {self.top_k}",
                                  f"use a value >= 1 or null, {fix}", ("top_k",)))  # fmt: skip
        if self.top_p is not None and not 0 < self.top_p <= 1:
            found.append(_Invalid(f"must be > 0 and <= 1 when do_sample is true, got {_show(self.top_p)}",
                                  f"use a value in (0, 1] or null, {fix}", ("top_p",)))  # fmt: skip
        _Invalid.raise_all(found)
        return self


class CaptureConfig(_Strict):
    hidden_states: bool = True
    attention_weights: bool = True
    qkv: bool = True
    mlp: bool = True
    logits: bool = True
    top_k_probs: int = Field(default=20, ge=0)
    layers: Annotated[Literal["all"] | list[int], BeforeValidator(_parse_layers)] = "all"
    store_dtype: Dtype = "float16"

    def flags(self) -> dict[str, bool]:
        """The five capture switches, in the seed's order (see naming.FLAG_SOURCES)."""
        return {k: getattr(self, k) for k in ("hidden_states", "attention_weights", "qkv", "mlp", "logits")}


class OutputConfig(_Strict):
    dir: str = "./runs"
    format: Literal["json+npz"] = "json+npz"
    store: str | None = None  # Zarr store path or URL; None means DEFAULT_STORE

    def store_location(self) -> str:
        return self.store if self.store is not None else DEFAULT_STORE


class ReferenceState(_Strict):
    label: str
    messages: list[Message] = Field(min_length=1)

    @field_validator("label")
    @classmethod
    def _label(cls, v: str) -> str:
        return _check_safe_name(v, "label", "calm")


def _prompt_form(value: Any) -> str:
    return "list" if isinstance(value, list) else "mapping"


_PROMPT_TAGS = ("mapping", "list")  # appear in pydantic's error locations after "prompt"

# One prompt mapping, or Activation Lab's list of them (what its scenario builder writes).
Prompts = Annotated[
    Annotated[PromptConfig, Tag("mapping")] | Annotated[list[PromptConfig], Tag("list"), Field(min_length=1)],
    Discriminator(_prompt_form),
]


class Scenario(_Strict):
    name: str
    model: ModelConfig
    prompt: Prompts
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    capture: CaptureConfig = Field(default_factory=CaptureConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    reference_states: list[ReferenceState] = []

    _source_path: Path | None = PrivateAttr(default=None)
    _prompt_index: int | None = PrivateAttr(default=None)  # set on the runs of a prompt list
    _message_prefix: tuple[int, int] | None = PrivateAttr(default=None)  # (k, m) of run_at_each_message
    _unknown: tuple[str, ...] = PrivateAttr(default=())  # strict-mode errors of ignored keys

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _check_safe_name(v, "name", "my_experiment")

    @field_validator("reference_states")
    @classmethod
    def _unique_labels(cls, refs: list[ReferenceState]) -> list[ReferenceState]:
        # Labels are file names (ref_<label>.npz), so a repeat would overwrite the first.
        seen: set[str] = set()
        for i, ref in enumerate(refs):
            if ref.label in seen:
                raise _Invalid(
                    f"duplicate label {ref.label!r}", "labels must be unique; rename one", (i, "label")
                )
            seen.add(ref.label)
        return refs

    @property
    def source_path(self) -> Path | None:
        """The YAML file this scenario came from, or None when built from a dict."""
        return self._source_path

    @property
    def source(self) -> str:
        """How error messages name this scenario's origin."""
        return str(self._source_path) if self._source_path is not None else "<dict>"

    def expanded(self) -> dict[str, Any]:
        """Every key with its default filled in, JSON-serialisable (goes into run metadata)."""
        return self.model_dump(mode="json")

    def check_strict(self) -> None:
        """Raise the ScenarioError that ``strict=True`` loading would have raised, if the
        file had unknown keys (they were ignored with a warning)."""
        if self._unknown:
            more = f" (+{len(self._unknown) - 1} more)" if len(self._unknown) > 1 else ""
            raise ScenarioError(self._unknown[0] + more)

    @property
    def prompts(self) -> list[PromptConfig]:
        """Every prompt of the file: one, or Activation Lab's list, in order."""
        return list(self.prompt) if isinstance(self.prompt, list) else [self.prompt]

    @property
    def single_prompt(self) -> PromptConfig:
        """The one prompt of a single-prompt scenario (what one run captures)."""
        if isinstance(self.prompt, list):
            if len(self.prompt) == 1:
                return self.prompt[0]
            raise ScenarioError(
                f"{self.source}: prompt: a list of {len(self.prompt)} prompts is several runs "
                "(capture it with capture(), or capture each of scenario.runs())"
            )
        return self.prompt

    @property
    def prompt_index(self) -> int | None:
        """Which prompt of its file's list this run's scenario is (None: a single prompt)."""
        return self._prompt_index

    @property
    def message_prefix(self) -> tuple[int, int] | None:
        """(k, m) when this run is message prefix k of m of a prompt with
        run_at_each_message (Activation Lab's ``prompt_N_msgKofM``); None otherwise."""
        return self._message_prefix

    @property
    def prompt_field(self) -> str:
        """How messages name this run's prompt in the file: prompt, or prompt[i] in a list."""
        return "prompt" if self._prompt_index is None else f"prompt[{self._prompt_index}]"

    def _with_prompt(self, prompt: PromptConfig, index: int | None) -> Scenario:
        sub = self.model_copy(update={"prompt": prompt})
        sub._source_path = self._source_path
        sub._prompt_index = index
        return sub

    def prompt_scenarios(self) -> list[Scenario]:
        """One single-prompt scenario per prompt of the file, in order."""
        if not isinstance(self.prompt, list):
            return [self]
        return [self._with_prompt(p, i) for i, p in enumerate(self.prompt)]

    def prefix_scenarios(self) -> list[Scenario]:
        """One scenario per message prefix messages[:1..n], each running the prefix once."""
        out: list[Scenario] = []
        msgs = self.single_prompt.messages
        for k in range(1, len(msgs) + 1):
            prompt = PromptConfig(messages=list(msgs[:k]), run_at_each_message=False)
            sub = self._with_prompt(prompt, self._prompt_index)
            sub._message_prefix = (k, len(msgs))
            out.append(sub)
        return out

    def runs(self) -> list[Scenario]:
        """The single-prompt scenarios to actually run, in order: per prompt of the file,
        its message prefixes when run_at_each_message, else the prompt itself."""
        out: list[Scenario] = []
        for sub in self.prompt_scenarios():
            out += sub.prefix_scenarios() if sub.single_prompt.run_at_each_message else [sub]
        return out


# ---------------------------------------------------------------------------- errors


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
        return _one_line(f"{where}{self.message} ({self.fix})")

    def to_dict(self) -> dict[str, str]:
        """The problem as JSON-ready keys: file, field, severity, message, fix."""
        return {k: getattr(self, k) for k in ("file", "field", "severity", "message", "fix")}



def _show(value: Any) -> str:
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


def _strip_tags(loc: tuple[str | int, ...]) -> tuple[str | int, ...]:
    """Drop the prompt union's tags, so paths read as the user wrote them."""
    return tuple(p for i, p in enumerate(loc) if not (i and loc[i - 1] == "prompt" and p in _PROMPT_TAGS))


def _field_name(loc: tuple[str | int, ...]) -> str:
    """A field's path as the user reads it: ``prompt[1].messages[0].role`` ("" for the file)."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _field_path(loc: tuple[str | int, ...]) -> str:
    return _field_name(loc) or "<top level>"


def _submodel(ann: Any) -> type[BaseModel] | None:
    """The model class inside an annotation (through lists, unions and Annotated)."""
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    if get_origin(ann) in (list, Union, UnionType, Annotated):
        for arg in get_args(ann):
            found = _submodel(arg)
            if found is not None:
                return found
    return None


def _model_at(loc: tuple[str | int, ...]) -> type[BaseModel] | None:
    """The model class whose keys live at ``loc`` (list indices skipped)."""
    cls: type[BaseModel] | None = Scenario
    for part in loc:
        if isinstance(part, int):
            continue
        field = cls.model_fields.get(part) if cls is not None else None
        if field is None:
            return None
        cls = _submodel(field.annotation)
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


def _describe(err: Mapping[str, Any]) -> tuple[tuple[str | int, ...], str, str]:
    """(field loc, what is wrong, how to fix) for one pydantic error."""
    loc, kind, ctx, value = _strip_tags(tuple(err["loc"])), err["type"], err.get("ctx") or {}, err.get("input")
    if kind == "value_error" and isinstance(ctx.get("error"), _Invalid):
        e = ctx["error"]
        return loc + e.at, e.what, e.fix
    if kind == "missing":
        where = f"under {_field_path(loc[:-1])}" if len(loc) > 1 else "at the top level"
        return loc, "missing required key", f"add '{loc[-1]}:' {where}"
    if kind == "extra_forbidden":
        model = _model_at(loc[:-1])
        allowed = ", ".join(model.model_fields) if model else "see the scenario format"
        return loc, f"unknown key {loc[-1]!r}", f"allowed keys: {allowed}"
    if kind in _TYPE_WORDS:
        want, fix = _TYPE_WORDS[kind]
        return loc, f"expected {want}, got {_show(value)}", fix
    if kind == "literal_error":
        options = re.findall(r"'([^']*)'", str(ctx.get("expected", "")))
        return loc, f"{loc[-1]} {_show(value)} is not allowed", f"use one of: {', '.join(options)}"
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
            f"must be {bounds[kind]} {limit}, got {_show(value)}",
            f"use a value {bounds[kind]} {limit}",
        )
    # Anything unforeseen: pydantic's own short message, without its URL or traceback.
    return loc, str(err["msg"]).rstrip("."), "see the scenario format in the README"


def _pydantic_problems(exc: ValidationError, source: str) -> list[Problem]:
    """Every error pydantic collected, each at its field."""
    problems = []
    for err in exc.errors():
        loc, what, fix = _describe(err)
        problems.append(Problem(source, _field_name(loc), what, fix))
        invalid = (err.get("ctx") or {}).get("error")
        if isinstance(invalid, _Invalid):  # the same validator's other failures
            base = loc[: len(loc) - len(invalid.at)]
            problems += [Problem(source, _field_name(base + o.at), o.what, o.fix) for o in invalid.others]
    return problems


def _first_error(problems: list[Problem]) -> ScenarioError | None:
    """The ScenarioError loading raises for ``problems``: the first error's line, with a
    count of the others; None when none is an error."""
    errors = [p for p in problems if p.severity == "error"]
    if not errors:
        return None
    more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
    return ScenarioError(errors[0].line() + more)


def _one_line(text: str) -> str:
    return " ".join(text.split())


# ---------------------------------------------------------------------------- loading


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
            found.append(Problem(source, _field_name(loc + (key,)),
                                 f"duplicate key {key!r} at line {mark.line + 1}, column {mark.column + 1}",
                                 "keep one of them; YAML would keep only the last"))  # fmt: skip
        keys.add(key)
        _duplicate_keys(value_node, loc + (key,), found, source, seen)


_UNREAD = object()  # what _read_yaml gives for a file it could not parse


def _read_yaml(p: Path) -> tuple[Any, list[Problem]]:
    """The file's parsed YAML and its problems: repeated keys (the data keeps the last),
    or the one problem that stops reading it (then the data is ``_UNREAD``)."""

    def unread(message: str, fix: str) -> tuple[Any, list[Problem]]:
        return _UNREAD, [Problem(str(p), "", message, fix)]

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


def _drop_unknown(
    data: Any, cls: type[BaseModel], loc: tuple[str | int, ...], found: list[tuple[tuple[str | int, ...], str]]
) -> Any:
    """``data`` without the keys ``cls`` (and the models inside it) does not know; each
    dropped key goes into ``found`` with the nearest known key."""
    if not isinstance(data, dict):
        return data  # a wrong type: validation names it
    out: dict[Any, Any] = {}
    for key, value in data.items():
        field = cls.model_fields.get(key) if isinstance(key, str) else None
        if field is None:
            near = difflib.get_close_matches(str(key), list(cls.model_fields), n=1, cutoff=0.0)
            found.append((loc + (str(key),), near[0] if near else ""))
            continue
        sub = _submodel(field.annotation)
        if sub is not None and isinstance(value, list):
            value = [_drop_unknown(v, sub, loc + (key, i), found) for i, v in enumerate(value)]
        elif sub is not None:
            value = _drop_unknown(value, sub, loc + (key,), found)
        out[key] = value
    return out


def check_data(data: Any, source: str = "<dict>", *, strict: bool = False) -> tuple[Scenario | None, list[Problem]]:
    """Validate parsed YAML (or any mapping), collecting every problem instead of
    stopping at the first: (the scenario, or None when any problem is an error; the
    problems). An unknown key is a warning, and is ignored, unless ``strict``."""
    if not isinstance(data, dict):
        got = "an empty file" if data is None else _show(data)
        return None, [Problem(source, "", f"expected a mapping of scenario keys at the top level, got {got}",
                              "start the file with 'name: ...', 'model:' and 'prompt:'")]  # fmt: skip
    # Unknown keys are dropped even when strict (then each is an error), so the rest of
    # the file is checked in full: pydantic skips a model's own checks (the sampling
    # numbers) once one of its keys failed.
    unknown: list[tuple[tuple[str | int, ...], str]] = []
    data = _drop_unknown(data, Scenario, (), unknown)
    if strict:
        problems = [_unknown_error(loc, source) for loc, _ in unknown]
    else:
        problems = [
            Problem(source, _field_name(loc), f"unknown key {loc[-1]!r} ignored, nearest known key {near!r}",
                    "fix or remove it; --strict makes this an error", "warning")  # fmt: skip
            for loc, near in unknown
        ]
    try:
        scenario = Scenario.model_validate(data)
    except ValidationError as exc:
        return None, problems + _pydantic_problems(exc, source)
    if strict and unknown:
        return None, problems
    if source != "<dict>":
        scenario._source_path = Path(source)
    scenario._unknown = tuple(_unknown_error(loc, source).line() for loc, _ in unknown)
    return scenario, problems


def check_file(path: str | Path, *, strict: bool = False) -> tuple[Scenario | None, list[Problem]]:
    """Read and validate one scenario file, collecting every problem (see check_data):
    unreadable file or invalid YAML (one problem), repeated keys, then the fields."""
    p = Path(path)
    data, problems = _read_yaml(p)
    if data is _UNREAD:
        return None, problems
    scenario, more = check_data(data, source=str(p), strict=strict)
    return (scenario if not problems else None), problems + more


def _loaded(scenario: Scenario | None, problems: list[Problem]) -> Scenario:
    """What loading gives: each warning as a ScenarioWarning, then the scenario, or the
    first error as a ScenarioError."""
    for problem in problems:
        if problem.severity == "warning":
            warnings.warn(problem.line(), ScenarioWarning, stacklevel=3)
    error = _first_error(problems)
    if error is not None:
        raise error
    assert scenario is not None  # no error: it validated
    return scenario


def scenario_from_dict(data: Any, source: str = "<dict>", *, strict: bool = False) -> Scenario:
    """Validate parsed YAML (or any mapping); errors become one ScenarioError line.

    An unknown key is ignored with a one-line ScenarioWarning naming the nearest known
    key, as Activation Lab ignores it; ``strict=True`` makes it an error. (Every problem
    at once, as data: :func:`actstore.validate_scenario`.)"""
    return _loaded(*check_data(data, source, strict=strict))


def _unknown_error(loc: tuple[str | int, ...], source: str) -> Problem:
    """The error ``strict=True`` gives for an unknown key at ``loc``."""
    _, what, fix = _describe({"loc": loc, "type": "extra_forbidden"})
    return Problem(source, _field_name(loc), what, fix)


def load_scenario(path: str | Path, *, strict: bool = False) -> Scenario:
    """Read and validate one scenario YAML file (``strict``: see scenario_from_dict)."""
    return _loaded(*check_file(path, strict=strict))


def scenario_files(path_or_dir: str | Path) -> list[Path]:
    """The files a path names: itself, or every *.yaml/*.yml directly inside a directory,
    sorted by file name (none: see :func:`no_scenario_files`)."""
    p = Path(path_or_dir)
    if not p.is_dir():
        return [p]
    return sorted(f for f in p.iterdir() if f.is_file() and f.suffix in (".yaml", ".yml"))


def no_scenario_files(directory: str | Path) -> Problem:
    """The problem of a directory without scenario files."""
    return Problem(str(directory), "", "no *.yaml or *.yml scenario files in this directory",
                   "add one or pass a file")  # fmt: skip


def load_scenarios(path_or_dir: str | Path, *, strict: bool = False) -> list[Scenario]:
    """One file, or every *.yaml/*.yml directly inside a directory, sorted by file name."""
    files = scenario_files(path_or_dir)
    if not files:
        raise ScenarioError(no_scenario_files(path_or_dir).line())
    return [load_scenario(f, strict=strict) for f in files]


def layer_problems(scenario: Scenario, num_layers: int, model_id: str | None = None) -> list[Problem]:
    """Every index of capture.layers beyond a model with ``num_layers`` layers (the
    scenario's own model, or ``model_id``)."""
    layers = scenario.capture.layers
    if layers == "all":
        return []
    return [
        Problem(scenario.source, f"capture.layers[{i}]",
                f"layer index {idx} is out of range for {model_id or scenario.model.id} with {num_layers} layers",
                f"use 0..{num_layers - 1} or all")  # fmt: skip
        for i, idx in enumerate(layers)
        if idx >= num_layers
    ]


def check_layers(scenario: Scenario, num_layers: int) -> list[int]:
    """Resolve capture.layers against a model with ``num_layers`` layers."""
    problems = layer_problems(scenario, num_layers)
    if problems:
        raise ScenarioError(problems[0].line())
    return list(range(num_layers)) if scenario.capture.layers == "all" else list(scenario.capture.layers)
