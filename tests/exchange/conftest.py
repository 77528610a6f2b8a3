"""Tiny captured runs shared by the exchange tests (TransformerLens names, HF dataset export).

One store per session holds four short captures of tiny random models: a llama (gated
MLP) in float32 with attention weights, a gpt2 (plain MLP) in float32, and the llama again
in float16 and bfloat16 for the export's dtypes. Each fixture keeps the model it captured,
so tests can run it again with plain HF code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from actstore.store.store import ActStore


@dataclass
class Captured:
    store: ActStore
    run: Any
    model: Any


def _scenario(name: str, store_dtype: str, weights: bool) -> Any:
    from actstore.scenario import scenario_from_dict
    from actstore.testing import SAMPLE_MESSAGES

    return scenario_from_dict({
        "name": name, "model": {"id": "tiny", "dtype": "float32", "device": "cpu"},
        "prompt": {"messages": SAMPLE_MESSAGES}, "generation": {"max_new_tokens": 3},
        "capture": {"store_dtype": store_dtype, "attention_weights": weights},
    })  # fmt: skip


@pytest.fixture(scope="session")
def exchange_store(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Captured]:
    from actstore.capture.runner import capture_run
    from actstore.testing import tiny_loaded

    store = ActStore.open(tmp_path_factory.mktemp("exchange") / "store.zarr", create=True)
    out: dict[str, Captured] = {}
    for key, family, dtype, weights in (
        ("llama", "llama", "float32", True),
        ("gpt2", "gpt2", "float32", False),
        ("f16", "llama", "float16", False),
        ("bf16", "llama", "bfloat16", False),
    ):
        loaded = tiny_loaded(family, eager=weights)
        res = capture_run(_scenario(key, dtype, weights), store, loaded, progress=False)
        out[key] = Captured(store, store.run(res.run_id), loaded.model)
    return out
