"""Scenario files: the seed's YAML format, validated, with every default in one place.

A scenario says which model to load, which conversation to feed it, how to generate and
what to capture. This module parses YAML into frozen pydantic models and collects every
validation failure as a :class:`Problem` at its field (``check_file``, ``check_data``:
what ``actstore validate`` prints; the wording lives in :mod:`actstore.scenario_problems`,
YAML reading in :mod:`actstore.scenario_yaml`); loading raises the first as one
``ScenarioError`` line: ``<file>: <field.path>: <what> (<fix>)``.
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
from pathlib import Path
from typing import Annotated, Any, Literal

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
from actstore.scenario_problems import (
    Invalid,
    Problem,
    describe_error,
    field_name,
    first_error,
    pydantic_problems,
    show_value,
    submodel,
)
from actstore.scenario_yaml import UNREAD, read_yaml

__all__ = [
    "DEFAULT_STORE", "CaptureConfig", "GenerationConfig", "Message", "ModelConfig", "OutputConfig", "Problem",
    "PromptConfig", "ReferenceState", "Scenario", "check_data", "check_file", "check_layers", "layer_problems",
    "load_scenario", "load_scenarios", "no_scenario_files", "scenario_files", "scenario_from_dict",
]  # fmt: skip

DEFAULT_STORE = "stores/actstore.zarr"  # used when output.store is null; relative to the cwd

Dtype = Literal["float16", "bfloat16", "float32"]
Role = Literal["system", "user", "assistant"]

_DEVICE = re.compile(r"^(auto|cuda|mps|cpu|cuda:\d+)$")




def _check_safe_name(value: str, kind: str, example: str) -> str:
    # Names and labels become run ids and file names: the one rule import also applies.
    problem = naming.name_problem(value, example=example)
    if problem is None:
        return value
    raise Invalid(f"{kind} {naming.show_name(value)} {problem[0]}", problem[1])


def _parse_layers(value: Any) -> Any:
    """Accept "all" or a list of unique non-negative ints; store the list sorted."""
    if value == "all":
        return value
    if not isinstance(value, list):
        raise Invalid(
            f'expected "all" or a list of layer indices, got {show_value(value)}', "write all or e.g. [0, 5, 10]"
        )
    seen: set[int] = set()
    for i, idx in enumerate(value):
        if not isinstance(idx, int) or isinstance(idx, bool):
            raise Invalid(f"expected a layer index, got {show_value(idx)}", "write a whole number", (i,))
        if idx < 0:
            raise Invalid(f"layer index {idx} is negative", "layer indices count from 0", (i,))
        if idx in seen:
            raise Invalid(f"layer index {idx} is listed twice", "list each layer once", (i,))
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
            raise Invalid(f"unknown device {v!r}", "use one of auto, cuda, cuda:N, mps, cpu")
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
            found.append(Invalid(f"must be > 0 when do_sample is true, got {show_value(self.temperature)}",
                                  f"use a value > 0, {fix}", ("temperature",)))  # fmt: skip
        if self.top_k is not None and self.top_k < 1:
            found.append(Invalid(f"must be >= 1 when do_sample is true, got {self.top_k}",
                                  f"use a value >= 1 or null, {fix}", ("top_k",)))  # fmt: skip
        if self.top_p is not None and not 0 < self.top_p <= 1:
            found.append(Invalid(f"must be > 0 and <= 1 when do_sample is true, got {show_value(self.top_p)}",
                                  f"use a value in (0, 1] or null, {fix}", ("top_p",)))  # fmt: skip
        Invalid.raise_all(found)
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
                raise Invalid(
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
        sub = submodel(field.annotation)
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
        got = "an empty file" if data is None else show_value(data)
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
            Problem(source, field_name(loc), f"unknown key {loc[-1]!r} ignored, nearest known key {near!r}",
                    "fix or remove it; --strict makes this an error", "warning")  # fmt: skip
            for loc, near in unknown
        ]
    try:
        scenario = Scenario.model_validate(data)
    except ValidationError as exc:
        return None, problems + pydantic_problems(exc, source, Scenario)
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
    data, problems = read_yaml(p)
    if data is UNREAD:
        return None, problems
    scenario, more = check_data(data, source=str(p), strict=strict)
    return (scenario if not problems else None), problems + more


def _loaded(scenario: Scenario | None, problems: list[Problem]) -> Scenario:
    """What loading gives: each warning as a ScenarioWarning, then the scenario, or the
    first error as a ScenarioError."""
    for problem in problems:
        if problem.severity == "warning":
            warnings.warn(problem.line(), ScenarioWarning, stacklevel=3)
    error = first_error(problems)
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
    _, what, fix = describe_error({"loc": loc, "type": "extra_forbidden"}, Scenario)
    return Problem(source, field_name(loc), what, fix)


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
