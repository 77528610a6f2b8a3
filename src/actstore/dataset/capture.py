"""Capture a whole corpus into a store, unit by unit, resumable after a kill.

Data flow::

    corpus (streamed rows) --split into units of --unit-size sequences-->
      each unit not yet committed: tokenize --batch_rows (left-padded batches)-->
      write_unit (RunWriter, rows arrays, metadata) --> catalog entry (the unit's commit)

The dataset's fingerprint (a hash of the input's bytes and the settings) is in every
unit's metadata and catalog entry. Rerunning the same capture skips the committed units
of the same fingerprint and redoes the one a kill interrupted (its leftover group is an
orphan for ``actstore gc``); a different fingerprint under the same name is refused
unless ``force``, which removes the old units first.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import zarr
from tqdm.auto import tqdm

from actstore.capture import budget
from actstore.dataset import status as ds_status
from actstore.dataset.batches import BatchRecorder, ForwardPlan, batch_rows
from actstore.dataset.inputs import Corpus, Row, open_corpus
from actstore.dataset.settings import DatasetError, DatasetSettings, check_dataset_name, parse_positions
from actstore.dataset.tokens import tokenize
from actstore.dataset.units import write_unit
from actstore.errors import SelectionError, StoreError
from actstore.models.architectures import ModelSites, resolve_sites
from actstore.models.loading import LoadedModel, load_model, resolve_dtype
from actstore.scenario import DEFAULT_STORE, ModelConfig
from actstore.store.store import ActStore, check_location


@dataclass
class DatasetResult:
    name: str
    store: str
    n_units: int
    captured: list[int] = field(default_factory=list)  # units this call committed
    skipped: list[int] = field(default_factory=list)  # units already committed before
    n_sequences: int = 0  # over every unit of the dataset
    n_tokens: int = 0
    seconds: float = 0.0


def fingerprint(corpus: Corpus, settings: DatasetSettings) -> str:
    doc = {"input": corpus.fingerprint(), "settings": settings.as_dict()}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:32]


def _model_config(settings: DatasetSettings, device: str) -> ModelConfig:
    """The model to load, checked (a bad dtype or device is one line, before any work)."""
    import pydantic

    try:
        return ModelConfig.model_validate(
            {"id": settings.model, "dtype": settings.model_dtype, "device": device, "gguf_file": settings.gguf_file}
        )
    except pydantic.ValidationError as e:
        err = e.errors()[0]
        option = {"dtype": "--model-dtype", "device": "--device"}.get(str(err["loc"][0]), "--model")
        raise DatasetError(f"{option}: {str(err['msg']).removeprefix('Value error, ')}") from None


def _load(settings: DatasetSettings, device: str) -> LoadedModel:
    return load_model(_model_config(settings, device))


@dataclass(frozen=True)
class _Setup:
    """The model-dependent half of a capture: resolved once, shared by every unit."""

    loaded: LoadedModel
    sites: ModelSites
    layers: list[int]
    sources: set[str]
    plan: ForwardPlan
    limit: int | None


def _setup(loaded: LoadedModel, settings: DatasetSettings) -> _Setup:
    from actstore import naming
    from actstore.capture.runner import _available_sources, _eos_ids
    from actstore.query.layers import choose_layers

    sites = resolve_sites(loaded.model)
    has = f"{loaded.model_id} has layers 0-{sites.num_layers - 1}"
    try:
        choice = choose_layers(settings.layers, range(sites.num_layers))
    except SelectionError as e:
        raise DatasetError(f"{e} ({has})") from None
    if choice.note:  # a query clips a range to what was captured; a capture asks for what exists
        raise DatasetError(f"--layers {settings.layers}: {has}")
    layers = sorted(choice.layers) if choice.layers is not None else list(range(sites.num_layers))
    sources = set(_available_sources(naming.sources_for_flags(settings.flags()), sites))
    tok = loaded.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    plan = ForwardPlan(
        pad_id=int(pad) if pad is not None else 0,
        eos_ids=frozenset(_eos_ids(loaded.model, tok)),
        special_ids=frozenset(tok.all_special_ids) if settings.exclude_special else None,
        positions=parse_positions(settings.positions),
        max_new_tokens=settings.max_new_tokens,
        logits="logits" in sources,
        store_dtype=resolve_dtype(settings.store_dtype),
    )
    limit = budget.context_limit(loaded.model.config)
    if limit is not None:  # the prompt leaves room for the generated tokens that are fed
        limit = max(1, limit - max(0, settings.max_new_tokens - 1))
    if settings.context is not None:
        limit = min(settings.context, limit) if limit is not None else settings.context
    return _Setup(loaded, sites, layers, sources, plan, limit)


def capture_unit(
    store: ActStore,
    setup: _Setup,
    settings: DatasetSettings,
    rows: list[Row],
    *,
    name: str,
    unit: int,
    n_units: int,
    fp: str,
    tokens_before: int = 0,
) -> dict[str, Any]:
    """Capture and commit one unit (its rows are sequences ``unit * unit_size`` on);
    returns its catalog entry."""
    seqs = tokenize(setup.loaded.tokenizer, rows, unit * settings.unit_size, limit=setup.limit,
                    generation_prompt=settings.max_new_tokens > 0)  # fmt: skip
    max_rows = sum(len(s.ids) for s in seqs) + len(seqs) * max(0, settings.max_new_tokens - 1)
    left = None if settings.max_tokens is None else settings.max_tokens - tokens_before
    dataset = {"name": name, "unit": unit, "n_units": n_units, "fingerprint": fp,
               "settings": settings.as_dict(), "first_sequence": unit * settings.unit_size}  # fmt: skip
    rec = BatchRecorder(setup.sites, setup.layers, setup.sources, setup.plan.store_dtype, keep_last=False)
    with rec:
        return write_unit(
            store,
            batch_rows(setup.loaded.model, rec, seqs, settings.batch_size, setup.plan, setup.loaded.device),
            dataset=dataset, loaded=setup.loaded, sites=setup.sites, layers=setup.layers, sources=setup.sources,
            store_dtype=settings.store_dtype, max_rows=max(1, max_rows), max_tokens=left,
        )  # fmt: skip


def capture_dataset(
    input: str,
    store: str | None = None,
    *,
    name: str,
    model: str = "smollm2",
    capture: tuple[str, ...] | list[str] = ("hidden_states",),
    layers: str = "all",
    positions: str = "all",
    exclude_special: bool = False,
    context: int | None = None,
    max_tokens: int | None = None,
    max_new_tokens: int = 0,
    batch_size: int = 8,
    unit_size: int = 64,
    store_dtype: str = "float16",
    model_dtype: str = "float32",
    gguf_file: str | None = None,
    device: str = "auto",
    text_column: str = "text",
    messages_column: str | None = None,
    label_columns: tuple[str, ...] | list[str] = (),
    layout: str = "runs",
    force: bool = False,
    progress: bool | None = None,
    storage_options: dict[str, Any] | None = None,
    loaded: LoadedModel | None = None,
    scheduler: str | None = None,
) -> DatasetResult:
    """Capture every sequence of ``input`` (JSONL, Parquet, .txt, a folder of .txt files,
    or a dataset saved with ``datasets``' ``save_to_disk``) into ``store`` as dataset
    ``name``: one committed run per unit of ``unit_size`` sequences.

    Resumable: rerun the same call after a kill and only the units not committed run.
    Input, options and the dataset name are checked before anything is created or any
    model loads. ``scheduler``: one dask task per pending unit on that cluster.
    ``layout="train"``: each unit's rows go straight into the token-major train layout
    named ``name`` (what ``actstore.torch.ActivationDataset`` reads), not into
    position-major arrays."""
    t0 = time.perf_counter()
    check_dataset_name(name)
    settings = DatasetSettings(
        model=model, capture=tuple(capture), layers=layers, positions=positions, exclude_special=exclude_special,
        context=context, max_tokens=max_tokens, max_new_tokens=max_new_tokens, batch_size=batch_size,
        unit_size=unit_size, store_dtype=store_dtype, model_dtype=model_dtype, gguf_file=gguf_file,
        text_column=text_column, messages_column=messages_column, label_columns=tuple(label_columns), layout=layout,
    )  # fmt: skip
    if scheduler and max_tokens is not None:
        raise DatasetError("--max-tokens needs the units in order; leave out --scheduler (or --max-tokens)")
    _model_config(settings, device)
    corpus = open_corpus(input, text_column=text_column, messages_column=messages_column,
                         label_columns=tuple(label_columns))  # fmt: skip
    location = store or DEFAULT_STORE
    check_location(location, create=True)
    fp = fingerprint(corpus, settings)
    n_units = -(-corpus.n_rows // unit_size)
    existing = _existing_units(location, name, storage_options)
    others = [e for e in existing if e["dataset"].get("fingerprint") != fp]
    if others and not force:
        raise DatasetError(
            f"dataset {name!r} in {location} was captured from other input or settings "
            f"({len(existing)} units); rerun with --force to recapture it (its units are replaced), "
            "or pick another --name"
        )
    done = {} if force else {e["dataset"]["unit"]: e for e in existing}
    result = DatasetResult(name, location, n_units)
    stop_at = ds_status.planned_units(list(done.values())) if done else n_units
    if not force and all(u in done for u in range(stop_at)):
        return _finish(result, list(done.values()), sorted(done), t0)
    if loaded is None and not scheduler:
        loaded = _load(settings, device)
    setup = _setup(loaded, settings) if loaded is not None else None  # layers checked before the store is made
    st = ActStore.open(location, create=True, storage_options=storage_options)
    if force and existing:
        ds_status.remove_units(st, existing)
    if force:  # a train layout of the old capture goes too: its segments are the old units'
        ds_status.remove_layout(st, name)
    if scheduler:
        from actstore.dataset.cluster import capture_units_on_cluster

        on_cluster = capture_units_on_cluster(st, corpus, settings, name=name, n_units=n_units, fp=fp, done=done,
                                           address=scheduler, storage_options=storage_options,
                                           device=device, progress=progress)  # fmt: skip
        captured = [e["dataset"]["unit"] for e in on_cluster]
        return _finish(result, [*done.values(), *on_cluster], sorted(done), t0, captured)
    assert setup is not None
    show = sys.stderr.isatty() if progress is None else progress
    rows = corpus.rows()
    entries: list[dict[str, Any]] = []
    tokens_before = 0
    with tqdm(total=n_units, desc=f"capture {name}", unit="unit", disable=not show, file=sys.stderr) as bar:
        for unit in range(n_units):
            unit_rows = list(itertools.islice(rows, unit_size))
            if unit in done:
                entry = done[unit]
            else:
                entry = capture_unit(st, setup, settings, unit_rows, name=name, unit=unit, n_units=n_units,
                                     fp=fp, tokens_before=tokens_before)  # fmt: skip
                entries.append(entry)
            bar.update()
            tokens_before += int(entry["n_positions"])
            if entry["dataset"].get("budget_reached"):
                break
    return _finish(result, [*done.values(), *entries], sorted(done), t0, [e["dataset"]["unit"] for e in entries])


def _existing_units(location: str, name: str, storage_options: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The committed units of ``name`` (none when there is no store yet: nothing is created)."""
    from pathlib import Path

    if "://" not in location and not Path(location).exists():
        return []
    try:
        st = ActStore.open(location, storage_options=storage_options)
    except StoreError as e:
        if isinstance(e.__cause__, FileNotFoundError | zarr.errors.GroupNotFoundError):  # no store at the URL yet
            return []
        raise
    return ds_status.unit_entries(st.catalog_entries(), name)


def _finish(
    result: DatasetResult, units: list[dict[str, Any]], skipped: list[int], t0: float,
    captured: list[int] | None = None,
) -> DatasetResult:  # fmt: skip
    result.skipped, result.captured = skipped, captured or []
    result.n_sequences = sum(int(e["dataset"].get("n_sequences", 0)) for e in units)
    result.n_tokens = sum(int(e.get("n_positions", 0)) for e in units)
    if units:
        result.n_units = ds_status.planned_units(units)
    result.seconds = time.perf_counter() - t0
    return result
