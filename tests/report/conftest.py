"""Fixtures for report tests: one store of small tiny-model runs, captured once.

Two runs of the same tiny llama (so the inter-run section has a pair), both with
conversation snapshots, reference states and top-k predictions per step; the second
conversation differs so the pair is not trivially identical. A third store holds one
run only (the single-run layout of the report).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from actstore.capture.runner import capture_run
from actstore.models.loading import LoadedModel
from actstore.scenario import scenario_from_dict
from actstore.store.store import ActStore
from actstore.testing import tiny_loaded

MESSAGES_A = [
    {"role": "system", "content": "You are a calm assistant."},
    {"role": "user", "content": "I am thrilled, the sun is out!"},
    {"role": "assistant", "content": "That sounds lovely."},
    {"role": "user", "content": "Now I am scared of the storm."},
]
MESSAGES_B = [
    {"role": "system", "content": "You answer in one sentence."},
    {"role": "user", "content": "My cat knocked over the vase again."},
    {"role": "assistant", "content": "Cats do love gravity experiments."},
    {"role": "user", "content": "I am furious, it was my grandmother's vase."},
]
REFERENCES = [
    {"label": "joy", "messages": [{"role": "user", "content": "I am so happy!"}]},
    {"label": "fear", "messages": [{"role": "user", "content": "I am terrified."}]},
    {"label": "anger", "messages": [{"role": "user", "content": "I am furious!"}]},
]
N_TOKENS = 5
TOP_K = 5


def loaded_tiny(family: str = "llama") -> LoadedModel:
    loaded: LoadedModel = tiny_loaded(family)
    return loaded


def scenario(name: str, messages: list[dict[str, str]], store_dtype: str = "float32") -> Any:
    return scenario_from_dict({
        "name": name,
        "model": {"id": "tiny", "dtype": "float32", "device": "cpu"},
        "prompt": {"messages": messages},
        "generation": {"max_new_tokens": N_TOKENS},
        "capture": {"store_dtype": store_dtype, "top_k_probs": TOP_K},
        "reference_states": REFERENCES,
    })  # fmt: skip


@pytest.fixture(scope="session")
def loaded() -> LoadedModel:
    return loaded_tiny()


@pytest.fixture(scope="session")
def two_run_store(tmp_path_factory: Any, loaded: LoadedModel) -> ActStore:
    store = ActStore.open(tmp_path_factory.mktemp("report") / "store.zarr", create=True)
    capture_run(scenario("mood_a", MESSAGES_A), store, loaded, progress=False)
    capture_run(scenario("mood_b", MESSAGES_B, "float16"), store, loaded, progress=False)
    return store


@pytest.fixture(scope="session")
def two_run_report(two_run_store: ActStore, tmp_path_factory: Any) -> Path:
    from actstore.report import build_report

    return build_report(two_run_store, None, tmp_path_factory.mktemp("out2"), progress=False)


@pytest.fixture(scope="session")
def one_run_report(two_run_store: ActStore, tmp_path_factory: Any) -> Path:
    from actstore.report import build_report

    first = two_run_store.run_ids()[0]
    return build_report(two_run_store, [first], tmp_path_factory.mktemp("out1"), progress=False)
