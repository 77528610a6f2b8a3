"""Capture a scenario into a store: prefill, decode, snapshots, references, commit.

Data flow for one run::

    scenario --render--> prompt ids --prefill (hooks: step mode)--> writer queue
                                    \\--snapshots: slices of the prefill KV cache (hooks: full mode)
    decode loop: one token per pass (hooks: step mode) --> writer queue
             conversation + reply as an assistant turn --slice of the decode cache--> generated snapshot
             references: slices of the prompt's or an earlier reference's cache (hooks: full mode)
    writer.finish -> tokens, full passes, snapshot and reference stacks, metadata -> catalog entry (commit)

The model runs with a KV cache, so every position is computed exactly once and lands
in position-major arrays; a snapshot or reference pass stores only the positions it does
not share with the run or an earlier pass (store/passes.py). The run becomes visible
only at the final commit.
"""

from __future__ import annotations

import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from actstore import naming
from actstore.capture import budget, prefixes, sampling
from actstore.capture.hooks import Key, Recorder
from actstore.capture.pass_log import PassLog
from actstore.capture.prompts import as_dicts, render_ids
from actstore.capture.provenance import provenance
from actstore.errors import StoreError
from actstore.models.architectures import ModelSites, resolve_sites
from actstore.models.loading import LoadedModel, load_model, resolve_dtype
from actstore.paths import describe, user_error_in
from actstore.scenario import DEFAULT_STORE, Scenario, check_layers
from actstore.store import layout
from actstore.store.store import ActStore, catalog_entry, check_location
from actstore.store.writer import (
    ArrayPlan,
    RunWriter,
    to_numpy,
    write_rows,
    write_run_meta,
    write_small_array,
)


@dataclass(frozen=True)
class CaptureResult:
    run_id: str
    store: str
    n_steps: int
    n_positions: int
    generated_text: str
    seconds: float


def attn_implementation(scenario: Scenario) -> str | None:
    """Eager attention only when weights are captured; otherwise the fast kernel."""
    return "eager" if scenario.capture.attention_weights else None


@dataclass
class SharedReferences:
    """The reference states of one scenario file, computed by its first run (one forward
    pass per reference per file, not per run). Every run keeps the last-token stacks;
    the full passes are stored once, in ``run_id``, which the later runs name."""

    states: list[dict[Key, torch.Tensor]] | None = None
    run_id: str | None = None


def capture(
    scenario: Scenario,
    store: ActStore | str | None = None,
    *,
    loaded: LoadedModel | None = None,
    progress: bool | None = None,
    storage_options: dict[str, Any] | None = None,
    force: bool = False,
    strict: bool = False,
) -> list[CaptureResult]:
    """Capture every run of a scenario, in order: one per prompt of the file (Activation
    Lab's prompt list), or one per message prefix of a prompt with run_at_each_message.
    The runs share one scenario-run id and one capture of the references.

    A store given by location is created only once the model has loaded and the scenario
    fits it: its layers, the model's context and the machine's memory (``force=True``
    skips the memory check). A capture that cannot start leaves nothing behind.
    ``strict=True`` refuses a scenario whose file had unknown keys."""
    if strict:
        scenario.check_strict()
    location = None if isinstance(store, ActStore) else store or scenario.output.store or DEFAULT_STORE
    if location is not None:
        check_location(location, create=True)  # cheap: fail before the model loads
    if loaded is None:
        loaded = load_model(scenario.model, attn_implementation=attn_implementation(scenario))
    for sub in scenario.prompt_scenarios():  # each full conversation is its prompt's longest run
        preflight(sub, loaded, force=force)
    new_folder = None
    if not isinstance(store, ActStore):
        loc = location or DEFAULT_STORE
        new_folder = None if "://" in loc or Path(loc).exists() else Path(loc)
        store = ActStore.open(loc, create=True, storage_options=storage_options)
    scenario_run, refs = store.new_run_id(scenario.name), SharedReferences()
    try:
        return [
            capture_run(
                sub, store, loaded, progress=progress, force=force, scenario_run=scenario_run, references=refs
            )  # fmt: skip
            for sub in scenario.runs()
        ]
    except BaseException:
        if new_folder is not None:
            _remove_if_unused(new_folder)  # the store this capture made holds nothing: no trace
        raise


def _remove_if_unused(folder: Path) -> None:
    """Remove a store folder this capture created if no run was committed into it and
    no other writer has a run group in it (best effort, like discard)."""
    try:
        runs, catalog = folder / naming.RUNS_PREFIX, folder / naming.CATALOG_PREFIX
        if (catalog.is_dir() and any(catalog.iterdir())) or (
            runs.is_dir() and any(p.is_dir() for p in runs.iterdir())
        ):
            return
        shutil.rmtree(folder, ignore_errors=True)
    except OSError:
        pass


@dataclass(frozen=True)
class _Plan:
    layers: list[int]
    sources: set[str]
    prompt_ids: list[int]
    ref_ids: list[list[int]]
    limit: int | None


def _check(scenario: Scenario, loaded: LoadedModel, sites: ModelSites, force: bool) -> _Plan:
    """Render the prompt (once) and the references; check context and memory."""
    layers = check_layers(scenario, sites.num_layers)
    sources = set(_available_sources(naming.sources_for_flags(scenario.capture.flags()), sites))
    prompt_ids = render_ids(loaded.tokenizer, as_dicts(scenario.single_prompt.messages))
    ref_ids = [render_ids(loaded.tokenizer, r.messages) for r in scenario.reference_states]
    limit = budget.context_limit(loaded.model.config)
    budget.check_context(scenario, loaded.model_id, limit, len(prompt_ids), [len(r) for r in ref_ids])
    store_bytes = torch.empty((), dtype=resolve_dtype(scenario.capture.store_dtype)).element_size()
    need = budget.estimate(sites, len(layers), sorted(sources), len(prompt_ids), store_bytes,
                           eager=attn_implementation(scenario) == "eager")  # fmt: skip
    budget.check_memory(scenario, need, budget.available_memory(loaded.device), force)
    return _Plan(layers, sources, prompt_ids, ref_ids, limit)


def preflight(scenario: Scenario, loaded: LoadedModel, *, force: bool = False) -> None:
    """Fail with one line, before anything is created, if ``scenario`` cannot fit: too many
    tokens for the model's context, or (unless ``force``) more memory than is available."""
    _check(scenario, loaded, resolve_sites(loaded.model), force)


def _snapshot_ids(
    scenario: Scenario, loaded: LoadedModel, messages: list[dict[str, str]], limit: int | None, show: bool
) -> list[list[int]]:
    """Token ids of every conversation prefix, each checked against the context, with a
    progress bar: each prefix goes through the chat template again (quadratic in messages)."""
    out = []
    for k in tqdm(range(len(messages)), desc=f"render {scenario.name} prefixes", unit="msg",
                  disable=not show or len(messages) < 2, file=sys.stderr, leave=False):  # fmt: skip
        ids = render_ids(loaded.tokenizer, messages[: k + 1])
        budget.check_prefix(scenario, loaded.model_id, limit, k, len(ids))
        out.append(ids)
    return out


def _reply_snapshot_ids(
    scenario: Scenario, loaded: LoadedModel, messages: list[dict[str, str]], text: str, limit: int | None
) -> list[int] | None:
    """Token ids of the conversation with the generated reply as an assistant turn, or
    None (with a warning) when its end-of-turn and generation prompt overflow the context:
    the run is kept without that snapshot rather than lost after decoding."""
    ids = render_ids(loaded.tokenizer, [*messages, {"role": "assistant", "content": text}])
    if limit is not None and len(ids) > limit:
        warnings.warn(
            f"{scenario.name}: the conversation with the generated reply is {len(ids)} tokens, but "
            f"{loaded.model_id} handles {limit}; the run has no generated-reply snapshot",
            stacklevel=2,
        )
        return None
    return ids


def _ensure_attention(loaded: LoadedModel, scenario: Scenario) -> None:
    wanted = attn_implementation(scenario)
    current = getattr(loaded.model.config, "_attn_implementation", None)
    if wanted == "eager" and current != "eager":
        loaded.model.set_attn_implementation("eager")


def _progress_enabled(progress: bool | None) -> bool:
    return sys.stderr.isatty() if progress is None else progress


@torch.inference_mode()
def capture_run(
    scenario: Scenario,
    store: ActStore,
    loaded: LoadedModel,
    *,
    progress: bool | None = None,
    force: bool = False,
    scenario_run: str | None = None,
    references: SharedReferences | None = None,
) -> CaptureResult:
    """One prefill + decode loop with capture, committed as one run. Checks the prompt
    against the context and memory first (see :func:`preflight`).

    ``scenario_run``: the id shared by the runs of one scenario file (default: this
    run's own id). ``references``: reused when already computed, else filled."""
    t0 = time.perf_counter()
    _ensure_attention(loaded, scenario)
    model, tok, device = loaded.model, loaded.tokenizer, loaded.device
    sites = resolve_sites(model)
    plan = _check(scenario, loaded, sites, force)
    layers, sources, prompt_ids, ref_ids = plan.layers, plan.sources, plan.prompt_ids, plan.ref_ids
    cap, gen = scenario.capture, scenario.generation
    store_dtype = resolve_dtype(cap.store_dtype)

    messages = as_dicts(scenario.single_prompt.messages)
    snapshot_ids = _snapshot_ids(scenario, loaded, messages, plan.limit, _progress_enabled(progress))
    n_max = len(prompt_ids) + gen.max_new_tokens - 1
    eos = _eos_ids(model, tok)
    generator = sampling.make_generator(gen.seed)
    log = PassLog()
    logits_dtype = store_dtype if "logits" in sources else None

    run_id = store.new_run_id(scenario.name)
    shared_refs = references.states if references is not None else None
    writer: RunWriter | None = None
    bar = tqdm(
        total=gen.max_new_tokens + len(snapshot_ids) + 1 + (len(ref_ids) if shared_refs is None else 0),
        desc=f"capture {scenario.name}",
        unit="pass",
        disable=not _progress_enabled(progress),
        file=sys.stderr,
    )
    try:
        group = store.create_run_group(run_id)  # inside: an interrupt right after it still discards it
        with Recorder(sites, layers, sources, store_dtype) as rec:
            steps: list[dict[str, Any]] = []
            ids = prompt_ids
            position = 0
            cache: Any = None
            for step in range(gen.max_new_tokens):
                rec.mode = "step"
                out = prefixes.forward(
                    model,
                    torch.tensor([ids], device=device),
                    cache=cache,
                    last_logits_only="logits" not in sources,
                )
                rec.mode = None
                tensors = rec.take()
                logits = out.logits[0]
                if "logits" in sources:
                    tensors[("logits", None)] = logits.to(store_dtype)
                if writer is None:
                    writer = RunWriter(group, _plans(tensors, sources, layers, n_max, cap.store_dtype))
                writer.submit(position, tensors)
                cache = prefixes.cache_of(out)
                choice = sampling.choose(
                    logits[-1],
                    do_sample=gen.do_sample,
                    temperature=gen.temperature,
                    top_k=gen.top_k,
                    top_p=gen.top_p,
                    generator=generator,
                    n_top=cap.top_k_probs,
                )
                steps.append(
                    sampling.step_record(step, ids, choice, tok, range(position, position + len(ids)))
                )
                position += len(ids)
                bar.update()
                if step == 0:
                    # Snapshots reuse this prefill's KV cache before decoding extends it.
                    main = prefixes.Base(prompt_ids, cache)
                    snap_states = []
                    for k, (snap, done) in enumerate(
                        zip(
                            snapshot_ids,
                            prefixes.base_passes(model, rec, snapshot_ids, main, device, logits_dtype),
                            strict=True,
                        )
                    ):
                        log.add("snapshot", k, snap, done)
                        snap_states.append(_covered_last(done, tensors, len(snap)))
                        bar.update()
                if choice.token_id in eos or step == gen.max_new_tokens - 1:
                    break
                ids = [choice.token_id]
            generated = [s["generated_token_id"] for s in steps]
            text = tok.decode(generated, skip_special_tokens=True)
            # Activation Lab's last snapshot: the reply appended as an assistant turn. Its
            # prefix is what decoding fed, so the cache now covers most of it.
            reply_ids = _reply_snapshot_ids(scenario, loaded, messages, text, plan.limit)
            if reply_ids is not None:
                fed = (prompt_ids + generated)[:position]
                done = prefixes.full_pass(
                    model, rec, reply_ids, [prefixes.Base(fed, cache)], device, logits_dtype
                )
                log.add("snapshot", len(messages), reply_ids, done)
                snap_states.append(done.last)
                bar.update()
            # Every pass's length is known now: write the passes from here on, while the
            # references run and the main writer drains.
            own_refs = ref_ids if shared_refs is None else []
            log.start(
                group,
                lambda own, rows, width: _plans(own, sources, layers, rows, cap.store_dtype, attn_cols=width),
                width=max(len(ids) for ids in [*snapshot_ids, reply_ids or [], *own_refs]),
                max_rows=log.rows + sum(len(ids) for ids in own_refs),
            )
            if shared_refs is None:
                labels = [r.label for r in scenario.reference_states]
                ref_states = _reference_passes(
                    model, rec, prompt_ids, cache, dict(zip(labels, ref_ids, strict=True)), device, log,
                    logits_dtype, bar.update,
                )  # fmt: skip
            else:
                ref_states = shared_refs
        assert writer is not None
        writer.finish(position)
        _write_tokens(group, prompt_ids, generated, position)
        snapshot_meta = [
            {"index": k, "role": m["role"], "content_preview": m["content"][:80], "generated": False}
            for k, m in enumerate(messages)
        ]
        if reply_ids is not None:
            snapshot_meta.append(
                {"index": len(messages), "role": "assistant", "content_preview": text[:80], "generated": True}
            )
        _write_stacked(group, naming.SNAPSHOTS_GROUP, snap_states, layers, cap.store_dtype, store_dtype)
        _write_stacked(group, naming.REFERENCES_GROUP, ref_states, layers, cap.store_dtype, store_dtype)
        pass_records = log.finish()
        meta = _run_meta(
            scenario, loaded, sites, layers, sources, prompt_ids, position, steps, text, snapshot_meta
        )
        meta["scenario_run"] = scenario_run or run_id
        meta["prompt_index"] = scenario.prompt_index
        prefix = scenario.message_prefix
        meta["message_prefix"] = list(prefix) if prefix is not None else None
        # How the snapshots' tokens the prompt does not hold are spelled (the reply's, as
        # re-rendered): an NPZ export writes every snapshot's tokens as text.
        extra = sorted({t for ids in [*snapshot_ids, reply_ids or []] for t in ids} - set(prompt_ids))
        meta["token_strings"] = dict(zip(map(str, extra), tok.convert_ids_to_tokens(extra), strict=True))
        meta["passes"] = pass_records
        if shared_refs is not None and ref_ids:
            meta["references_run"] = references.run_id  # type: ignore[union-attr]
        store.commit(run_id, catalog_entry(write_run_meta(group, meta), run_id))
        if references is not None and references.states is None:
            references.states, references.run_id = ref_states, run_id  # only once committed
    except BaseException as e:
        if writer is not None:
            writer.abort()
        log.abort()
        store.discard(run_id)
        cause = user_error_in(e)  # full disk, read-only store: the user's to fix
        if cause is not None:
            raise StoreError(f"{describe(cause, '--store', store.location)}; nothing was committed") from e
        raise
    finally:
        bar.close()
    return CaptureResult(run_id, store.location, len(steps), position, text, time.perf_counter() - t0)


def _covered_last(done: prefixes.Pass, prefill: dict[Key, torch.Tensor], n: int) -> dict[Key, torch.Tensor]:
    """A snapshot's last-token vectors. For one the prompt holds whole, its full pass is
    the prefill's first ``n`` positions: take them from there (when the prefill kept
    those sources), so the stack equals the full pass's last row bit for bit rather than
    within a one-token pass's float rounding."""
    if not done.covered or not set(done.last) <= set(prefill):
        return done.last
    return {key: prefill[key][n - 1].float() for key in done.last}


def _reference_passes(
    model: Any, rec: Recorder, prompt_ids: list[int], cache: Any, refs: dict[str, list[int]],
    device: torch.device, log: PassLog, logits_dtype: torch.dtype | None, on_done: Any,
) -> list[dict[Key, torch.Tensor]]:  # fmt: skip
    """Full passes of the references into ``log``, in order; returns their last-token
    states. Each is seeded by the prompt's cache or the earlier reference it shares most
    with (they share their system preamble). A reference that seeds another runs on its
    own, to keep its cache; the others are packed per seed (prefixes.base_passes)."""
    labels, seqs = list(refs), list(refs.values())
    prompt = prefixes.Base(prompt_ids, cache)
    # seed[k]: 0 the prompt, j + 1 reference j, None nothing shared
    seed = [prefixes.best_base_index(ids, [prompt_ids, *seqs[:k]]) for k, ids in enumerate(seqs)]
    seeds: dict[int, prefixes.Base] = {0: prompt}
    done: dict[int, prefixes.Pass] = {}
    leaves: dict[int, list[int]] = {}
    for k, ids in enumerate(seqs):
        s = seed[k]
        if s is not None and k + 1 not in seed:
            leaves.setdefault(s, []).append(k)
            continue
        done[k] = prefixes.full_pass(
            model, rec, ids, [seeds[s]] if s is not None else [], device, logits_dtype
        )
        seeds[k + 1] = prefixes.Base(ids, done[k].cache)
        on_done()
    for s, ks in leaves.items():
        for k, result in zip(
            ks,
            prefixes.base_passes(model, rec, [seqs[k] for k in ks], seeds[s], device, logits_dtype),
            strict=True,
        ):
            done[k] = result
            on_done()
    for k in range(len(seqs)):
        added = log.add("reference", labels[k], seqs[k], done[k])
        if k + 1 in seeds:
            seeds[k + 1].index = added.index  # the store index later references name as base
    return [done[k].last for k in range(len(seqs))]


def _available_sources(wanted: tuple[str, ...], sites: ModelSites) -> list[str]:
    """Drop what the architecture lacks (a plain MLP has no gate)."""
    has_gate = any(ls.gate is not None or ls.gate_up is not None for ls in sites.layers)
    return [s for s in wanted if not (s == "mlp_gate" and not has_gate)]


def _eos_ids(model: Any, tok: Any) -> set[int]:
    ids: set[int] = set()
    for value in (getattr(model.generation_config, "eos_token_id", None), tok.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(int(v) for v in value)
    return ids


def _plans(
    tensors: dict[Key, Any],
    sources: set[str],
    layers: list[int],
    n_max: int,
    store_dtype: str,
    attn_cols: int | None = None,
) -> list[ArrayPlan]:
    """Array plans from the first pass's tensors (their widths are the truth). With
    ``attn_cols``, attention rows are pass rows of that many columns (store/passes.py)."""
    dtype = layout.physical_dtype(store_dtype)
    attrs: dict[str, Any] = {"actstore_dtype": store_dtype}
    plans = []
    if "hidden_in" in sources:
        bounds = layout.residual_boundaries(layers)
        keys = tuple(("residual", b) for b in bounds)
        width = tensors[keys[0]].shape[-1]
        spec = layout.vector_spec(naming.RESIDUAL_ARRAY, len(bounds), n_max, width, dtype)
        plans.append(ArrayPlan(naming.RESIDUAL_ARRAY, spec, keys, {**attrs, "boundaries": bounds}))
    for source in naming.LAYER_SOURCES:
        if source not in sources or source in ("hidden_in", "hidden_out", "mlp_down_in"):
            continue
        keys = tuple((source, layer) for layer in layers)
        first = tensors[keys[0]]
        if source == "attn_weights":
            spec = layout.attn_spec(len(layers), first.shape[0], n_max, dtype, cols=attn_cols)
        else:
            spec = layout.vector_spec(source, len(layers), n_max, first.shape[-1], dtype)
        plans.append(ArrayPlan(source, spec, keys, {**attrs, "layers": layers}))
    for source in naming.GLOBAL_SOURCES:
        if source in sources:
            width = tensors[(source, None)].shape[-1]
            spec = layout.vector_spec(source, None, n_max, width, dtype)
            plans.append(ArrayPlan(source, spec, ((source, None),), attrs))
    return plans


def _write_tokens(group: Any, prompt_ids: list[int], generated: list[int], n_positions: int) -> None:
    fed = (prompt_ids + generated)[:n_positions]
    steps = [0] * len(prompt_ids) + list(range(1, n_positions - len(prompt_ids) + 1))
    write_small_array(group, naming.TOKENS_ARRAY, np.asarray(fed, dtype=np.int64))
    write_small_array(group, naming.POSITION_STEP_ARRAY, np.asarray(steps, dtype=np.int32))


def _write_stacked(
    group: Any,
    where: str,
    states: list[dict[Key, torch.Tensor]],
    layers: list[int],
    store_dtype: str,
    torch_dtype: torch.dtype,
) -> None:
    """(rows, L, H) arrays per residual source: one row per snapshot or reference."""
    if not states:
        return
    for source in naming.RESIDUAL_SOURCES:
        rows = []
        for st in states:
            if source == "hidden_in":
                vecs = [st[("residual", layer)] for layer in layers]
            elif source == "hidden_out":
                vecs = [st[("residual", layer + 1)] for layer in layers]
            else:
                vecs = [st[(source, layer)] for layer in layers]
            rows.append(to_numpy(torch.stack(vecs).to(torch_dtype)))
        write_rows(group, f"{where}/{source}", np.stack(rows), store_dtype, layers)


def _run_meta(
    scenario: Scenario,
    loaded: LoadedModel,
    sites: ModelSites,
    layers: list[int],
    sources: set[str],
    prompt_ids: list[int],
    n_positions: int,
    steps: list[dict[str, Any]],
    text: str,
    snapshot_meta: list[dict[str, Any]],
) -> dict[str, Any]:
    tok = loaded.tokenizer
    served = [s for s in naming.ALL_SOURCES if s in sources]
    return {
        "scenario": scenario.expanded(),
        **provenance(loaded, sites),
        "prompt_token_ids": prompt_ids,
        "prompt_tokens": tok.convert_ids_to_tokens(prompt_ids),
        "prompt_len": len(prompt_ids),
        "n_positions": n_positions,
        "layers": layers,
        "sources": served,
        "residual_boundaries": layout.residual_boundaries(layers) if "hidden_in" in sources else [],
        "gated_mlp": sites.gated_mlp,
        "store_dtype": scenario.capture.store_dtype,
        "steps": steps,
        "generated_token_ids": [s["generated_token_id"] for s in steps],
        "generated_text": text,
        "snapshots": snapshot_meta,
        "references": [r.label for r in scenario.reference_states],
    }
