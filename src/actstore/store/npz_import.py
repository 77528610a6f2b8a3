"""Read a seed run directory into a store as a committed run (see :mod:`actstore.store.npz`).

The directory may come from ``export_npz`` or from the original tool. Step tensors go
through the capture path's :class:`~actstore.store.writer.RunWriter` with the same layout
specs, so an imported run is indistinguishable from a captured one. Nothing is dropped
unless the reader serves it back bit for bit: the residual stream is stored once per
layer boundary only when hidden_in of layer l+1 equals hidden_out of layer l (else the
import fails, naming the step and layer), and mlp_down_in is stored explicitly as soon as
one step differs from what the reader derives.
"""

from __future__ import annotations

import json
import os
import sys
import zipfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from actstore import naming
from actstore.errors import StoreError
from actstore.store import layout
from actstore.store.store import ActStore, catalog_entry
from actstore.store.writer import ArrayPlan, RunWriter, write_rows, write_run_meta, write_small_array

Key = tuple[str, int | None]
_INFO_KEY = "actstore"  # see npz_export.INFO_KEY


def import_npz(store: ActStore, run_dir: str | os.PathLike[str], *, quiet: bool = False) -> str:
    """Import one seed run directory; returns the new run id (committed)."""
    d = Path(run_dir)
    if not d.is_dir():
        raise StoreError(f"{d}: not a directory (pass a run directory holding run.json and steps.json)")
    run_json = _read_json(d / "run.json")
    if not isinstance(run_json, dict):
        raise StoreError(f"{d / 'run.json'}: expected a JSON object with scenario, model, ...")
    scenario = run_json.get("scenario")
    if not isinstance(scenario, dict) or not isinstance(scenario.get("name"), str):
        raise StoreError(f"{d / 'run.json'}: 'scenario' must be an object with a 'name'")
    steps = _read_steps(d)
    info = run_json.get(_INFO_KEY) or {}
    schema = _Schema.from_step0(d, steps, _declared_dtype(run_json, info))
    try:
        run_id = store.new_run_id(scenario["name"])
    except ValueError:
        raise StoreError(f"{d / 'run.json'}: scenario name {scenario['name']!r} cannot name a run") from None
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
            with _open_npz(npz_path) as npz:
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
        snap_index = _read_snapshots(d, group, schema)
        bar.update()
        labels = _read_references(d, group, schema)
        bar.update()
        meta = _run_meta(run_json, info, steps, schema, snap_index, labels, d)
        store.commit(run_id, catalog_entry(write_run_meta(group, meta), run_id))
    except BaseException:
        for w in writers:
            w.abort()
        try:  # best effort: an uncommitted group is invisible anyway
            del store.root[naming.RUNS_PREFIX][run_id]  # type: ignore[union-attr]
        except Exception:  # noqa: BLE001 - cleanup must not hide the original error
            pass
        raise
    finally:
        bar.close()
    return run_id


# ---------------------------------------------------------------------- validation


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StoreError(f"{path}: missing (is {path.parent} a run directory?)") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise StoreError(f"{path}: not valid JSON: {' '.join(str(e).split())}") from None


def _read_steps(d: Path) -> list[dict[str, Any]]:
    path = d / "steps.json"
    data = _read_json(path)
    steps = data.get("steps") if isinstance(data, dict) else None
    if not isinstance(steps, list) or not steps:
        raise StoreError(f'{path}: expected {{"steps": [...]}} with at least one step')
    for i, s in enumerate(steps):
        where = f"{path}: steps[{i}]"
        if not isinstance(s, dict):
            raise StoreError(f"{where}: expected an object")
        if s.get("step") != i:
            raise StoreError(
                f"{where}: 'step' is {s.get('step')!r}, expected {i} (steps must be 0..n-1 in order)"
            )
        ids = s.get("input_token_ids")
        if not isinstance(ids, list) or not ids or not all(isinstance(t, int) for t in ids):
            raise StoreError(f"{where}: 'input_token_ids' must be a non-empty list of integers")
        if i > 0 and len(ids) != 1:
            raise StoreError(f"{where}: a decode step feeds one token, not {len(ids)}")
        if s.get("seq_len", len(ids)) != len(ids):
            raise StoreError(f"{where}: seq_len {s.get('seq_len')} != {len(ids)} input tokens")
        kind = "prefill" if i == 0 else "decode"
        if s.get("kind", kind) != kind:
            raise StoreError(f"{where}: kind {s.get('kind')!r}, expected {kind!r}")
        s.setdefault("tensors_file", naming.step_file(i))
        if not isinstance(s["tensors_file"], str) or not (d / s["tensors_file"]).is_file():
            raise StoreError(f"{where}: tensors_file {s['tensors_file']!r} not found in {d}")
    return steps


def _open_npz(path: Path) -> Any:
    try:
        return np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise StoreError(f"{path}: missing") from None
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise StoreError(f"{path}: not a readable NPZ file ({' '.join(str(e).split())})") from None


def _load(path: Path, npz: Any, key: str) -> np.ndarray:
    try:
        return np.asarray(npz[key])
    except KeyError:
        raise StoreError(f"{path}: missing key {key!r} (every step must hold the keys of step 0)") from None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise StoreError(f"{path}: cannot read {key!r} ({' '.join(str(e).split())})") from None


def _declared_dtype(run_json: dict[str, Any], info: dict[str, Any]) -> str | None:
    cap = (run_json.get("scenario") or {}).get("capture") or {}
    return info.get("store_dtype") or cap.get("store_dtype")


def _store_dtype(arr: np.ndarray, declared: str | None, where: str) -> str:
    """The store dtype of NPZ arrays: their own, except float32 that stands for bfloat16."""
    if arr.dtype == np.float16:
        return "float16"
    if arr.dtype == np.float32:
        return "bfloat16" if declared == "bfloat16" else "float32"
    raise StoreError(
        f"{where}: dtype {arr.dtype} is not a store dtype (float16, float32, bfloat16 as float32)"
    )


def _to_store(arr: np.ndarray, store_dtype: str, where: str) -> np.ndarray:
    """NPZ values -> the physical store array (bfloat16 as uint16 bits), refusing any loss."""
    want = np.float32 if store_dtype == "bfloat16" else np.dtype(store_dtype)
    if arr.dtype != want:
        raise StoreError(f"{where}: dtype {arr.dtype}, but this run's tensors are {np.dtype(want)}")
    if store_dtype != "bfloat16":
        return arr
    bits = np.ascontiguousarray(arr).view(np.uint32)
    if np.any(bits & 0xFFFF):
        raise StoreError(f"{where}: float32 values are not bfloat16 values; the import would lose bits")
    return (bits >> 16).astype(np.uint16)


def _tensor(arr: np.ndarray) -> torch.Tensor:
    """What RunWriter.submit takes; bfloat16 bits become a bfloat16 tensor (to_numpy undoes it)."""
    if arr.dtype == np.uint16:
        return torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(arr))


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


# ---------------------------------------------------------------------- step tensors


class _Schema:
    """What step 0 says about every step: layers, sources, widths, dtype, positions."""

    def __init__(self, layers: list[int], widths: dict[str, int], store_dtype: str, prompt_len: int,
                 n_steps: int):  # fmt: skip
        self.layers, self.widths, self.store_dtype = layers, widths, store_dtype
        self.sources = [s for s in naming.ALL_SOURCES if s in widths]
        self.prompt_len, self.n_positions = prompt_len, prompt_len + n_steps - 1
        self.gated = "mlp_gate" in widths
        self.bounds = layout.residual_boundaries(layers) if "hidden_in" in widths else []

    @classmethod
    def from_step0(cls, d: Path, steps: list[dict[str, Any]], declared: str | None) -> _Schema:
        step0, n_steps = steps[0], len(steps)
        path = d / step0["tensors_file"]
        per_source: dict[str, set[int | None]] = {}
        widths: dict[str, int] = {}
        dtype: str | None = None
        with _open_npz(path) as npz:
            for key in npz.files:
                try:
                    layer, source = naming.parse_npz_key(key)
                except ValueError:
                    raise StoreError(
                        f"{path}: unexpected key {key!r} (not layer_NN/<source> or a global source)"
                    ) from None
                arr = _load(path, npz, key)
                per_source.setdefault(source, set()).add(layer)
                widths[source] = arr.shape[1] if source == "attn_weights" else arr.shape[-1]
                dtype = dtype or _store_dtype(arr, declared, f"{path}: {key}")
        if not widths:
            raise StoreError(f"{path}: holds no tensors")
        layers = sorted({la for ls in per_source.values() for la in ls if la is not None})
        for source, got in per_source.items():
            if source in naming.LAYER_SOURCES and got != set(layers):
                missing = sorted(set(layers) - got)
                raise StoreError(
                    f"{path}: {source} is missing for layer(s) {missing} (every source needs every layer)"
                )
        if ("hidden_in" in widths) != ("hidden_out" in widths):
            raise StoreError(
                f"{path}: has only one of hidden_in / hidden_out; the residual stream needs both"
            )
        assert dtype is not None
        return cls(layers, widths, dtype, len(step0["input_token_ids"]), n_steps)

    def positions(self, step: int) -> range:
        start = 0 if step == 0 else self.prompt_len + step - 1
        return range(start, self.prompt_len if step == 0 else start + 1)

    def plans(self, n_max: int) -> list[ArrayPlan]:
        """Writer plans, as capture.runner._plans makes them (same keys, specs, attrs)."""
        dt = layout.physical_dtype(self.store_dtype)
        attrs: dict[str, Any] = {"actstore_dtype": self.store_dtype}
        plans = []
        if self.bounds:
            keys = tuple(("residual", b) for b in self.bounds)
            spec = layout.vector_spec(
                naming.RESIDUAL_ARRAY, len(self.bounds), n_max, self.widths["hidden_in"], dt
            )
            plans.append(ArrayPlan(naming.RESIDUAL_ARRAY, spec, keys, {**attrs, "boundaries": self.bounds}))
        for source in naming.LAYER_SOURCES:
            if source not in self.widths or source in ("hidden_in", "hidden_out", "mlp_down_in"):
                continue
            plans.append(self.plan(source, n_max))
        for source in naming.GLOBAL_SOURCES:
            if source in self.widths:
                spec = layout.vector_spec(source, None, n_max, self.widths[source], dt)
                plans.append(ArrayPlan(source, spec, ((source, None),), attrs))
        return plans

    def plan(self, source: str, n_max: int) -> ArrayPlan:
        dt = layout.physical_dtype(self.store_dtype)
        if source == "attn_weights":
            spec = layout.attn_spec(len(self.layers), self.widths[source], n_max, dt)
        else:
            spec = layout.vector_spec(source, len(self.layers), n_max, self.widths[source], dt)
        keys = tuple((source, layer) for layer in self.layers)
        return ArrayPlan(source, spec, keys, {"actstore_dtype": self.store_dtype, "layers": self.layers})

    def expected_shape(self, source: str, step: int) -> tuple[int, ...]:
        pos = self.positions(step)
        if source == "attn_weights":
            return (1, self.widths[source], len(pos), pos.stop)  # kv_len = last position + 1
        return (1, len(pos), self.widths[source])

    def keys(self) -> list[str]:
        return [
            naming.npz_key(layer, source)
            for source in self.sources
            for layer in (self.layers if source in naming.LAYER_SOURCES else [None])
        ]

    def step_tensors(
        self, path: Path, npz: Any, step: int
    ) -> tuple[dict[Key, torch.Tensor], dict[Key, np.ndarray]]:
        """Writer tensors of one step, and the raw NPZ arrays mlp_down_in is checked against."""
        extra = sorted(set(npz.files) - set(self.keys()))
        if extra:  # anything we would not write back would be lost
            raise StoreError(f"{path}: keys {extra} are not in step 0 (every step must hold the same keys)")
        tensors: dict[Key, torch.Tensor] = {}
        raw: dict[Key, np.ndarray] = {}
        residual: dict[int, tuple[str, np.ndarray]] = {}
        for source in self.sources:
            for layer in self.layers if source in naming.LAYER_SOURCES else [None]:
                key = naming.npz_key(layer, source)
                arr = _load(path, npz, key)
                want = self.expected_shape(source, step)
                if arr.shape != want:
                    raise StoreError(f"{path}: {key} has shape {list(arr.shape)}, expected {list(want)}")
                if source in ("mlp_act", "mlp_up", "mlp_down_in"):
                    raw[(source, layer)] = arr[0]
                if source == "mlp_down_in":
                    continue  # _DownIn decides whether (and converts only if) it is stored
                data = _to_store(arr[0], self.store_dtype, f"{path}: {key}")
                if source in ("hidden_in", "hidden_out"):
                    assert layer is not None
                    b = layer if source == "hidden_in" else layer + 1
                    if b in residual and not _same_bits(residual[b][1], data):
                        raise StoreError(
                            f"{path}: {key} differs from {residual[b][0]}; actstore stores the residual "
                            "stream once per layer boundary, so this run cannot be imported losslessly"
                        )
                    residual[b] = (key, data)
                    tensors[("residual", b)] = _tensor(data)
                else:
                    tensors[(source, layer)] = _tensor(data)
        return tensors, raw


class _DownIn:
    """mlp_down_in: left to the reader while every step equals what it derives; else stored.

    The first step that differs starts an explicit ``acts/mlp_down_in`` array and
    back-fills the earlier steps from their NPZ files (the reader prefers a stored array).
    """

    def __init__(self, schema: _Schema, group: Any, d: Path, steps: list[dict[str, Any]],
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
            if all(_same_bits(raw[("mlp_down_in", la)], self._derived(raw, la)) for la in self.schema.layers):
                return
        if self.writer is None:
            self.writer = RunWriter(self.group, [self.schema.plan("mlp_down_in", self.schema.n_positions)])
            self.writers.append(self.writer)
            for earlier in range(step):  # back-fill, in position order
                path = self.d / self.steps[earlier]["tensors_file"]
                with _open_npz(path) as npz:
                    self._submit(earlier, {("mlp_down_in", la): _load(path, npz, naming.npz_key(la, "mlp_down_in"))[0]
                                           for la in self.schema.layers})  # fmt: skip
        self._submit(step, raw)

    def _submit(self, step: int, raw: dict[Key, np.ndarray]) -> None:
        assert self.writer is not None
        where = f"{self.steps[step]['tensors_file']}: mlp_down_in"
        tensors = {("mlp_down_in", la): _tensor(_to_store(raw[("mlp_down_in", la)], self.schema.store_dtype, where))
                   for la in self.schema.layers}  # fmt: skip
        self.writer.submit(self.schema.positions(step).start, tensors)


# ---------------------------------------------------------------------- snapshots, refs


def _read_stacked(paths: list[Path], group: Any, where: str, schema: _Schema, declared_dtype: str) -> None:
    """(rows, L, H) per residual source from one NPZ per row, as capture.runner writes them."""
    rows: dict[str, list[np.ndarray]] = {}
    dtype: str | None = None
    for path in paths:
        with _open_npz(path) as npz:
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
                vecs = [_load(path, npz, naming.npz_key(la, source)) for la in schema.layers]
                if any(v.ndim != 1 for v in vecs):
                    raise StoreError(f"{path}: {source} vectors must be 1-D (hidden_size,)")
                dtype = dtype or _store_dtype(vecs[0], declared_dtype, str(path))
                rows.setdefault(source, []).append(_to_store(np.stack(vecs), dtype, f"{path}: {source}"))
    for source, stack in rows.items():
        if len(stack) != len(paths):
            raise StoreError(f"{paths[0].parent}: {source} is in some files but not all")
        data = np.stack(stack)
        write_rows(group, f"{where}/{source}", data, dtype or schema.store_dtype, schema.layers)


def _is_key(key: str) -> bool:
    try:
        naming.parse_npz_key(key)
    except ValueError:
        return False
    return True


def _read_snapshots(d: Path, group: Any, schema: _Schema) -> list[dict[str, Any]]:
    index_path = d / "conversation_snapshots" / "index.json"
    if not index_path.exists():
        return []
    index = _read_json(index_path)
    if not isinstance(index, list) or not all(
        isinstance(e, dict) and isinstance(e.get("index"), int) and isinstance(e.get("role"), str)
        for e in index
    ):
        raise StoreError(f"{index_path}: expected a list of {{index, role, content_preview}}")
    snaps = [
        {"index": e["index"], "role": e["role"], "content_preview": e.get("content_preview", "")}
        for e in index
    ]
    paths = [d / naming.snapshot_file(int(e["index"]), str(e["role"])) for e in snaps]
    _read_stacked(paths, group, naming.SNAPSHOTS_GROUP, schema, schema.store_dtype)
    return snaps


def _read_references(d: Path, group: Any, schema: _Schema) -> list[str]:
    index_path = d / "references" / "index.json"
    if not index_path.exists():
        return []
    index = _read_json(index_path)
    labels = index.get("labels") if isinstance(index, dict) else None
    if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
        raise StoreError(f'{index_path}: expected {{"labels": [...]}}')
    _read_stacked([d / naming.reference_file(x) for x in labels], group, naming.REFERENCES_GROUP, schema,
                  schema.store_dtype)  # fmt: skip
    return labels


# ---------------------------------------------------------------------- metadata


def _run_meta(run_json: dict[str, Any], info: dict[str, Any], steps: list[dict[str, Any]], schema: _Schema,
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
