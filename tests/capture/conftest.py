"""Fixtures for capture tests: tiny models wrapped as LoadedModel, and a store per test."""

from __future__ import annotations

from typing import Any

import pytest

from actstore.models.loading import LoadedModel
from actstore.scenario import scenario_from_dict
from actstore.store.store import ActStore
from actstore.testing import SAMPLE_MESSAGES, SAMPLE_REFERENCES, tiny_loaded

MESSAGES = SAMPLE_MESSAGES
REFERENCES = SAMPLE_REFERENCES


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
