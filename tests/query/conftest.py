"""Fixtures for query tests.

* ``synth_store``: three synthetic runs written with the real writer (no model), fast.
* ``tiny``: one capture of a tiny random llama per session (needs actstore.testing).
* ``smol``: one capture of the quick scenario on the real SmolLM2 per session (slow).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from actstore.store.store import ActStore

from .synth import write_synthetic_run

ROOT = Path(__file__).resolve().parents[2]


# ---- fixtures -----------------------------------------------------------------------------
@pytest.fixture(scope="session")
def synth_store(tmp_path_factory: Any) -> ActStore:
    store = ActStore.open(tmp_path_factory.mktemp("synth") / "store.zarr", create=True)
    for i in range(3):
        write_synthetic_run(store, name=f"synth{i % 2}", seed=i, n_layers=4, prompt_len=40, n_steps=6,
                            width=200, n_snapshots=5, labels=("joy", "fear", "calm"))  # fmt: skip
    return store


@dataclass
class Captured:
    store: ActStore
    run: Any
    loaded: Any


def _capture(tmp: Path, loaded: Any, scenario: Any) -> Captured:
    from actstore.capture.runner import capture_run

    store = ActStore.open(tmp / "store.zarr", create=True)
    res = capture_run(scenario, store, loaded, progress=False)
    return Captured(store, store.run(res.run_id), loaded)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: Any) -> Captured:
    """A tiny random llama, captured once: 4 messages, 2 references, float32 store."""
    import torch

    testing = pytest.importorskip("actstore.testing")
    from actstore.models.loading import LoadedModel
    from actstore.scenario import scenario_from_dict

    model, tok = testing.tiny_model("llama", attn_implementation="eager")
    loaded = LoadedModel(model=model, tokenizer=tok, device=torch.device("cpu"), dtype=torch.float32,
                         source="tiny random model", model_id="tiny-llama")  # fmt: skip
    sc = scenario_from_dict({
        "name": "tiny",
        "model": {"id": "tiny", "dtype": "float32", "device": "cpu"},
        "prompt": {"messages": [
            {"role": "system", "content": "You are a calm assistant."},
            {"role": "user", "content": "I am thrilled, the sun is out!"},
            {"role": "assistant", "content": "That sounds lovely."},
            {"role": "user", "content": "Now I am scared of the storm."},
        ]},
        "generation": {"max_new_tokens": 6},
        "capture": {"store_dtype": "float32"},
        "reference_states": [
            {"label": "joy", "messages": [{"role": "user", "content": "I am so happy!"}]},
            {"label": "fear", "messages": [{"role": "user", "content": "I am terrified."}]},
            {"label": "calm", "messages": [{"role": "user", "content": "All is quiet."}]},
        ],
    })  # fmt: skip
    return _capture(tmp_path_factory.mktemp("tiny"), loaded, sc)


@pytest.fixture(scope="session")
def smol(tmp_path_factory: Any) -> Captured:
    """The quick scenario on the real SmolLM2-135M (float16 store), captured once."""
    from actstore.models.loading import load_model
    from actstore.scenario import ModelConfig, load_scenario

    # eager attention: the quick scenario captures attention weights
    loaded = load_model(ModelConfig(id="smollm2", dtype="float32", device="cpu"), attn_implementation="eager")
    return _capture(tmp_path_factory.mktemp("smol"), loaded, load_scenario(ROOT / "scenarios" / "quick.yaml"))


@pytest.fixture(params=["synth", "tiny", pytest.param("smol", marks=pytest.mark.slow)])
def any_run(request: Any) -> Any:
    """The same test on a synthetic run, a tiny-model capture and (slow) SmolLM2."""
    if request.param == "synth":
        return request.getfixturevalue("synth_store").runs(["all"])[0]
    return request.getfixturevalue(request.param).run


@pytest.fixture(params=["tiny", pytest.param("smol", marks=pytest.mark.slow)])
def model_run(request: Any) -> Captured:
    """A capture with its loaded model (tiny random llama; slow: SmolLM2)."""
    return request.getfixturevalue(request.param)
