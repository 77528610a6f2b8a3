"""Synthetic runs written with the real store writer (no model needed).

``write_synthetic_run`` fills every requested source with random float data through
:class:`actstore.store.writer.RunWriter` (so layout, sharding and the residual-boundary
trick are exactly those of a capture), writes snapshots and references the way the
capture runner does, and commits a catalog entry. Tests use it for stores bigger than a
model run would be cheap to make, e.g. the out-of-core test.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

from actstore import naming
from actstore.store import layout
from actstore.store.store import ActStore
from actstore.store.writer import ArrayPlan, RunWriter, to_numpy

VECTOR_SOURCES = ("hidden_in", "attn_out", "mlp_down_out", "q", "mlp_act")


def write_synthetic_run(
    store: ActStore,
    *,
    name: str = "synth",
    n_layers: int = 4,
    prompt_len: int = 20,
    n_steps: int = 6,
    width: int = 64,
    sources: tuple[str, ...] = VECTOR_SOURCES,
    n_snapshots: int = 3,
    labels: tuple[str, ...] = ("joy", "fear"),
    seed: int = 0,
    store_dtype: str = "float16",
    step_chunk: int | None = None,
    attention_heads: int = 0,
) -> str:
    """Write one committed run of random activations; returns its id. With
    ``attention_heads``, attention weights too: each query row a random distribution
    over the keys up to its own position (causal), stored like a capture's."""
    rng = np.random.default_rng(seed)
    layers = list(range(n_layers))
    dtype = layout.physical_dtype(store_dtype)
    n_pos = prompt_len + n_steps - 1
    run_id = store.new_run_id(name)
    group = store.create_run_group(run_id)
    bounds = layout.residual_boundaries(layers)
    plans = [
        ArrayPlan(
            naming.RESIDUAL_ARRAY,
            layout.vector_spec(naming.RESIDUAL_ARRAY, len(bounds), n_pos, width, dtype),
            tuple(("residual", b) for b in bounds),
            {"actstore_dtype": store_dtype, "boundaries": bounds},
        )
    ]
    stored = [s for s in sources if s not in ("hidden_in", "hidden_out")]
    for s in stored:
        spec = layout.vector_spec(s, n_layers, n_pos, width, dtype)
        plans.append(ArrayPlan(s, spec, tuple((s, la) for la in layers), {"actstore_dtype": store_dtype}))
    attn_keys = tuple(("attn", la) for la in layers)
    if attention_heads:
        spec = layout.attn_spec(n_layers, attention_heads, n_pos, dtype)
        plans.append(ArrayPlan("attn_weights", spec, attn_keys, {"actstore_dtype": store_dtype}))
    writer = RunWriter(group, plans)
    keys = [k for p in plans for k in p.keys if k not in attn_keys]
    tdtype = getattr(torch, store_dtype)
    position = 0
    steps = []
    for step in range(n_steps):
        n = prompt_len if step == 0 else 1
        for start in range(0, n, step_chunk or n):
            m = min(step_chunk or n, n - start)
            t = {
                k: torch.from_numpy(rng.standard_normal((m, width), dtype=np.float32)).to(tdtype)
                for k in keys
            }
            for k in attn_keys if attention_heads else ():
                t[k] = torch.from_numpy(_causal_rows(rng, attention_heads, position + start, m)).to(tdtype)
            writer.submit(position + start, t)
        steps.append({"step": step, "kind": "prefill" if step == 0 else "decode", "seq_len": n,
                      "positions": [position, position + n], "generated_token_id": 1, "top_k": [],
                      "input_token_ids": list(range(position, position + n))})  # fmt: skip
        position += n
    writer.finish(position)
    group.create_array(naming.TOKENS_ARRAY, data=np.arange(position, dtype=np.int64))
    group.create_array(
        naming.POSITION_STEP_ARRAY,
        data=np.asarray([0] * prompt_len + list(range(1, position - prompt_len + 1)), dtype=np.int32),
    )
    for where, rows in ((naming.SNAPSHOTS_GROUP, n_snapshots), (naming.REFERENCES_GROUP, len(labels))):
        for s in naming.RESIDUAL_SOURCES:
            values = torch.from_numpy(rng.standard_normal((rows, n_layers, width), dtype=np.float32))
            data = to_numpy(values.to(tdtype))
            group.create_array(f"{where}/{s}", data=data, attributes={"actstore_dtype": store_dtype})
    served = [s for s in naming.ALL_SOURCES if s in set(sources) | {"hidden_in", "hidden_out"}]
    if attention_heads:
        served = [s for s in naming.ALL_SOURCES if s in {*served, "attn_weights"}]
    meta: dict[str, Any] = {
        "scenario": {
            "name": name,
            "model": {
                "id": "synthetic",
                "dtype": "float32",
                "device": "cpu",
                "gguf_file": None,
                "trust_remote_code": False,
            },
        },  # fmt: skip
        "model": {"id": "synthetic", "arch": {"num_layers": n_layers, "hidden_size": width}},
        "created_at": datetime.now(UTC).isoformat(),
        "prompt_len": prompt_len,
        "n_positions": position,
        "layers": layers,
        "sources": served,
        "residual_boundaries": bounds,
        "gated_mlp": True,
        "store_dtype": store_dtype,
        "steps": steps,
        "generated_text": "",
        "snapshots": [
            {
                "index": k,
                "role": "system" if k == 0 else "user" if k % 2 else "assistant",
                "content_preview": f"m{k}",
            }
            for k in range(n_snapshots)
        ],
        "references": list(labels),
    }
    group.attrs["run"] = meta
    store.commit(run_id, {"id": run_id, "scenario": name, "model": "synthetic",
                          "created_at": meta["created_at"], "n_layers": n_layers,
                          "n_positions": position, "n_steps": n_steps, "layers": layers,
                          "sources": served})  # fmt: skip
    return run_id


def raw_run_group(store_path: str | Path, run_id: str) -> zarr.Group:
    """A run's Zarr group opened for writing straight through zarr, bypassing actstore."""
    return zarr.open_group(store=str(store_path), path=f"runs/{run_id}", mode="r+")


@contextmanager
def edited_run_meta(store_path: str | Path, run_id: str) -> Iterator[dict[str, Any]]:
    """Edit a run's stored attributes in place, as an older version or a hand edit would have
    left them: yields a copy of the ``run`` attribute and writes it back on exit."""
    group = raw_run_group(store_path, run_id)
    meta = dict(group.attrs["run"])
    yield meta
    group.attrs["run"] = meta


def _causal_rows(rng: np.random.Generator, heads: int, first: int, rows: int) -> np.ndarray:
    """(heads, rows, first + rows) float32: row i a random distribution over keys
    0..first + i, zero beyond (what a causal softmax gives)."""
    kv = first + rows
    w = rng.random((heads, rows, kv), dtype=np.float32)
    w *= np.arange(kv)[None, None, :] <= (first + np.arange(rows))[None, :, None]
    w /= w.sum(axis=-1, keepdims=True)
    return w
