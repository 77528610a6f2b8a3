"""Fixtures for capture tests: tiny models wrapped as LoadedModel, and a store per test."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from actstore.models.loading import LoadedModel
from actstore.scenario import scenario_from_dict
from actstore.store.store import ActStore
from actstore.testing import tiny_model

MESSAGES = [
    {"role": "system", "content": "You are a calm assistant."},
    {"role": "user", "content": "I am thrilled, the sun is out!"},
    {"role": "assistant", "content": "That sounds lovely."},
    {"role": "user", "content": "Now I am scared of the storm."},
]
REFERENCES = [
    {"label": "joy", "messages": [{"role": "user", "content": "I am so happy!"}]},
    {"label": "fear", "messages": [{"role": "user", "content": "I am terrified."}]},
]


def loaded_tiny(family: str, *, eager: bool = True) -> LoadedModel:
    model, tok = tiny_model(family, attn_implementation="eager" if eager else None)
    return LoadedModel(
        model=model, tokenizer=tok, device=torch.device("cpu"), dtype=torch.float32,
        source="tiny random model", model_id=f"tiny-{family}",
    )  # fmt: skip


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
