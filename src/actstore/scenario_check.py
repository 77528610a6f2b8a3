"""Every problem of a scenario at once, each at its field, without running anything.

``load_scenario`` stops at the first error; :func:`validate_scenario` returns them all as
:class:`~actstore.scenario.Problem` values (file, field, message, fix, severity): what
``actstore validate`` prints, and what a scenario editor shows beside each field. Both
read the same list (:func:`actstore.scenario.check_file`), so a scenario loads exactly
when it has no error here.

With ``model``, the checks capture makes against the model run too, on the model's
config and tokenizer only (never its weights, never a download): ``capture.layers``
against its layer count, and each prompt (plus ``generation.max_new_tokens``) and each
reference against its context. The memory check needs the model's sizes and the
machine it will run on, so it stays with capture.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from actstore.errors import ModelLoadError
from actstore.scenario import (
    ModelConfig,
    Problem,
    Scenario,
    check_data,
    check_file,
    layer_problems,
    no_scenario_files,
    scenario_files,
)

__all__ = ["Problem", "model_problems", "validate_files", "validate_scenario"]

_MODEL_FIX = "give a built-in name (smollm2), a local model folder, or a hub id in the local HF cache"


def validate_scenario(
    path_or_dict: str | Path | Mapping[str, Any], *, strict: bool = False, model: str | bool | None = None
) -> list[Problem]:
    """Every problem of one scenario file (or parsed mapping), in file order; [] means it
    loads. An unknown key is a warning (ignored on load) unless ``strict``.

    ``model``: also check the scenario against a model (see :func:`model_problems`):
    ``True`` for the scenario's own ``model``, or a model id or path as ``model.id``
    would be. Those checks run once the scenario itself has no error."""
    return _validate(path_or_dict, strict, model, _ModelReader())


def validate_files(
    paths: Iterable[str | Path], *, strict: bool = False, model: str | bool | None = None
) -> dict[str, list[Problem]]:
    """:func:`validate_scenario` on each file, a directory meaning its *.yaml/*.yml files
    (as ``load_scenarios`` reads it): {file: its problems}, in order, [] for a good file.
    Each model's config and tokenizer are read once for all files."""
    reader = _ModelReader()
    out: dict[str, list[Problem]] = {}
    for path in paths:
        files = scenario_files(path)
        if not files:
            out[str(path)] = [no_scenario_files(path)]
        for f in files:
            out[str(f)] = _validate(f, strict, model, reader)
    return out


def model_problems(scenario: Scenario, model: str | bool = True) -> list[Problem]:
    """What capture would refuse about ``scenario`` on ``model`` (True: its own), read
    from the model's config and tokenizer: a layer index beyond the model's layers, a
    prompt or reference longer than its context. A model that cannot be found locally
    is one problem on ``model.id``."""
    return _ModelReader().problems(scenario, model)


def _validate(
    path_or_dict: str | Path | Mapping[str, Any], strict: bool, model: str | bool | None, reader: _ModelReader
) -> list[Problem]:
    if isinstance(path_or_dict, Mapping):
        scenario, problems = check_data(dict(path_or_dict), strict=strict)
    else:
        scenario, problems = check_file(path_or_dict, strict=strict)
    if model and scenario is not None:
        problems += reader.problems(scenario, model)
    return problems


class _ModelReader:
    """Reads each model's config and tokenizer once (per validation call, so a
    long-lived caller sees a changed model folder next time)."""

    def __init__(self) -> None:
        self._configs: dict[tuple[Any, ...], Any] = {}
        self._tokenizers: dict[tuple[Any, ...], Any] = {}

    def problems(self, scenario: Scenario, model: str | bool) -> list[Problem]:
        from actstore.capture import budget
        from actstore.capture.prompts import render_ids
        from actstore.models.loading import load_config, load_tokenizer

        cfg = _model_config(scenario, model)

        def unreadable(what: str, exc: ModelLoadError) -> list[Problem]:
            return [Problem(scenario.source, "model.id", f"cannot read the {what} of model {cfg.id!r}: {exc}",
                            _MODEL_FIX)]  # fmt: skip

        try:
            config = _cached(self._configs, cfg, load_config)
        except ModelLoadError as exc:
            return unreadable("config", exc)
        n_layers = _num_layers(config)
        problems = layer_problems(scenario, n_layers, cfg.id) if n_layers else []
        limit = budget.context_limit(config)
        if limit is None:
            return problems
        try:
            tokenizer = _cached(self._tokenizers, cfg, load_tokenizer)
        except ModelLoadError as exc:
            return problems + unreadable("tokenizer", exc)
        ref_lens = [len(render_ids(tokenizer, r.messages)) for r in scenario.reference_states]
        for i, sub in enumerate(scenario.prompt_scenarios()):
            prompt_len = len(render_ids(tokenizer, sub.single_prompt.messages))
            # the references are one set per file: report them once, with the first prompt
            problems += budget.context_problems(sub, cfg.id, limit, prompt_len, ref_lens if i == 0 else [])
        return problems


def _model_config(scenario: Scenario, model: str | bool) -> ModelConfig:
    """The scenario's model section, or another model id in its place (without the
    scenario's gguf_file, which names a file of its own model)."""
    if model is True or model == scenario.model.id:
        return scenario.model
    return scenario.model.model_copy(update={"id": str(model), "gguf_file": None})


def _cached(cache: dict[tuple[Any, ...], Any], cfg: ModelConfig, load: Any) -> Any:
    key = (cfg.id, cfg.gguf_file, cfg.trust_remote_code)  # what finds the files (not dtype, device)
    if key not in cache:
        cache[key] = load(cfg)
    return cache[key]


def _num_layers(config: Any) -> int | None:
    """The number of transformer layers a model config declares (None: it does not say)."""
    for cfg in (config, getattr(config, "text_config", None)):
        n = getattr(cfg, "num_hidden_layers", None) if cfg is not None else None
        if isinstance(n, int) and n > 0:
            return n
    return None
