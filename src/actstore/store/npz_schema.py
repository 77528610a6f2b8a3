"""Reading and checking a seed run directory before anything is written.

run.json and steps.json are read and validated; step 0's NPZ sets the :class:`Schema`
(layers, sources, widths, store dtype) that every later step must match, and the schema
turns each step's members into writer tensors, refusing anything the store could not
give back bit for bit. Every error names the file, the key and what to fix.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from actstore import naming
from actstore.errors import StoreError
from actstore.store import layout
from actstore.store.writer import ArrayPlan

Key = tuple[str, int | None]


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StoreError(f"{path}: missing (is {path.parent} a run directory?)") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise StoreError(f"{path}: not valid JSON: {' '.join(str(e).split())}") from None


def read_steps(d: Path) -> list[dict[str, Any]]:
    path = d / "steps.json"
    data = read_json(path)
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


def open_npz(path: Path) -> Any:
    try:
        return np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise StoreError(f"{path}: missing") from None
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise StoreError(f"{path}: not a readable NPZ file ({' '.join(str(e).split())})") from None


def load_member(path: Path, npz: Any, key: str) -> np.ndarray:
    try:
        return np.asarray(npz[key])
    except KeyError:
        raise StoreError(f"{path}: missing key {key!r} (every step must hold the keys of step 0)") from None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise StoreError(f"{path}: cannot read {key!r} ({' '.join(str(e).split())})") from None


def declared_dtype(run_json: dict[str, Any], info: dict[str, Any]) -> str | None:
    cap = (run_json.get("scenario") or {}).get("capture") or {}
    return info.get("store_dtype") or cap.get("store_dtype")


def npz_store_dtype(arr: np.ndarray, declared: str | None, where: str) -> str:
    """The store dtype of NPZ arrays: their own, except float32 that stands for bfloat16."""
    if arr.dtype == np.float16:
        return "float16"
    if arr.dtype == np.float32:
        return "bfloat16" if declared == "bfloat16" else "float32"
    raise StoreError(
        f"{where}: dtype {arr.dtype} is not a store dtype (float16, float32, bfloat16 as float32)"
    )


def to_store(arr: np.ndarray, store_dtype: str, where: str) -> np.ndarray:
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


def as_tensor(arr: np.ndarray) -> torch.Tensor:
    """What RunWriter.submit takes; bfloat16 bits become a bfloat16 tensor (to_numpy undoes it)."""
    if arr.dtype == np.uint16:
        return torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(arr))


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


class Schema:
    """What step 0 says about every step: layers, sources, widths, dtype, positions."""

    def __init__(self, layers: list[int], widths: dict[str, int], store_dtype: str, prompt_len: int,
                 n_steps: int):  # fmt: skip
        self.layers, self.widths, self.store_dtype = layers, widths, store_dtype
        self.sources = [s for s in naming.ALL_SOURCES if s in widths]
        self.prompt_len, self.n_positions = prompt_len, prompt_len + n_steps - 1
        self.gated = "mlp_gate" in widths
        self.bounds = layout.residual_boundaries(layers) if "hidden_in" in widths else []

    @classmethod
    def from_step0(cls, d: Path, steps: list[dict[str, Any]], declared: str | None) -> Schema:
        step0, n_steps = steps[0], len(steps)
        path = d / step0["tensors_file"]
        per_source: dict[str, set[int | None]] = {}
        widths: dict[str, int] = {}
        dtype: str | None = None
        with open_npz(path) as npz:
            for key in npz.files:
                try:
                    layer, source = naming.parse_npz_key(key)
                except ValueError:
                    raise StoreError(
                        f"{path}: unexpected key {key!r} (not layer_NN/<source> or a global source)"
                    ) from None
                arr = load_member(path, npz, key)
                per_source.setdefault(source, set()).add(layer)
                widths[source] = arr.shape[1] if source == "attn_weights" else arr.shape[-1]
                dtype = dtype or npz_store_dtype(arr, declared, f"{path}: {key}")
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
                arr = load_member(path, npz, key)
                want = self.expected_shape(source, step)
                if arr.shape != want:
                    raise StoreError(f"{path}: {key} has shape {list(arr.shape)}, expected {list(want)}")
                if source in ("mlp_act", "mlp_up", "mlp_down_in"):
                    raw[(source, layer)] = arr[0]
                if source == "mlp_down_in":
                    continue  # _DownIn decides whether (and converts only if) it is stored
                data = to_store(arr[0], self.store_dtype, f"{path}: {key}")
                if source in ("hidden_in", "hidden_out"):
                    assert layer is not None
                    b = layer if source == "hidden_in" else layer + 1
                    if b in residual and not same_bits(residual[b][1], data):
                        raise StoreError(
                            f"{path}: {key} differs from {residual[b][0]}; actstore stores the residual "
                            "stream once per layer boundary, so this run cannot be imported losslessly"
                        )
                    residual[b] = (key, data)
                    tensors[("residual", b)] = as_tensor(data)
                else:
                    tensors[(source, layer)] = as_tensor(data)
        return tensors, raw
