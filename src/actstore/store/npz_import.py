"""Read a seed run directory into a store as a committed run (see :mod:`actstore.store.npz`).

The directory may come from ``export_npz`` or from the original tool. Step tensors go
through the capture path's :class:`~actstore.store.writer.RunWriter` with the same layout
specs, so an imported run is indistinguishable from a captured one. Nothing is dropped
unless the reader serves it back bit for bit: the residual stream is stored once per
layer boundary only when hidden_in of layer l+1 equals hidden_out of layer l (else the
import fails, naming the step and layer), and mlp_down_in is stored explicitly as soon as
one step differs from what the reader derives. Reading and checking the directory's
files is :mod:`actstore.store.npz_schema`; this module writes.

Snapshot and reference files holding the full prefill (Activation Lab's) become full
passes (store/passes.py) through :class:`~actstore.capture.pass_log.PassLog`, each pass
whole (``shared=0``, so it reads back bit for bit) and read one at a time, plus their
``qkv_last`` (the files leave out the v it came from); the last-token stacks are their
last positions. The README layout's 1-D vectors give the stacks only.

:func:`read_seed_dir` checks the whole directory first (names, paths, every NPZ header,
the memory the import needs) without decompressing a tensor, so a hostile or broken
directory is refused before the store is opened or anything is written.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from actstore import naming
from actstore.capture.pass_log import PassLog
from actstore.errors import StoreError
from actstore.store import layout
from actstore.store import passes as pass_views
from actstore.store.npz_schema import (
    QKV_LAST,
    Key,
    Schema,
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
    writer_array,
)
from actstore.store.store import ActStore, catalog_entry
from actstore.store.writer import RunWriter, write_rows, write_run_meta, write_small_array

_INFO_KEY = "actstore"  # see npz_export.INFO_KEY
# A step record's keys in the order capture.sampling.step_record writes them.
_STEP_ORDER = (
    "step", "kind", "seq_len", "input_token_ids", "input_tokens", "generated_token_id", "generated_token",
    "logit_argmax_id", "logit_argmax_logprob", "top_k", "logit_stats", "positions",
)  # fmt: skip
MAX_SCENARIO_BYTES = 1 << 20  # scenario.json is kept in the run metadata: a scenario, not data


@dataclass(frozen=True)
class PassFile:
    """One snapshot or reference NPZ that passed the checks."""

    path: Path
    key: int | str  # snapshot index, or reference label
    length: int | None  # tokens of a full prefill; None: the README layout's 1-D vectors
    seq: list[int] | None  # its token ids where the index gives them
    qkv_last: bool  # holds Activation Lab's qkv_last
    with_v: bool  # holds v (Activation Lab's files do not)


@dataclass
class SeedDir:
    """A run directory that passed every check of :func:`read_seed_dir`."""

    d: Path
    run_json: dict[str, Any]
    steps: list[dict[str, Any]]
    schema: Schema
    snapshots: list[dict[str, Any]]
    snap_files: list[PassFile]
    labels: list[str]
    ref_files: list[PassFile]
    token_strings: dict[str, str] = field(default_factory=dict)
    # Where Activation Lab's top-level directory puts it (its prompt_N[_msgKofM] name)
    placement: dict[str, Any] = field(default_factory=dict)
    scenario_dir: dict[str, Any] | None = None  # that directory's name and scenario.json

    @property
    def info(self) -> dict[str, Any]:
        return self.run_json.get(_INFO_KEY) or {}

    @property
    def snap_paths(self) -> list[Path]:
        return [f.path for f in self.snap_files]

    @property
    def ref_paths(self) -> list[Path]:
        return [f.path for f in self.ref_files]


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
    scenario_path = inside(d, "scenario.json", d / "scenario.json", "the file")
    if scenario_path.stat().st_size > MAX_SCENARIO_BYTES:
        raise StoreError(f"{scenario_path}: larger than {MAX_SCENARIO_BYTES >> 20} MiB, too large for a scenario")
    scenario = read_json(scenario_path)
    if not isinstance(scenario, dict):
        raise StoreError(f"{scenario_path}: expected a JSON object (the scenario)")
    found: list[tuple[tuple[int, int], str, dict[str, Any]]] = []
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
        prefix = [int(m.group(2)), int(m.group(3))] if m.group(2) is not None else None
        placement = {"prompt_index": int(m.group(1)), "message_prefix": prefix}
        found.append(((int(m.group(1)), int(m.group(2) or 0)), entry, placement))
    if not found:
        raise StoreError(
            f"{d}: holds scenario.json but no prompt_N/ directory (pass an Activation Lab run directory, "
            "or a directory holding run.json and steps.json)"
        )
    keys = [k for k, _, _ in found]
    dup = next((name for k, name, _ in found if keys.count(k) > 1), None)
    if dup is not None:
        raise StoreError(f"{d / dup}: another directory has the same prompt and message number (remove one)")
    refs = d if os.path.lexists(d / "references") else None
    top = {"name": d.resolve().name, "scenario": scenario}
    seeds = []
    for _, name, placement in sorted(found, key=lambda x: x[0]):
        seed = read_seed_dir(d / name, max_bytes=max_bytes, references_from=refs)
        seed.placement, seed.scenario_dir = placement, top
        seeds.append(seed)
    return seeds


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
    num_layers = ((run_json.get("model") or {}).get("arch") or {}).get("num_layers")
    snapshots, snap_files, spelled = _check_snapshots(d, schema, num_layers)
    known = _prompt_spelling(run_json)
    token_strings = {k: v for k, v in spelled.items() if known.get(k) != v}
    labels, ref_files = _check_references(d if references_from is None else references_from, schema, num_layers)
    budget = memory_budget() if max_bytes is None else max_bytes
    lengths = [f.length for f in [*snap_files, *ref_files] if f.length is not None]
    need = schema.memory_needed(lengths)
    if need > budget:
        raise StoreError(
            f"{d / steps[0]['tensors_file']}: importing this run needs about {gib(need)} of memory at once "
            f"({schema.prompt_len} prompt tokens, {len(schema.layers)} layers), more than the {gib(budget)} "
            "allowed (half this machine's memory); import it on a larger machine"
        )
    for i, step in enumerate(steps[1:], start=1):
        path = d / step["tensors_file"]
        schema.check_members(path, npz_members(path), i)
    return SeedDir(d, run_json, steps, schema, snapshots, snap_files, labels, ref_files, token_strings)


def import_npz_dirs(store: ActStore, seeds: list[SeedDir], *, quiet: bool = False) -> list[str]:
    """Import checked run directories (see :func:`read_seed_dirs`) in order; the run ids.

    They are one scenario run: the one an actstore export names, unless this store already
    holds runs of it (then, like any other directory, the first imported run's id). Full
    reference passes shared by the directories (Activation Lab's references/) are stored
    once, in the first run; the others name it as their ``references_run``."""
    ids: list[str] = []
    scenario_run = _kept_scenario_run(store, seeds)
    for seed in seeds:
        try:
            ids.append(
                _import(store, seed, quiet=quiet, scenario_run=scenario_run or (ids[0] if ids else None),
                        references_run=ids[0] if ids else None)  # fmt: skip
            )
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
    return import_npz_dirs(store, [seed], quiet=quiet)[0]


def _kept_scenario_run(store: ActStore, seeds: list[SeedDir]) -> str | None:
    """The scenario run an actstore export recorded, if this store holds none of its runs
    (an import never joins a capture already here: its prompt directories would collide)."""
    kept = seeds[0].info.get("scenario_run") if seeds else None
    if not isinstance(kept, str) or naming.name_problem(kept, naming.MAX_RUN_ID) is not None:
        return None
    if any(e.get("scenario_run") == kept for e in store.catalog_entries()):
        return None
    return kept


def _import(store: ActStore, seed: SeedDir, *, quiet: bool, scenario_run: str | None,
            references_run: str | None) -> str:  # fmt: skip
    d, run_json, steps, schema, info = seed.d, seed.run_json, seed.steps, seed.schema, seed.info
    run_id = store.new_run_id(run_json["scenario"]["name"])
    writers: list[RunWriter] = []
    log = PassLog()
    snap_full = [f for f in seed.snap_files if f.length is not None]
    ref_full = [f for f in seed.ref_files if f.length is not None] if references_run is None else []
    n_files = len(steps) + 2 + len(snap_full) + len(ref_full)
    bar = tqdm(total=n_files, desc=f"import {d.name}", unit="file", disable=quiet or not sys.stderr.isatty(),
               file=sys.stderr)  # fmt: skip
    try:
        # made inside the try: an interrupt right after it must still discard the group
        group = store.create_run_group(run_id)
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
        records = _write_passes(group, schema, [("snapshot", f) for f in snap_full]
                                + [("reference", f) for f in ref_full], log, bar)  # fmt: skip
        meta = _run_meta(run_json, info, steps, schema, seed.snapshots, seed.labels, d)
        meta["scenario_run"] = scenario_run or run_id
        for key in ("prompt_index", "message_prefix"):  # an export's own record, else the directory name's
            meta[key] = info[key] if key in info else seed.placement.get(key)
        meta["passes"] = records
        meta["token_strings"] = seed.token_strings
        if references_run is not None and any(f.length is not None for f in seed.ref_files):
            meta["references_run"] = references_run
        if seed.scenario_dir is not None:
            meta["scenario_dir"] = seed.scenario_dir
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
        self.derivable = _derivable(schema)
        self.writer: RunWriter | None = None

    def add(self, step: int, raw: dict[Key, np.ndarray]) -> None:
        if not self.active:
            return
        if self.writer is None and self.derivable:
            if all(same_bits(raw[("mlp_down_in", la)], _derived(self.schema, raw, la)) for la in self.schema.layers):
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
        self.writer.submit(self.schema.positions(step).start, _down_in_tensors(self.schema, raw, where))


def _derivable(schema: Schema) -> bool:
    """Whether the reader could derive mlp_down_in from what this run stores."""
    return "mlp_down_in" in schema.widths and "mlp_act" in schema.widths and (
        not schema.gated or "mlp_up" in schema.widths
    )


def _derived(schema: Schema, raw: dict[Key, np.ndarray], layer: int) -> np.ndarray:
    # The reader's formula on the values it serves (bfloat16 widened to float32).
    return layout.derive_down_in(raw[("mlp_act", layer)], raw.get(("mlp_up", layer)), schema.gated, schema.store_dtype)


def _down_in_tensors(schema: Schema, raw: dict[Key, np.ndarray], where: str) -> dict[Key, Any]:
    return {("mlp_down_in", la): writer_array(to_store(raw[("mlp_down_in", la)], schema.store_dtype, where))
            for la in schema.layers}  # fmt: skip


# ---------------------------------------------------------------------- full passes


def _write_passes(group: Any, schema: Schema, files: list[tuple[str, PassFile]], log: PassLog,
                  bar: Any) -> list[dict[str, Any]]:  # fmt: skip
    """Full snapshot and reference passes through the capture path's PassLog, one file in
    memory at a time; their qkv_last as passes/qkv_last. Returns the pass records."""
    if not files:
        return []
    with_v = "v" in schema.widths and all(f.with_v for _, f in files)
    sources = [s for s in schema.sources if with_v or s != "v"]
    store_down_in = "mlp_down_in" in schema.widths and not (
        _derivable(schema) and all(_pass_down_in_derives(schema, f) for _, f in files)
    )
    qkv: list[np.ndarray] = []

    def loader(f: PassFile) -> Any:
        def load() -> dict[Key, Any]:
            assert f.length is not None
            with open_npz(f.path) as npz:
                tensors, raw = schema.tensors(f.path, npz, lambda src: schema.pass_shape(src, f.length), sources)
                if store_down_in:
                    tensors.update(_down_in_tensors(schema, raw, f"{f.path}: mlp_down_in"))
                if f.qkv_last:
                    qkv.append(load_member(f.path, npz, QKV_LAST))
            bar.update()
            return tensors

        return load

    for kind, f in files:
        assert f.length is not None
        seq = f.seq if f.seq is not None else [-1] * f.length  # Activation Lab records no reference tokens
        log.add_stored(kind, f.key, seq, loader(f))
    skip = ("v",) if not with_v else ()

    def planner(own: Any, rows: int, width: int) -> list[Any]:
        plans = schema.plans(rows, attn_cols=width, skip=skip)
        return plans + ([schema.plan("mlp_down_in", rows)] if store_down_in else [])

    records = log.write(group, planner)
    if qkv:
        if len(qkv) != len(files):
            raise StoreError(f"{files[0][1].path.parent}: qkv_last is in some files but not all")
        write_small_array(group, pass_views.QKV_LAST, np.stack(qkv).astype(np.float32, copy=False))
    return records


def _pass_down_in_derives(schema: Schema, f: PassFile) -> bool:
    with open_npz(f.path) as npz:
        for la in schema.layers:
            raw: dict[Key, np.ndarray] = {(s, la): load_member(f.path, npz, naming.npz_key(la, s))[0]
                   for s in ("mlp_act", "mlp_up", "mlp_down_in") if s in schema.widths}  # fmt: skip
            if not same_bits(raw[("mlp_down_in", la)], _derived(schema, raw, la)):
                return False
    return True


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
        unlisted = sorted(p.name for p in (d / folder).glob("*.npz")) if (d / folder).is_dir() else []
        if unlisted:  # without the index they would be left out without a word
            raise StoreError(
                f"{d / folder}: {len(unlisted)} .npz file(s) ({unlisted[0]}, ...) but no index.json to list them "
                "(the import would leave them out; add index.json)"
            )
        return None
    path = inside(d, rel, d / rel, "the file")
    return path, read_json(path)


def _check_snapshots(
    d: Path, schema: Schema, num_layers: object
) -> tuple[list[dict[str, Any]], list[PassFile], dict[str, str]]:
    found = _index(d, "conversation_snapshots")
    if found is None:
        return [], [], {}
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
    snaps: list[dict[str, Any]] = []
    files: list[PassFile] = []
    spelled: dict[str, str] = {}
    for i, e in enumerate(index):
        if not 0 <= e["index"] < 10**6:
            raise StoreError(f"{index_path}: [{i}].index {e['index']} is out of range (0 to 999999)")
        if e["index"] in [s["index"] for s in snaps]:
            raise StoreError(f"{index_path}: [{i}].index {e['index']} is listed twice (indices must be unique)")
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
        f = _pass_file(d, rel, e["index"], index_path, schema, num_layers, e.get("seq_len"))
        seq = None
        if f.length is not None and e.get("input_token_ids") is not None:
            where = f"{index_path}: [{i}]"
            seq = _tokens(e["input_token_ids"], f"{where}.input_token_ids", f.length)
            _spell(seq, e.get("input_tokens"), f"{where}.input_tokens", spelled)
        files.append(PassFile(f.path, f.key, f.length, seq, f.qkv_last, f.with_v))
    _same_form(files, index_path)
    return snaps, files, spelled


def _tokens(ids: object, where: str, length: int) -> list[int]:
    """A full pass's token ids: one per position of its file."""
    if not isinstance(ids, list) or len(ids) != length or not all(type(t) is int and t >= 0 for t in ids):
        raise StoreError(f"{where} must be {length} token ids, one per position of its file")
    return list(ids)


def _spell(ids: list[int], toks: object, where: str, spelled: dict[str, str]) -> None:
    """Add a snapshot's token spelling to ``spelled`` (one spelling per id: an export
    writes them back from it)."""
    if toks is None:
        return
    if not isinstance(toks, list) or len(toks) != len(ids) or not all(isinstance(t, str) for t in toks):
        raise StoreError(f"{where} must be {len(ids)} strings, one per input_token_ids")
    for t, text in zip(ids, toks, strict=True):
        if spelled.setdefault(str(t), text) != text:
            raise StoreError(
                f"{where} spells token {t} {text!r}, another snapshot {spelled[str(t)]!r} "
                "(one spelling per token id is kept)"
            )


def _prompt_spelling(run_json: dict[str, Any]) -> dict[str, str]:
    """How run.json spells the prompt's tokens (the export's spelling where nothing else says)."""
    ids, toks = run_json.get("prompt_token_ids"), run_json.get("prompt_tokens")
    if not isinstance(ids, list) or not isinstance(toks, list) or len(ids) != len(toks):
        return {}
    return {str(t): s for t, s in zip(ids, toks, strict=True) if isinstance(s, str)}


def _same_form(files: list[PassFile], where: Path) -> None:
    if len({f.length is None for f in files}) > 1:
        raise StoreError(f"{where}: some files hold a full prefill, others vectors (all must be alike)")


def _check_references(d: Path, schema: Schema, num_layers: object) -> tuple[list[str], list[PassFile]]:
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
    files = [_pass_file(d, naming.reference_file(x), x, index_path, schema, num_layers) for x in labels]
    _same_form(files, index_path)
    tokens = index.get("input_token_ids")  # an actstore export's; Activation Lab records none
    if tokens is not None:
        if not isinstance(tokens, dict) or set(tokens) != set(labels):
            raise StoreError(f"{index_path}: input_token_ids must map every label to its token ids")
        files = [
            PassFile(f.path, f.key, f.length, _tokens(tokens[f.key], f"{index_path}: input_token_ids[{f.key!r}]",
                                                      f.length), f.qkv_last, f.with_v)
            if f.length is not None else f
            for f in files
        ]  # fmt: skip
    return labels, files


def _pass_file(d: Path, rel: str, key: int | str, index_path: Path, schema: Schema, num_layers: object,
               seq_len: object = None) -> PassFile:  # fmt: skip
    path = inside(d, rel, index_path, "file")
    members = npz_members(path)
    length = schema.check_pass(path, members, seq_len, num_layers)
    full = length is not None
    with_v = full and any(naming.parse_npz_key(k)[1] == "v" for k in members if k != QKV_LAST)
    return PassFile(path, key, length, None, full and QKV_LAST in members, with_v)


# ---------------------------------------------------------------------- metadata


def _run_meta(run_json: dict[str, Any], info: dict[str, Any], steps: list[dict[str, Any]], schema: Schema,
              snapshots: list[dict[str, Any]], labels: list[str], d: Path) -> dict[str, Any]:  # fmt: skip
    """Run metadata in the shape capture.runner._run_meta produces; gaps filled from the
    data (listed in ``npz_filled``, so an export leaves them out again)."""
    env = dict(run_json.get("env") or {})
    model = dict(run_json.get("model") or {})
    filled: list[str] = []
    for key, value in (
        ("id", "unknown"),
        ("source", "npz"),
        ("dtype", (run_json["scenario"].get("model") or {}).get("dtype", schema.store_dtype)),
        ("device", env.get("device", "unknown")),
    ):
        if key not in model:
            model[key] = value
            filled.append(f"model.{key}")
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
        if key not in arch:
            arch[key] = value
            filled.append(f"model.arch.{key}")
    if "arch" not in model:
        filled.append("model.arch")
    model["arch"] = arch
    seed_steps = []
    for i, s in enumerate(steps):
        pos = schema.positions(i)
        entry = {
            **{k: s[k] for k in _STEP_ORDER if k in s},
            "kind": s.get("kind", "prefill" if i == 0 else "decode"),
            # Tokens fed, as actstore counts; Activation Lab's count (prompt + i + 1 at
            # decode step i, checked by read_steps) is what a lab export writes back.
            "seq_len": len(s["input_token_ids"]),
            "positions": [pos.start, pos.stop],
        }
        entry = {k: entry[k] for k in _STEP_ORDER if k in entry}  # as capture writes them
        entry.update((k, v) for k, v in s.items() if k not in entry and k not in ("tensors_file", "tensor_index"))
        seed_steps.append(entry)
    prompt_ids = list(steps[0]["input_token_ids"])
    generated = [s.get("generated_token_id") for s in steps]
    text = run_json.get("generated_text", info.get("generated_text"))  # the readme layout's, or lab's
    if text is None:  # the original tool does not keep it: a readable approximation
        toks = [str(s.get("generated_token") or "") for s in steps]
        text = "".join(toks).replace("\u0120", " ").replace("\u2581", " ").replace("\u010a", "\n")
    meta = {
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
    if filled:
        meta["npz_filled"] = filled
    return meta


def _mtime(path: Path) -> str:
    return datetime.fromtimestamp(path.stat().st_mtime, UTC).isoformat()
