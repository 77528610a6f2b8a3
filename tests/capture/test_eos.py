"""EOS stops a capture, with a tiny model that is made to emit EOS.

The tiny random models never emit EOS on their own. Here the greedy continuation is
computed first by plain full-sequence argmax passes (no capture, no cache); then either
the model's ``lm_head`` rows of the tokenizer's EOS and of the token it would generate at
step N are swapped (so EOS, and only EOS, wins exactly at step N: no earlier step's
argmax involves either row), or the step-N token is made one of several ``eos_token_id``
values of the model's generation config. The capture must stop right there: N + 1
forward passes, the EOS generated but never fed, P + N stored positions, which hold
what HF computes on exactly those tokens; and HF's ``generate`` with the same model
stops at the same token.

Planted bugs these tests caught (each failed, then reverted): the EOS check removed
from the decode loop; ``_eos_ids`` ignoring the generation config (tokenizer EOS only);
``_eos_ids`` keeping only the first id of a list; ``_eos_ids`` ignoring the tokenizer's
EOS (caught only once the generation config names none); an EOS at the prefill step not stopping (``step > 0`` guard); the EOS token fed
back for one more pass before stopping.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np
import pytest
import torch

from actstore.capture.prompts import render_ids
from actstore.capture.runner import capture_run
from actstore.models.loading import LoadedModel

from .conftest import MESSAGES, hf_forward, loaded_tiny, make_scenario

# qwen2's tiny model (seed 0) generates ten distinct tokens greedily from the sample
# prompt; llama's repeats one token from step 1 on, leaving no late step to stop at.
FAMILY = "qwen2"
MAX_NEW = 10  # well past every stop below: a run that ignores EOS runs all 10 steps
# Logits of one full-sequence pass against the capture's cached prefill + decode passes
# (float32, the same tolerance the other capture oracles use for logits).
LOGITS_ATOL = 1e-4


def _greedy(model: Any, prompt: list[int], n: int) -> list[int]:
    """n greedy tokens by full-sequence passes: the continuation without any EOS rule."""
    ids = list(prompt)
    out = []
    with torch.inference_mode():
        for _ in range(n):
            tok = int(model(input_ids=torch.tensor([ids]), logits_to_keep=1).logits[0, -1].argmax())
            out.append(tok)
            ids.append(tok)
    return out


@lru_cache(maxsize=1)
def _free_run() -> tuple[list[int], list[int]]:
    """(prompt, greedy continuation) of the unmodified tiny model (deterministic: seed 0)."""
    loaded = loaded_tiny(FAMILY, eager=False)
    prompt = render_ids(loaded.tokenizer, MESSAGES)
    return prompt, _greedy(loaded.model, prompt, MAX_NEW)


def _first_new(tokens: list[int], avoid: set[int], start: int = 1) -> int:
    """The first step >= start whose token appeared at no earlier step and is not in avoid."""
    for n in range(start, len(tokens)):
        if tokens[n] not in tokens[:n] and tokens[n] not in avoid:
            return n
    raise AssertionError(f"no usable step in {tokens}")


def _swap_rows(loaded: LoadedModel, a: int, b: int) -> None:
    w = loaded.model.get_output_embeddings().weight
    assert loaded.model.get_input_embeddings().weight.data_ptr() != w.data_ptr()  # untied
    with torch.no_grad():
        w[[a, b]] = w[[b, a]]


def _capture(store: Any, loaded: LoadedModel) -> Any:
    sc = make_scenario(
        generation={"max_new_tokens": MAX_NEW},
        capture={"attention_weights": False, "qkv": False, "mlp": False},
        reference_states=[],
    )
    res = capture_run(sc, store, loaded, progress=False)
    return res, store.run(res.run_id)


def _hf_generate(loaded: LoadedModel, prompt: list[int]) -> list[int]:
    """HF's greedy generate with the model's own generation config (its EOS ids)."""
    with torch.inference_mode():
        out = loaded.model.generate(
            torch.tensor([prompt]), max_new_tokens=MAX_NEW, do_sample=False,
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            pad_token_id=loaded.tokenizer.pad_token_id,
        )  # fmt: skip
    return list(out[0, len(prompt) :].tolist())


def _assert_stopped_at(
    res: Any, run: Any, loaded: LoadedModel, prompt: list[int], kept: list[int], eos: int
) -> None:
    """The run generated ``kept`` then ``eos``, and stored exactly prompt + kept."""
    P, N = len(prompt), len(kept)
    generated = [*kept, eos]
    assert run.meta["generated_token_ids"] == generated
    assert [s["generated_token_id"] for s in run.steps] == generated
    assert res.n_steps == run.n_steps == N + 1
    assert res.n_positions == run.n_positions == P + N
    tokens = run.tokens()
    assert tokens.tolist() == prompt + kept  # the EOS is generated, never fed
    assert run.steps[-1]["positions"] == ([0, P] if N == 0 else [P + N - 1, P + N])
    for source in ("hidden_in", "hidden_out"):
        assert run.array(source).shape[1] == P + N, source
    logits = run.array("logits").compute()
    assert logits.shape[0] == P + N
    out = hf_forward(loaded.model, tokens)
    np.testing.assert_allclose(logits, out.logits[0].numpy(), rtol=0, atol=LOGITS_ATOL)
    # The last stored position is where the model chose EOS.
    assert int(np.argmax(logits[-1])) == eos


@pytest.mark.parametrize("stop_step", ["prefill", "decode"])
def test_tokenizer_eos_stops_capture(stop_step: str, store: Any) -> None:
    loaded = loaded_tiny(FAMILY, eager=False)
    eos = loaded.tokenizer.eos_token_id
    prompt, free = _free_run()
    assert eos not in free  # the random model never emits EOS on its own
    n = 0 if stop_step == "prefill" else _first_new(free, {eos}, start=3)
    _swap_rows(loaded, eos, free[n])
    assert _greedy(loaded.model, prompt, n + 1) == [*free[:n], eos]  # the swap did what it should

    res, run = _capture(store, loaded)
    _assert_stopped_at(res, run, loaded, prompt, free[:n], eos)
    assert _hf_generate(loaded, prompt) == [*free[:n], eos]  # HF stops there too


def test_tokenizer_eos_stops_capture_without_config_eos(store: Any) -> None:
    """The tokenizer's EOS counts even when the model's generation config names none
    (``_eos_ids`` takes both): a checkpoint without generation_config.json still stops."""
    loaded = loaded_tiny(FAMILY, eager=False)
    eos = loaded.tokenizer.eos_token_id
    prompt, free = _free_run()
    n = _first_new(free, {eos}, start=2)
    _swap_rows(loaded, eos, free[n])
    loaded.model.generation_config.eos_token_id = None
    res, run = _capture(store, loaded)
    _assert_stopped_at(res, run, loaded, prompt, free[:n], eos)


def test_any_of_several_eos_ids_stops_capture(store: Any) -> None:
    """The generation config lists several EOS ids; the one emitted is neither the first
    in the list nor the tokenizer's EOS."""
    loaded = loaded_tiny(FAMILY, eager=False)
    tok_eos = loaded.tokenizer.eos_token_id
    prompt, free = _free_run()
    other = next(t for t in range(3, 100) if t not in free)  # an id never generated
    n = _first_new(free, {tok_eos, other}, start=5)
    loaded.model.generation_config.eos_token_id = [tok_eos, other, free[n]]

    res, run = _capture(store, loaded)
    _assert_stopped_at(res, run, loaded, prompt, free[:n], free[n])
    assert _hf_generate(loaded, prompt) == free[: n + 1]


def test_without_eos_capture_runs_to_max_new_tokens(store: Any) -> None:
    """The control: the same model unmodified runs every step, so the stops above are
    the EOS rule's doing."""
    loaded = loaded_tiny(FAMILY, eager=False)
    prompt, free = _free_run()
    res, run = _capture(store, loaded)
    assert run.meta["generated_token_ids"] == free
    assert res.n_steps == MAX_NEW and res.n_positions == len(prompt) + MAX_NEW - 1
