"""actstore: capture every activation of a causal LM into a Zarr store, query it lazily.

>>> import actstore                                               # doctest: +SKIP
>>> scenario = actstore.load_scenario("scenarios/quick.yaml")      # doctest: +SKIP
>>> [result] = actstore.capture_scenario(scenario, "stores/actstore.zarr")  # doctest: +SKIP
>>> run = actstore.open_store("stores/actstore.zarr").run(result.run_id)  # doctest: +SKIP
"""

from __future__ import annotations

TYPE_CHECKING = False  # not typing's: `python -m actstore` imports this first, keep it instant
if TYPE_CHECKING:
    from typing import Any

__version__ = "0.1.0"

__all__ = [
    "__version__", "capture_dataset", "capture_scenario", "dataset_status", "export_hf_dataset", "load_scenario",
    "load_scenarios", "materialize", "open_store", "Problem", "validate_scenario",
]  # fmt: skip


def open_store(location: str, *, create: bool = False, storage_options: dict[str, Any] | None = None) -> Any:
    """Open a store (a local path or an object-storage URL)."""
    from actstore.store.store import ActStore

    return ActStore.open(location, create=create, storage_options=storage_options)


def load_scenario(path: str, *, strict: bool = False) -> Any:
    """One scenario file; ``strict=True``: an unknown key is an error, not a warning."""
    from actstore.scenario import load_scenario as _load

    return _load(path, strict=strict)


def load_scenarios(path: str, *, strict: bool = False) -> Any:
    from actstore.scenario import load_scenarios as _load

    return _load(path, strict=strict)


def capture_scenario(scenario: Any, store: Any = None, *, strict: bool = False, **kwargs: Any) -> Any:
    """Capture a scenario (or a scenario file's path) into a store; see
    actstore.capture.runner.capture. ``strict=True``: a file with an unknown key is refused.

    (Not named ``capture``: that name is the ``actstore.capture`` subpackage, which
    replaces a same-named attribute as soon as anything imports it.)"""
    from actstore.capture.runner import capture as _capture
    from actstore.scenario import Scenario

    if not isinstance(scenario, Scenario):
        scenario = load_scenario(str(scenario), strict=strict)
    return _capture(scenario, store, strict=strict, **kwargs)


def export_hf_dataset(runs: Any, out_dir: str, hooks: Any, context: int, **kwargs: Any) -> Any:
    """Runs as the Hugging Face dataset SAELens trains from (one column per TransformerLens
    hook name, windows of ``context`` tokens); see actstore.store.hf_dataset."""
    from actstore.store.hf_dataset import export_hf_dataset as _export

    return _export(runs, out_dir, hooks, context, **kwargs)


def validate_scenario(path_or_dict: Any, *, strict: bool = False, model: str | bool | None = None) -> Any:
    """Every problem of a scenario file (or parsed mapping) as a list of Problem (file,
    field, message, fix, severity; ``.line()``), not only the first; [] means it loads.
    ``model``: also check layers and context against a model's config and tokenizer
    (True: the scenario's own model). See actstore.scenario_check."""
    from actstore.scenario_check import validate_scenario as _validate

    return _validate(path_or_dict, strict=strict, model=model)


def materialize(store: Any, runs: Any, name: str, source: Any, layers: Any, **kwargs: Any) -> Any:
    """Make (or extend) train layout ``name`` from runs: see actstore.store.materialize.
    ``store``: an opened store or a location; ``runs``: selectors (ids, ``all``...);
    ``source``: one or more per-layer sources; ``layers``: a list or text like ``8,16``."""
    from actstore.store.materialize import materialize as _materialize

    return _materialize(store, [runs] if isinstance(runs, str) else runs, name, source, layers, **kwargs)


def __getattr__(name: str) -> Any:
    # Problem, the class validate_scenario returns, without importing pydantic on `import actstore`
    if name == "Problem":
        from actstore.scenario import Problem

        return Problem
    raise AttributeError(f"module 'actstore' has no attribute {name!r}")


def capture_dataset(input: str, store: Any = None, **kwargs: Any) -> Any:
    """Capture a whole corpus (JSONL, Parquet, text, a saved ``datasets`` dataset) into a
    store, one run per unit of sequences, resumable; see actstore.dataset.capture."""
    from actstore.dataset.capture import capture_dataset as _capture

    return _capture(input, store, **kwargs)


def dataset_status(store: Any, name: str, *, storage_options: dict[str, Any] | None = None) -> Any:
    """Done, pending and orphaned units of a corpus capture (a store or its location)."""
    from actstore.dataset.status import dataset_status as _status

    if isinstance(store, str):
        store = open_store(store, storage_options=storage_options)
    return _status(store, name)
