"""Read a seed run directory into a store as a committed run (see :mod:`actstore.store.npz`).

The directory may come from ``export_npz`` or from the original tool. Step tensors go
through the capture path's :class:`~actstore.store.writer.RunWriter` with the same layout
specs, so an imported run is indistinguishable from a captured one. Nothing is dropped
unless the reader serves it back bit for bit: the residual stream is stored once per
layer boundary only when hidden_in of layer l+1 equals hidden_out of layer l (else the
import fails, naming the step and layer), and mlp_down_in is stored explicitly as soon as
one step differs from what the reader derives. Reading and checking the directory's
files is :mod:`actstore.store.npz_schema`; this module writes.

:func:`read_seed_dir` checks the whole directory first (names, paths, every NPZ header,
the memory the import needs) without decompressing a tensor, so a hostile or broken
directory is refused before the store is opened or anything is written.
"""

from __future__ import annotations

import os
import re
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from actstore import naming
from actstore.errors import StoreError
from actstore.store import layout
from actstore.store.npz_schema import (
    Key,
    Schema,
    as_tensor,
    check_name,
    declared_dtype,
    gib,
    inside,
    load_member,
    memory_budget,
    npz_members,
    npz_store_dtype,
    open_npz,
    read_json,
    read_steps,
    run_file,
    same_bits,
    to_store,
)
from actstore.store.store import ActStore, catalog_entry
from actstore.store.writer import RunWriter, write_rows, write_run_meta, write_small_array

_INFO_KEY = "actstore"  # see npz_export.INFO_KEY


class SeedDir:
    """A run directory that passed every check of :func:`read_seed_dir`."""

    def __init__(self, d: Path, run_json: dict[str, Any], steps: list[dict[str, Any]], schema: Schema,
                 snapshots: list[dict[str, Any]], snap_paths: list[Path], labels: list[str],
                 ref_paths: list[Path]):  # fmt: skip
        self.d, self.run_json, self.steps, self.schema = d, run_json, steps, schema
        self.info: dict[str, Any] = run_json.get(_INFO_KEY) or {}
        self.snapshots, self.snap_paths, self.labels, self.ref_paths = (
            snapshots,
            snap_paths,
            labels,
            ref_paths,
        )


# Activation Lab's per-prompt directories: prompt_N, or prompt_N_msgKofM (run_at_each_message).
_PROMPT_DIR = re.compile(r"prompt_(\d+)(?:_msg(\d+)of(\d+))?")


def read_seed_dirs(run_dir: str | os.PathLike[str], *, max_bytes: int | None = None) -> list[SeedDir]:
    """The runs a directory holds, each checked by :func:`read_seed_dir`: itself when it
    holds run.json (the README layout, or one prompt directory of Activation Lab's), else
    Activation Lab's top-level run directory (scenario.json, references/ shared by every
    prompt, one sub-directory per prompt), one run per prompt directory in prompt order."""
    d = Path(run_dir)
    if not d.is_dir() or os.path.lexists(d / "run.json") or not os.path.lexists(d / "scenario.json"):
        return [read_seed_dir(d, max_bytes=max_bytes)]
    inside(d, "scenario.json", d / "scenario.json", "the file")
    found: list[tuple[tuple[int, int], str]] = []
    for entry in os.listdir(d):
        m = _PROMPT_DIR.fullmatch(entry)
        if m is None:
            continue
        if m.group(2) is not None and not 1 <= int(m.group(2)) <= int(m.group(3)):
            raise StoreError(f"{d / entry}: message {m.group(2)} of {m.group(3)} is out of range (rename it)")
        if not (d / entry).is_dir() or (d / entry).is_symlink():  # inside() rules: no link out
            raise StoreError(
                f"{d / entry}: not a directory (a prompt directory holds run.json, steps.json, ...)"
            )
        found.append(((int(m.group(1)), int(m.group(2) or 0)), entry))
    if not found:
        raise StoreError(
            f"{d}: holds scenario.json but no prompt_N/ directory (pass an Activation Lab run directory, "
            "or a directory holding run.json and steps.json)"
        )
    keys = [k for k, _ in found]
    dup = next((name for k, name in found if keys.count(k) > 1), None)
    if dup is not None:
        raise StoreError(f"{d / dup}: another directory has the same prompt and message number (remove one)")
    refs = d if os.path.lexists(d / "references") else None
    return [read_seed_dir(d / name, max_bytes=max_bytes, references_from=refs) for _, name in sorted(found)]


def read_seed_dir(run_dir: str | os.PathLike[str], *, max_bytes: int | None = None,
                  references_from: Path | None = None) -> SeedDir:  # fmt: skip
    """Check a run directory without writing anything or decompressing a tensor: names
    (the capture rule), paths (inside the directory), every NPZ member's header against
    the shapes steps.json declares, and the memory the import needs (``max_bytes``,
    default half the machine's memory). ``references_from``: the directory whose
    references/ the run answers for (Activation Lab keeps them beside its prompt directories)."""
    d = Path(run_dir)
    if not d.is_dir():
        raise StoreError(f"{d}: not a directory (pass a run directory holding run.json and steps.json)")
    run_path = run_file(d, "run.json")
    run_json = read_json(run_path)
    if not isinstance(run_json, dict):
        raise StoreError(f"{run_path}: expected a JSON object with scenario, model, ...")
    scenario = run_json.get("scenario")
    if not isinstance(scenario, dict) or not isinstance(scenario.get("name"), str):
        raise StoreError(f"{run_path}: 'scenario' must be an object with a 'name'")
    check_name(scenario["name"], "scenario.name", run_path)
    steps = read_steps(d)
    info = run_json.get(_INFO_KEY) or {}
    if not isinstance(info, dict):
        raise StoreError(f"{run_path}: '{_INFO_KEY}' must be an object")
    schema = Schema.from_step0(d, steps, declared_dtype(run_json, info))
    budget = memory_budget() if max_bytes is None else max_bytes
    need = schema.memory_needed()
    if need > budget:
        raise StoreError(
            f"{d / steps[0]['tensors_file']}: importing this run needs about {gib(need)} of memory at once "
            f"({schema.prompt_len} prompt tokens, {len(schema.layers)} layers), more than the {gib(budget)} "
            "allowed (half this machine's memory); import it on a larger machine"
        )
    for i, step in enumerate(steps[1:], start=1):
        path = d / step["tensors_file"]
        schema.check_members(path, npz_members(path), i)
    snapshots, snap_paths = _check_snapshots(d, schema)
    labels, ref_paths = _check_references(d if references_from is None else references_from, schema)
    return SeedDir(d, run_json, steps, schema, snapshots, snap_paths, labels, ref_paths)


def import_npz_dirs(store: ActStore, seeds: list[SeedDir], *, quiet: bool = False) -> list[str]:
    """Import checked run directories (see :func:`read_seed_dirs`) in order; the run ids."""
    ids: list[str] = []
    for seed in seeds:
        try:
            ids.append(import_npz(store, seed, quiet=quiet))
        except StoreError as e:
            if not ids:
                raise
            raise StoreError(
                f"{e} (runs already imported from {seeds[0].d.parent}: {', '.join(ids)})"
            ) from None
    return ids


def import_npz(store: ActStore, run_dir: str | os.PathLike[str] | SeedDir, *, quiet: bool = False) -> str:
    """Import one seed run directory (checked by :func:`read_seed_dir` unless it already
    was); returns the new run id (committed)."""
    seed = run_dir if isinstance(run_dir, SeedDir) else read_seed_dir(run_dir)
    d, run_json, steps, schema, info = seed.d, seed.run_json, seed.steps, seed.schema, seed.info
    run_id = store.new_run_id(run_json["scenario"]["name"])
    group = store.create_run_group(run_id)
    writers: list[RunWriter] = []
    n_files = len(steps) + 2
    bar = tqdm(total=n_files, desc=f"import {d.name}", unit="file", disable=quiet or not sys.stderr.isatty(),
               file=sys.stderr)  # fmt: skip
    try:
        writer = RunWriter(group, schema.plans(schema.n_positions))
        writers.append(writer)
        down_in = _DownIn(schema, group, d, steps, writers)
        for i, step in enumerate(steps):
            npz_path = d / step["tensors_file"]
            with open_npz(npz_path) as npz:
                tensors, raw = schema.step_tensors(npz_path, npz, i)
                writer.submit(schema.positions(i).start, tensors)
                down_in.add(i, raw)
            bar.update()
        for w in writers:
            w.finish(schema.n_positions)
        fed = list(steps[0]["input_token_ids"]) + [s["input_token_ids"][0] for s in steps[1:]]
        write_small_array(group, naming.TOKENS_ARRAY, np.asarray(fed, dtype=np.int64))
        pos_step = [0] * schema.prompt_len + list(range(1, len(steps)))
        write_small_array(group, naming.POSITION_STEP_ARRAY, np.asarray(pos_step, dtype=np.int32))
        _read_stacked(seed.snap_paths, group, naming.SNAPSHOTS_GROUP, schema, schema.store_dtype)
        bar.update()
        _read_stacked(seed.ref_paths, group, naming.REFERENCES_GROUP, schema, schema.store_dtype)
        bar.update()
        meta = _run_meta(run_json, info, steps, schema, seed.snapshots, seed.labels, d)
        # An actstore export keeps its scenario run; any other directory is a run of its own.
        meta["scenario_run"] = info.get("scenario_run") or run_id
        meta["prompt_index"] = info.get("prompt_index")
        store.commit(run_id, catalog_entry(write_run_meta(group, meta), run_id))
    except BaseException:
        for w in writers:
            w.abort()
        store.discard(run_id)
        raise
    finally:
        bar.close()
    return run_id


class _DownIn:
    """mlp_down_in: left to the reader while every step equals what it derives; else stored.

    The first step that differs starts an explicit ``acts/mlp_down_in`` array and
    back-fills the earlier steps from their NPZ files (the reader prefers a stored array).
    """

    def __init__(self, schema: Schema, group: Any, d: Path, steps: list[dict[str, Any]],
                 writers: list[RunWriter]):  # fmt: skip
        self.schema, self.group, self.d, self.steps, self.writers = schema, group, d, steps, writers
        self.active = "mlp_down_in" in schema.widths
        self.derivable = (
            self.active and "mlp_act" in schema.widths and (not schema.gated or "mlp_up" in schema.widths)
        )
        self.writer: RunWriter | None = None

    def _derived(self, raw: dict[Key, np.ndarray], layer: int) -> np.ndarray:
        # The reader's formula on the values it serves (bfloat16 widened to float32).
        return layout.derive_down_in(
            raw[("mlp_act", layer)], raw.get(("mlp_up", layer)), self.schema.gated, self.schema.store_dtype
        )

    def add(self, step: int, raw: dict[Key, np.ndarray]) -> None:
        if not self.active:
            return
        if self.writer is None and self.derivable:
            if all(same_bits(raw[("mlp_down_in", la)], self._derived(raw, la)) for la in self.schema.layers):
                return
        if self.writer is None:
            self.writer = RunWriter(self.group, [self.schema.plan("mlp_down_in", self.schema.n_positions)])
            self.writers.append(self.writer)
            for earlier in range(step):  # back-fill, in position order
                path = self.d / self.steps[earlier]["tensors_file"]
                with open_npz(path) as npz:
                    self._submit(earlier, {("mlp_down_in", la): load_member(path, npz, naming.npz_key(la, "mlp_down_in"))[0]
                                           for la in self.schema.layers})  # fmt: skip
        self._submit(step, raw)

    def _submit(self, step: int, raw: dict[Key, np.ndarray]) -> None:
        assert self.writer is not None
        where = f"{self.steps[step]['tensors_file']}: mlp_down_in"
        tensors = {("mlp_down_in", la): as_tensor(to_store(raw[("mlp_down_in", la)], self.schema.store_dtype, where))
                   for la in self.schema.layers}  # fmt: skip
        self.writer.submit(self.schema.positions(step).start, tensors)


# ---------------------------------------------------------------------- snapshots, refs


def _read_stacked(paths: list[Path], group: Any, where: str, schema: Schema, declared: str) -> None:
    """(rows, L, H) per residual source from one NPZ per row, as capture.runner writes them."""
    rows: dict[str, list[np.ndarray]] = {}
    dtype: str | None = None
    for path in paths:
        with open_npz(path) as npz:
            got = {naming.parse_npz_key(k) for k in npz.files if _is_key(k)}
            layers = sorted({la for la, _ in got if la is not None})
            if layers != schema.layers:
                raise StoreError(
                    f"{path}: layers {layers} differ from the step tensors' layers {schema.layers}"
                )
            if not layers:
                continue
            for source in naming.RESIDUAL_SOURCES:
                if (schema.layers[0], source) not in got:
                    continue
                vecs = [_last(load_member(path, npz, naming.npz_key(la, source))) for la in schema.layers]
                if any(v.ndim != 1 for v in vecs):
                    raise StoreError(
                        f"{path}: {source} vectors must be (hidden_size,) or (1, tokens, hidden_size)"
                    )
                dtype = dtype or npz_store_dtype(vecs[0].dtype, declared, str(path))
                rows.setdefault(source, []).append(to_store(np.stack(vecs), dtype, f"{path}: {source}"))
    for source, stack in rows.items():
        if len(stack) != len(paths):
            raise StoreError(f"{paths[0].parent}: {source} is in some files but not all")
        data = np.stack(stack)
        write_rows(group, f"{where}/{source}", data, dtype or schema.store_dtype, schema.layers)


def _last(arr: np.ndarray) -> np.ndarray:
    """A residual vector: itself (README layout), or the last position of a full prefill
    (1, T, H) as Activation Lab writes snapshots and references; the state after the prefix."""
    return arr[0, -1] if arr.ndim == 3 and arr.shape[0] == 1 and arr.shape[1] > 0 else arr


def _is_key(key: str) -> bool:
    try:
        naming.parse_npz_key(key)
    except ValueError:
        return False
    return True


def _index(d: Path, folder: str) -> tuple[Path, Any] | None:
    rel = f"{folder}/index.json"
    if not os.path.lexists(d / rel):
        return None
    path = inside(d, rel, d / rel, "the file")
    return path, read_json(path)


def _check_snapshots(d: Path, schema: Schema) -> tuple[list[dict[str, Any]], list[Path]]:
    found = _index(d, "conversation_snapshots")
    if found is None:
        return [], []
    index_path, index = found
    if isinstance(index, dict) and isinstance(index.get("snapshots"), list):
        index = index["snapshots"]  # Activation Lab's {"snapshots": [...]}; the README has the bare list
    if not isinstance(index, list) or not all(
        isinstance(e, dict) and isinstance(e.get("index"), int) and isinstance(e.get("role"), str)
        for e in index
    ):
        raise StoreError(
            f'{index_path}: expected a list (or {{"snapshots": [...]}}) of {{index, role, content_preview}}'
        )
    snaps, paths = [], []
    for i, e in enumerate(index):
        if not 0 <= e["index"] < 10**6:
            raise StoreError(f"{index_path}: [{i}].index {e['index']} is out of range (0 to 999999)")
        check_name(e["role"], f"[{i}].role", index_path)  # a piece of the snapshot file name
        snap = {"index": e["index"], "role": e["role"], "content_preview": e.get("content_preview", "")}
        if "generated" in e:  # the reply appended as an assistant turn
            if not isinstance(e["generated"], bool):
                raise StoreError(
                    f"{index_path}: [{i}].generated must be true or false, got {e['generated']!r}"
                )
            snap["generated"] = e["generated"]
        snaps.append(snap)
        # Activation Lab names the file; the README layout derives it from index and role.
        rel = naming.snapshot_file(e["index"], e["role"])
        if "tensors_file" in e:
            if not isinstance(e["tensors_file"], str):
                raise StoreError(f"{index_path}: [{i}].tensors_file must be a file name")
            rel = f"conversation_snapshots/{e['tensors_file']}"
        paths.append(_vectors(d, rel, index_path, schema, e.get("seq_len")))
    return snaps, paths


def _check_references(d: Path, schema: Schema) -> tuple[list[str], list[Path]]:
    found = _index(d, "references")
    if found is None:
        return [], []
    index_path, index = found
    labels = index.get("labels") if isinstance(index, dict) else None
    if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
        raise StoreError(f'{index_path}: expected {{"labels": [...]}}')
    for i, label in enumerate(labels):
        # Labels become file names on export and are addressed as reference:LABEL.
        check_name(label, f"labels[{i}]", index_path)
        if label in labels[:i]:
            raise StoreError(f"{index_path}: labels[{i}] {label!r} is listed twice (labels must be unique)")
    return labels, [_vectors(d, naming.reference_file(x), index_path, schema) for x in labels]


def _vectors(d: Path, rel: str, index_path: Path, schema: Schema, seq_len: object = None) -> Path:
    path = inside(d, rel, index_path, "file")
    schema.check_vectors(path, npz_members(path), seq_len)
    return path


# ---------------------------------------------------------------------- metadata


def _run_meta(run_json: dict[str, Any], info: dict[str, Any], steps: list[dict[str, Any]], schema: Schema,
              snapshots: list[dict[str, Any]], labels: list[str], d: Path) -> dict[str, Any]:  # fmt: skip
    """Run metadata in the shape capture.runner._run_meta produces; gaps filled from the data."""
    env = dict(run_json.get("env") or {})
    model = dict(run_json.get("model") or {})
    model.setdefault("id", "unknown")
    model.setdefault("source", "npz")
    model.setdefault("dtype", (run_json["scenario"].get("model") or {}).get("dtype", schema.store_dtype))
    model.setdefault("device", env.get("device", "unknown"))
    arch = dict(model.get("arch") or {})
    w = schema.widths
    for key, value in (
        ("family", arch.get("model_type", "unknown")),
        ("num_layers", max(schema.layers) + 1 if schema.layers else None),
        ("hidden_size", w.get("hidden_in", w.get("attn_out", w.get("embeddings")))),
        ("intermediate_size", w.get("mlp_up", w.get("mlp_act"))),
        ("num_attention_heads", w.get("attn_weights")),
        ("vocab_size", w.get("logits")),
    ):
        arch.setdefault(key, value)
    model["arch"] = arch
    seed_steps = []
    for i, s in enumerate(steps):
        entry = {k: v for k, v in s.items() if k not in ("tensors_file", "tensor_index")}
        entry.setdefault("kind", "prefill" if i == 0 else "decode")
        entry.setdefault("seq_len", len(s["input_token_ids"]))
        pos = schema.positions(i)
        entry["positions"] = [pos.start, pos.stop]
        seed_steps.append(entry)
    prompt_ids = list(steps[0]["input_token_ids"])
    generated = [s.get("generated_token_id") for s in steps]
    text = run_json.get("generated_text")
    if text is None:  # the original tool does not keep it: a readable approximation
        toks = [str(s.get("generated_token") or "") for s in steps]
        text = "".join(toks).replace("\u0120", " ").replace("\u2581", " ").replace("\u010a", "\n")
    return {
        "scenario": run_json["scenario"],
        "model": model,
        "tokenizer": run_json.get("tokenizer") or {},
        "env": env,
        "created_at": run_json.get("created_at") or _mtime(d / "run.json"),
        "prompt_token_ids": run_json.get("prompt_token_ids", prompt_ids),
        "prompt_tokens": run_json.get("prompt_tokens", steps[0].get("input_tokens")),
        "prompt_len": schema.prompt_len,
        "n_positions": schema.n_positions,
        "layers": schema.layers,
        "sources": schema.sources,
        "residual_boundaries": schema.bounds,
        "gated_mlp": schema.gated if {"mlp_act", "mlp_up"} & set(w) else bool(info.get("gated_mlp", False)),
        "store_dtype": schema.store_dtype,
        "steps": seed_steps,
        "generated_token_ids": generated,
        "generated_text": text,
        "snapshots": snapshots,
        "references": labels,
        "imported_from": str(d.absolute()),
    }


def _mtime(path: Path) -> str:
    return datetime.fromtimestamp(path.stat().st_mtime, UTC).isoformat()
