"""Fixtures for corpus-capture tests: a corpus of real English text (Python's own help
topics, ``pydoc_data.topics``: offline, always installed), the saved tiny model loaded
once, and plain-HF helpers the captures are compared with."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return path


@pytest.fixture(scope="session")
def tiny_model_loaded(tiny_folder: Path) -> Any:
    """The saved tiny llama loaded the way capture-dataset loads it (default attention)."""
    from actstore.models.loading import load_model
    from actstore.scenario import ModelConfig

    return load_model(ModelConfig(id=str(tiny_folder), dtype="float32", device="cpu"))


def hf_residuals(model: Any, batch: list[list[int]]) -> list[np.ndarray]:
    """Plain HF, one left-padded batch with the attention mask and position ids from it:
    per sequence, its residual boundaries (L + 1, n, H) at its own positions (pads cut).
    Boundary b < L is ``hidden_states[b]``; boundary L (the last layer's output, which
    ``hidden_states`` only gives after the final norm) comes from a hook of the test's own."""
    width = max(len(s) for s in batch)
    ids = torch.zeros((len(batch), width), dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, s in enumerate(batch):
        ids[i, width - len(s) :] = torch.tensor(s)
        mask[i, width - len(s) :] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    last: dict[str, torch.Tensor] = {}
    inner = getattr(model, "model", None) or model.transformer
    layer = (inner.layers if hasattr(inner, "layers") else inner.h)[-1]
    handle = layer.register_forward_hook(lambda m, a, o: last.__setitem__("out", o[0] if isinstance(o, tuple) else o))
    try:
        with torch.inference_mode():
            out = model(input_ids=ids, attention_mask=mask, position_ids=pos, output_hidden_states=True)
    finally:
        handle.remove()
    states = torch.stack([*out.hidden_states[:-1], last["out"]])  # (L + 1, B, width, H)
    return [states[:, i, width - len(s) :].float().numpy() for i, s in enumerate(batch)]


@pytest.fixture(autouse=True)
def one_torch_thread() -> Any:
    """Tiny matmuls on a shared 2-core machine: one thread is ~20x faster than two
    fighting other processes for the cores (measured 0.3 ms vs 7 ms per tiny linear)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)
