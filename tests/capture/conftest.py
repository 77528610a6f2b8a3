"""Fixtures for capture tests: tiny models wrapped as LoadedModel, a store per test, and
HF's own forward pass on a run's tokens (the oracle captures are compared with)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from actstore.models.loading import LoadedModel
from actstore.scenario import scenario_from_dict
from actstore.store.store import ActStore
from actstore.testing import SAMPLE_MESSAGES, SAMPLE_REFERENCES, tiny_loaded

MESSAGES = SAMPLE_MESSAGES
REFERENCES = SAMPLE_REFERENCES


def hf_forward(model: Any, tokens: np.ndarray, *, attentions: bool = False) -> Any:
    """One full-sequence pass with HF's hidden states (and attention weights): what every
    position of a capture, prefill or decode, must equal."""
    with torch.inference_mode():
        ids = torch.tensor([tokens.tolist()])
        return model(input_ids=ids, output_hidden_states=True, output_attentions=attentions)


def loaded_tiny(family: str, *, eager: bool = True) -> LoadedModel:
    loaded: LoadedModel = tiny_loaded(family, eager=eager)
    return loaded


def make_scenario(**overrides: Any) -> Any:
    data: dict[str, Any] = {
        "name": "tiny",
        "model": {"id": "tiny", "dtype": "float32", "device": "cpu"},
        "prompt": {"messages": MESSAGES},
        "generation": {"max_new_tokens": 5},
        "capture": {"store_dtype": "float32"},
        "reference_states": REFERENCES,
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return scenario_from_dict(data)


@pytest.fixture
def store(tmp_path: Any) -> ActStore:
    return ActStore.open(tmp_path / "store.zarr", create=True)
