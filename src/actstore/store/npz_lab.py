"""Activation Lab's run-directory layout, written from a store (``export npz``'s default).

What Activation Lab's ``run`` writes today (shared/fixtures/seed-runs show it), for the
runs of one scenario run (one capture of a scenario file)::

    <scenario name>_<time>/
      scenario.json                       the scenario file, every prompt
      references/index.json               {"labels": [...]}
      references/ref_<label>.npz          the reference's full prefill (below)
      prompt_<i>/ or prompt_<i>_msg<k>of<m>/   one per run (run_at_each_message: msg k of m)
        run.json, steps.json              as Activation Lab writes them
        tensors/step_NNN.npz              one forward pass: layer_NN/<source> (1, T, W),
                                          attention (1, heads, T, kv), embeddings / logits
        conversation_snapshots/index.json {"snapshots": [...]}: index, role, content_preview,
                                          input_token_ids, input_tokens, seq_len,
                                          tensors_file, tensor_index, generated
        conversation_snapshots/snapshot_<index:02d>_<role>.npz

A snapshot or reference file is the full prefill of its prefix, read from the run's full
passes (store/passes.py): every captured source but v at every position, attention
(1, heads, T, T), and ``qkv_last`` (num_layers, Dv) float32: per captured layer, at the
last token, ``dot(q[:m], k[:m]) / sqrt(m) * v`` with m = min(dim q, dim k) (pre-RoPE
q, k, v as stored), zero rows for the layers not captured. An import from these files
keeps their qkv_last; a capture's is computed here exactly as Activation Lab does.

Which prompt directory a run is: ``meta["prompt_index"]`` (None, a scenario with one
prompt mapping, is prompt 0) and ``meta["message_prefix"]`` ([k, m] for the runs of a
prompt with run_at_each_message; captures and imports record it). Runs captured before
it was recorded are named from their scenario run: several runs of one prompt index are
its message prefixes, k = the messages each holds, m = the most any holds.

Steps are written in Activation Lab's key order; ``seq_len`` as it counts (the prompt at
step 0, prompt + i + 1 at decode step i; a store keeps the tokens fed). Token strings
are those the run recorded (a capture's are the tokenizer's tokens, e.g. ``Ġbrief``;
Activation Lab's, each token decoded alone, `` brief``).
"""

from __future__ import annotations

import copy
import re
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import dask
import numpy as np
from tqdm.auto import tqdm

from actstore import naming
from actstore.errors import BadNameError, SelectionError, StoreError
from actstore.store import npz_file
from actstore.store.npz_export import INFO_KEY, SEED_RUN_KEYS, _dest, _run_json, _write_json, step_tensors
from actstore.store.reader import RunReader

# Activation Lab's key order within one layer: the order its hooks fire in.
LAYER_ORDER = (
    "hidden_in", "q", "k", "v", "attn_out", "mlp_gate", "mlp_act", "mlp_up", "mlp_down_in",
    "mlp_down_out", "hidden_out",
)  # fmt: skip
# steps.json keys, in Activation Lab's order (tensors_file, tensor_index follow).
STEP_KEYS = (
    "step", "kind", "input_token_ids", "input_tokens", "generated_token_id", "generated_token",
    "logit_argmax_id", "logit_argmax_logprob", "top_k", "seq_len", "logit_stats",
)  # fmt: skip
QKV_LAST = "qkv_last"
_RUN_ID_STAMP = re.compile(r"_(\d{8}T\d{6})_[0-9a-f]{6}$")


# ---------------------------------------------------------------------- which runs, which names


def scenario_runs(run: RunReader) -> list[RunReader]:
    """Every run of ``run``'s scenario run (``meta["scenario_run"]``), in catalog order;
    just ``run`` when it has none or was opened without its store."""
    sr = run.meta.get("scenario_run")
    if not sr or run.store is None:
        return [run]
    entries = [e for e in run.store.catalog_entries() if e.get("scenario_run") == sr]
    if run.id not in [e["id"] for e in entries]:
        return [run]
    return list(run.store.runs_from(entries))


def dir_name(runs: list[RunReader]) -> str:
    """``<scenario name>_<YYYY-mm-ddTHH-MM-SSZ>`` (when the scenario run began), or the
    name of the Activation Lab directory the runs were imported from."""
    first = runs[0]
    top = first.meta.get("scenario_dir")
    if isinstance(top, dict) and naming.name_problem(top.get("name"), naming.MAX_RUN_ID) is None:
        return str(top["name"])
    scenario = first.scenario if isinstance(first.scenario, dict) else {}
    try:
        name = naming.check_name(scenario.get("name"), "scenario.name", f"run {first.id}")
    except BadNameError as e:
        raise StoreError(f"{e}; this run cannot be exported as files") from None
    return f"{name}_{_stamp(first)}"


def _stamp(run: RunReader) -> str:
    sr = str(run.meta.get("scenario_run") or run.id)
    m = _RUN_ID_STAMP.search(sr)
    try:
        when = (
            datetime.strptime(m.group(1), "%Y%m%dT%H%M%S").replace(tzinfo=UTC)
            if m else datetime.fromisoformat(str(run.meta.get("created_at")))
        )  # fmt: skip
    except ValueError:
        return naming.check_run_id(run.id)
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H-%M-%SZ")


def _placement(run: RunReader, runs: list[RunReader]) -> tuple[int, tuple[int, int] | None]:
    """(prompt index, (k, m) or None) of one run among its scenario run's."""
    index = run.meta.get("prompt_index")
    index = 0 if index is None else index
    if not _small_int(index):
        raise StoreError(f"run {run.id}: prompt_index {index!r} is not a number 0 to 999999")
    if "message_prefix" in run.meta:
        prefix = run.meta["message_prefix"]
        if prefix is None:
            return index, None
        if not (isinstance(prefix, list) and len(prefix) == 2 and all(map(_small_int, prefix))
                and 1 <= prefix[0] <= prefix[1]):  # fmt: skip
            raise StoreError(f"run {run.id}: message_prefix {prefix!r} is not [k, m] with 1 <= k <= m")
        return index, (prefix[0], prefix[1])
    # Captured before message_prefix was recorded: a prompt index several runs share is
    # a prompt with run_at_each_message.
    same = [r for r in runs if (r.meta.get("prompt_index") or 0) == index]
    if len(same) < 2:
        return index, None
    return index, (len(_messages(run)), max(len(_messages(r)) for r in same))


def _small_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 10**6


def prompt_dirs(runs: list[RunReader]) -> list[str]:
    """Activation Lab's prompt directory name of each run, checked unique."""
    names: list[str] = []
    for run in runs:
        index, prefix = _placement(run, runs)
        name = f"prompt_{index}" + (f"_msg{prefix[0]}of{prefix[1]}" if prefix else "")
        if name in names:
            other = runs[names.index(name)].id
            raise StoreError(
                f"runs {other} and {run.id} of scenario run {run.meta.get('scenario_run')} are both {name} "
                "(export each with the Python API: export_npz(run, ...))"
            )
        names.append(name)
    return names


def _messages(scenario_or_run: Any) -> list[Any]:
    """The messages of a run's scenario (its prompt: a mapping, or a list of one)."""
    scenario = scenario_or_run.scenario if isinstance(scenario_or_run, RunReader) else scenario_or_run
    prompt = scenario.get("prompt")
    if isinstance(prompt, list):
        prompt = prompt[0] if prompt else {}
    messages = prompt.get("messages") if isinstance(prompt, dict) else None
    return list(messages) if isinstance(messages, list) else []


def scenario_json(runs: list[RunReader]) -> dict[str, Any]:
    """scenario.json: the one an Activation Lab import kept, else the scenario file put
    back together from its runs (each prompt index's longest run holds all its messages)."""
    top = runs[0].meta.get("scenario_dir")
    if isinstance(top, dict) and isinstance(top.get("scenario"), dict):
        return dict(top["scenario"])
    out = copy.deepcopy(dict(runs[0].scenario))
    prompts: dict[int, dict[str, Any]] = {}
    for run in runs:
        index, prefix = _placement(run, runs)
        messages = _messages(run)
        if index not in prompts or len(messages) > len(prompts[index]["messages"]):
            prompts[index] = {"messages": messages, "run_at_each_message": prefix is not None}
    out["prompt"] = [prompts[i] for i in sorted(prompts)]
    return out


# ---------------------------------------------------------------------- checks, then files


def check(runs: list[RunReader]) -> None:
    """Everything an export needs, before anything is written: unique prompt directories,
    and a full pass for every snapshot and reference (runs captured before full passes,
    or imported from the README layout, have last-token vectors only)."""
    prompt_dirs(runs)
    for run in runs:
        try:
            for s in run.snapshot_index:
                run.pass_info("snapshot", s["index"])
            for label in run.reference_labels:
                run.pass_info("reference", label)
        except SelectionError as e:
            raise StoreError(
                f"{e}: Activation Lab's files hold full passes; export it with --layout readme "
                "(last-token snapshot and reference vectors)"
            ) from None


def write_dir(runs: list[RunReader], root: Path, *, quiet: bool) -> None:
    """Write the scenario run's directory into ``root`` (which exists, empty)."""
    names = prompt_dirs(runs)
    refs = next((r for r in runs if r.reference_labels), None)
    labels = refs.reference_labels if refs is not None else []
    total = len(labels) + sum(r.n_steps + len(r.snapshot_index) for r in runs)
    bar = tqdm(total=total, desc=f"export {root.name.lstrip('.')}", unit="file",
               disable=quiet or not sys.stderr.isatty(), file=sys.stderr)  # fmt: skip
    try:
        _write_json(root / "scenario.json", scenario_json(runs))
        if refs is not None:
            tokens = {}
            for label in labels:
                arrays = pass_arrays(refs, "reference", label)
                _savez(_dest(root, naming.reference_file(label)), arrays)
                tokens[label] = [int(t) for t in refs.pass_tokens("reference", label)]
                bar.update()
            index: dict[str, Any] = {"labels": labels}
            if all(t >= 0 for ids in tokens.values() for t in ids):
                # not Activation Lab's (it records none): an import keeps them
                index["input_token_ids"] = tokens
            _write_json(root / "references" / "index.json", index)
        for run, name in zip(runs, names, strict=True):
            _write_prompt_dir(run, _dest(root, name), bar)
    finally:
        bar.close()


def _write_prompt_dir(run: RunReader, d: Path, bar: Any) -> None:
    (d / "tensors").mkdir(parents=True)
    entries, npz_dtype = [], None
    numbers = [int(s["step"]) for s in run.steps]
    for step_meta, step, tensors in zip(run.steps, numbers, step_tensors(run, numbers), strict=True):
        arrays = ordered(tensors, run.layers)
        rel = naming.step_file(step)
        _savez(_dest(d, rel), arrays)
        npz_dtype = npz_dtype or next((str(a.dtype) for a in arrays.values()), None)
        entries.append(_step_entry(run, step_meta, step, rel, arrays))
        bar.update()
    _write_json(d / "steps.json", {"steps": entries})
    if run.snapshot_index:
        spell = spelling(run)
        index = []
        for s in run.snapshot_index:
            arrays = pass_arrays(run, "snapshot", s["index"])
            rel = naming.snapshot_file(s["index"], s["role"])
            _savez(_dest(d, rel), arrays)
            ids = [int(t) for t in run.pass_tokens("snapshot", s["index"])]
            entry: dict[str, Any] = {k: s.get(k) for k in ("index", "role", "content_preview")}
            if all(t >= 0 for t in ids):  # -1: an import whose index gave no token ids
                entry["input_token_ids"] = ids
                if all(str(t) in spell for t in ids):
                    entry["input_tokens"] = [spell[str(t)] for t in ids]
            entry["seq_len"] = len(ids)
            entry["tensors_file"] = Path(rel).name
            entry["tensor_index"] = _tensor_index(arrays)
            entry["generated"] = bool(s.get("generated", False))
            index.append(entry)
            bar.update()
        _write_json(d / "conversation_snapshots" / "index.json", {"snapshots": index})
    run_json = {k: v for k, v in _run_json(run, run.meta, npz_dtype).items() if k != "generated_text"}
    run_json["model"] = unfilled(run.meta.get("model"), run.meta.get("npz_filled") or [])
    # Activation Lab's keys, then actstore's block (it keeps the decoded reply there)
    run_json[INFO_KEY]["generated_text"] = run.meta.get("generated_text", "")
    _write_json(d / "run.json", {k: run_json[k] for k in (*SEED_RUN_KEYS, INFO_KEY)})


def _step_entry(run: RunReader, step_meta: dict[str, Any], step: int, rel: str,
                arrays: dict[str, np.ndarray]) -> dict[str, Any]:  # fmt: skip
    entry = {k: step_meta.get(k) for k in STEP_KEYS if k != "logit_stats" or k in step_meta}
    entry["top_k"] = entry["top_k"] or []
    # Activation Lab counts the sequence: the prompt, then prompt + i + 1 at decode step i.
    entry["seq_len"] = run.prompt_len if step == 0 else run.prompt_len + step + 1
    # Keys another writer added ride along; positions is actstore's (an import recomputes it).
    entry.update({k: v for k, v in step_meta.items() if k not in entry and k != "positions"})
    entry["tensors_file"] = rel
    entry["tensor_index"] = _tensor_index(arrays)
    return entry


def unfilled(model: Any, filled: list[str]) -> Any:
    """run.json's model as the imported file had it: without what the import filled in."""
    out = copy.deepcopy(model)
    for path in filled:
        parts = str(path).split(".")[1:]  # "model.arch.family" -> ["arch", "family"]
        node = out
        for part in parts[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and parts:
            node.pop(parts[-1], None)
    return out


def spelling(run: RunReader) -> dict[str, str]:
    """Token id -> text, as the run spells tokens: its prompt and steps, then what it
    recorded for the snapshots' other tokens (``token_strings``)."""
    meta = run.meta
    out: dict[str, str] = {}

    def add(ids: Any, toks: Any) -> None:
        if isinstance(ids, list) and isinstance(toks, list) and len(ids) == len(toks):
            out.update((str(i), t) for i, t in zip(ids, toks, strict=True) if isinstance(t, str))

    add(meta.get("prompt_token_ids"), meta.get("prompt_tokens"))
    for s in run.steps:
        add(s.get("input_token_ids"), s.get("input_tokens"))
        add([s.get("generated_token_id")], [s.get("generated_token")])
    strings = meta.get("token_strings")
    if isinstance(strings, dict):
        out.update((str(k), v) for k, v in strings.items() if isinstance(v, str))
    return out


# ---------------------------------------------------------------------- arrays


def ordered(arrays: dict[str, np.ndarray], layers: list[int]) -> dict[str, np.ndarray]:
    """NPZ members in Activation Lab's order: embeddings, each layer's sources in hook
    order, attention weights per layer, logits, qkv_last."""
    keys = ["embeddings"]
    keys += [naming.npz_key(layer, s) for layer in layers for s in LAYER_ORDER]
    keys += [naming.npz_key(layer, "attn_weights") for layer in layers]
    keys += ["logits", QKV_LAST]
    out = {k: arrays[k] for k in keys if k in arrays}
    out.update((k, v) for k, v in arrays.items() if k not in out)
    return out


def pass_arrays(run: RunReader, kind: str, key: int | str) -> dict[str, np.ndarray]:
    """One full pass as Activation Lab's file holds it: every source but v at every
    position (1, T, ...), then qkv_last."""
    sources = [s for s in run.sources if s != "v"]
    lazy: dict[str, Any] = {s: run.pass_array(kind, key, s, dense=True) for s in sources}
    stored = run.pass_qkv_last(kind, key)
    compute_qkv = stored is None and {"q", "k", "v"} <= set(run.sources)
    if compute_qkv:
        lazy["v"] = run.pass_array(kind, key, "v", dense=True)[:, -1]
    values = dict(zip(lazy, dask.compute(*lazy.values()), strict=True))
    out: dict[str, np.ndarray] = {}
    for i, layer in enumerate(run.layers):
        for source in naming.LAYER_SOURCES:
            if source in values and source != "v":
                out[naming.npz_key(layer, source)] = np.ascontiguousarray(values[source][i])[None]
    for source in naming.GLOBAL_SOURCES:
        if source in values:
            out[source] = np.ascontiguousarray(values[source])[None]
    if stored is not None:
        out[QKV_LAST] = stored
    elif compute_qkv:
        out[QKV_LAST] = qkv_last(run, values["q"][:, -1], values["k"][:, -1], values["v"])
    return ordered(out, run.layers)


def qkv_last(run: RunReader, q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """(num_layers, Dv) float32 from the last token's (L, W) q, k, v of the captured layers,
    as Activation Lab's capture_reference_prefill computes it."""
    arch = (run.meta.get("model") or {}).get("arch") or {}
    n = arch.get("num_layers")
    n = n if isinstance(n, int) and n > max(run.layers) else max(run.layers) + 1
    rows = np.zeros((n, v.shape[-1]), dtype=np.float32)
    for i, layer in enumerate(run.layers):
        qi, ki, vi = (np.asarray(x[i], dtype=np.float32) for x in (q, k, v))
        m = min(qi.shape[0], ki.shape[0])
        rows[layer] = float(np.dot(qi[:m], ki[:m]) / np.sqrt(m)) * vi
    return rows


def _tensor_index(arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    return {k: {"shape": list(a.shape), "dtype": str(a.dtype)} for k, a in arrays.items()}


def _savez(path: Path, arrays: dict[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    npz_file.save_npz(path, arrays)
