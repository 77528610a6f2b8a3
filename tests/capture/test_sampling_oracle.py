"""Sampling against transformers' own warpers and its own sampler.

``sampling.filter_logits`` must give, for fixed logits, exactly the distribution that
transformers' TemperatureLogitsWarper -> TopKLogitsWarper -> TopPLogitsWarper chain gives
(the order ``GenerationMixin._get_logits_processor`` applies them in). The seeded sampler
must draw only from that distribution, at its frequencies; and a whole sampled capture
must generate the tokens ``model.generate(do_sample=True)`` generates from the same seed
(HF draws with ``torch.multinomial`` on the global CPU generator, which after
``torch.manual_seed(s)`` is in the state ``sampling.make_generator(s)`` starts in).

Planted bugs these tests caught (each failed, then reverted): top-k branch removed;
top-p branch removed; top-p keeping the tail (sorted descending instead of ascending);
top-p threshold ``cum <= top_p`` instead of ``cum <= 1 - top_p``; top-p's
keep-the-most-likely rule removed; top-k dropping the k-th value too (``<=``);
temperature applied after the filters; ``choose`` sampling from the unfiltered logits; the runner passing
``top_k=None`` / ``top_p=None`` to ``choose``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from actstore.capture import sampling
from actstore.capture.prompts import render_ids
from actstore.capture.runner import capture_run

from .conftest import MESSAGES, loaded_tiny, make_scenario


def hf_filter(
    logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None
) -> torch.Tensor:
    """transformers' warpers, built as ``_get_logits_processor`` builds them for sampling."""
    warpers = LogitsProcessorList()
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_k is not None and top_k != 0:
        warpers.append(TopKLogitsWarper(top_k=top_k, min_tokens_to_keep=1))
    if top_p is not None and top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p=top_p, min_tokens_to_keep=1))
    dummy_ids = torch.zeros((1, 1), dtype=torch.long)  # the warpers ignore input_ids
    out: torch.Tensor = warpers(dummy_ids, logits[None].clone())[0]
    return out


def _logits(kind: str) -> torch.Tensor:
    if kind == "random":  # 1000 distinct values, a realistic spread
        g = torch.Generator().manual_seed(0)
        return torch.randn(1000, generator=g)
    if kind == "ties":  # ties at the k-th place and across the nucleus boundary
        return torch.tensor([4.0, 3.0, 3.0, 3.0, 2.0, 2.0, 1.0, 0.0, 0.0, -1.0, -5.0, -5.0])
    if kind == "peaked":  # one token holds almost all the mass
        return torch.tensor([10.0, 1.0, 0.5, 0.2, 0.0, -0.1, -2.0, -3.0])
    if kind == "wide":  # gaps past float32's exp range: the last two have probability exactly 0
        return torch.tensor([0.0, -1.0, -50.0, -120.0, -200.0])
    raise ValueError(kind)


# (logits, temperature, top_k, top_p): every edge the brief names, and the plain cases.
SETTINGS = [
    ("random", 1.0, None, None),
    ("random", 0.7, 40, None),
    ("random", 1.0, 1, None),  # top-k 1 is greedy
    ("random", 1.0, 1000, None),  # top-k == vocab: nothing removed
    ("random", 1.0, 5000, None),  # top-k larger than the vocab
    ("random", 1.0, None, 1.0),  # top-p 1: nothing removed
    ("random", 1.0, None, 0.9),
    ("random", 1.3, None, 0.5),  # temperature != 1 with top-p: the nucleus depends on it
    ("random", 0.5, None, 0.5),
    ("random", 2.0, 50, 0.6),  # all three: top-p renormalizes over the top-k survivors
    ("random", 1.0, None, 1e-4),  # tiny top-p: only the most likely token survives
    ("random", 1.0, None, 1e-8),  # 1 - top_p rounds to 1.0 in float32: the keep-one rule
    ("ties", 1.0, 2, None),  # the k-th value is tied: every tied token stays
    ("ties", 1.0, 3, None),
    ("ties", 1.0, None, 0.5),
    ("ties", 0.8, 5, 0.7),
    ("ties", 1.0, 100, 1.0),
    ("peaked", 1.0, None, 0.9),  # the top token alone exceeds top-p
    ("peaked", 5.0, 4, 0.8),
    ("peaked", 0.3, None, 0.999),
    ("wide", 1.0, None, 1.0),  # top-p 1 removes nothing, not even tokens of probability 0
    ("wide", 1.0, None, 0.999),  # below 1 the nucleus drops them, as HF's does
]


@pytest.mark.parametrize(("kind", "temperature", "top_k", "top_p"), SETTINGS)
def test_filter_matches_transformers_warpers(
    kind: str, temperature: float, top_k: int | None, top_p: float | None
) -> None:
    logits = _logits(kind)
    ours = sampling.filter_logits(logits, temperature, top_k, top_p)
    theirs = hf_filter(logits, temperature, top_k, top_p)
    # The kept set must be the same, token for token.
    kept, hf_kept = torch.isfinite(ours), torch.isfinite(theirs)
    assert torch.equal(kept, hf_kept), (
        f"kept {kept.nonzero().flatten().tolist()[:20]} vs HF {hf_kept.nonzero().flatten().tolist()[:20]}"
    )
    # Kept logits and the sampling distribution: both divide the same float32 logits by
    # the same temperature and softmax them, so they agree to float32 rounding
    # (rtol 1e-6 is ~8 ulp; a wrong temperature or a missing renormalisation is >1e-2).
    torch.testing.assert_close(ours[kept], theirs[hf_kept], rtol=1e-6, atol=0)
    torch.testing.assert_close(ours.softmax(-1), theirs.softmax(-1), rtol=1e-6, atol=1e-9)


def test_settings_are_not_vacuous() -> None:
    """The filtering cases each remove something, and differently from each other's
    neighbours, so a filter that is skipped cannot pass them all."""
    logits = _logits("random")
    n = logits.numel()
    assert int(torch.isfinite(hf_filter(logits, 1.0, 40, None)).sum()) == 40
    assert int(torch.isfinite(hf_filter(logits, 1.0, None, 1e-4)).sum()) == 1
    nucleus = int(torch.isfinite(hf_filter(logits, 1.0, None, 0.9)).sum())
    assert 1 < nucleus < n - 100  # the tail is long: keeping it changes the kept set a lot
    # Temperature moves the nucleus: a temperature applied after top-p would differ.
    assert int(torch.isfinite(hf_filter(logits, 1.3, None, 0.5)).sum()) != int(
        torch.isfinite(hf_filter(logits, 1.0, None, 0.5)).sum()
    )
    ties = _logits("ties")
    assert int(torch.isfinite(hf_filter(ties, 1.0, 2, None)).sum()) == 4  # 4.0 and three 3.0s


@pytest.mark.parametrize(("temperature", "top_k", "top_p"), [(1.0, 3, None), (0.8, None, 0.7), (1.5, 4, 0.9)])
def test_sampler_draws_from_the_filtered_distribution(
    temperature: float, top_k: int | None, top_p: float | None
) -> None:
    """``choose`` with sampling on: only kept tokens, at HF's probabilities."""
    logits = torch.tensor([2.0, 1.8, 1.5, 1.0, 0.7, 0.3, 0.0, -0.5, -1.0, -2.0])
    probs = hf_filter(logits, temperature, top_k, top_p).softmax(-1).numpy().astype(np.float64)
    gen = sampling.make_generator(123)
    n = 4000
    counts = np.zeros(logits.numel())
    for _ in range(n):
        c = sampling.choose(logits, do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p,
                            generator=gen, n_top=0)  # fmt: skip
        assert c.argmax_id == 0
        counts[c.token_id] += 1
    assert counts[probs == 0].sum() == 0, f"drew filtered tokens: {counts}"
    # Each count is Binomial(n, p): 5 standard deviations (+1 for discreteness) fails by
    # chance with probability < 1e-5 per token, and the draws are seeded anyway. The
    # smallest kept probability here is ~0.06, 5 sd of its count is ~75 of ~240.
    sd = np.sqrt(n * probs * (1 - probs))
    assert np.all(np.abs(counts - n * probs) <= 5 * sd + 1), f"{counts / n} vs {probs}"
    # Some token other than the most likely was drawn: the sampler is not greedy.
    assert counts[1:].sum() > 0


def test_greedy_ignores_the_filters() -> None:
    logits = _logits("random")
    c = sampling.choose(logits, do_sample=False, temperature=0.3, top_k=2, top_p=0.1,
                        generator=sampling.make_generator(0), n_top=3)  # fmt: skip
    assert c.token_id == c.argmax_id == int(torch.argmax(logits))
    lp = torch.log_softmax(logits.double(), -1)
    assert [i for i, _ in c.top_k] == torch.topk(lp, 3).indices.tolist()
    # log-softmax of float32 logits against float64: float32 rounding, |lp| < 20.
    np.testing.assert_allclose([v for _, v in c.top_k], torch.topk(lp, 3).values.numpy(), rtol=0, atol=1e-5)


GEN_SETTINGS = [
    {"temperature": 0.7, "top_k": 5},
    {"temperature": 1.3, "top_p": 0.5},
    {"temperature": 1.0, "top_k": 200, "top_p": 0.3},
]


@pytest.fixture(scope="module")
def shared_loaded() -> Any:
    """One tiny model for the generate comparisons: capture removes its hooks and
    ``generate`` changes nothing, so sharing it only saves the build."""
    return loaded_tiny("llama", eager=False)


@pytest.mark.parametrize("settings", GEN_SETTINGS, ids=lambda s: "-".join(f"{k}{v}" for k, v in s.items()))
def test_sampled_capture_equals_hf_generate(settings: dict[str, Any], store: Any, shared_loaded: Any) -> None:
    """A sampled capture generates what HF's ``generate(do_sample=True)`` generates from
    the same seed, with the same temperature / top-k / top-p."""
    loaded = shared_loaded
    n_new, seed = 8, 11
    gen = {"max_new_tokens": n_new, "do_sample": True, "seed": seed, **settings}
    lean = {"attention_weights": False, "qkv": False, "mlp": False, "logits": False, "top_k_probs": 0}
    sc = make_scenario(generation=gen, capture=lean, reference_states=[])
    run = store.run(capture_run(sc, store, loaded, progress=False).run_id)
    prompt = render_ids(loaded.tokenizer, MESSAGES)
    torch.manual_seed(seed)
    with torch.inference_mode():
        out = loaded.model.generate(
            torch.tensor([prompt]), max_new_tokens=n_new, do_sample=True,
            temperature=settings["temperature"], top_k=settings.get("top_k", 0),
            top_p=settings.get("top_p", 1.0), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            pad_token_id=loaded.tokenizer.eos_token_id,
        )  # fmt: skip
    expected = out[0, len(prompt) :].tolist()
    assert run.meta["generated_token_ids"] == expected
    # Not greedy: the tiny model's logits are nearly flat, so sampling leaves the argmax.
    assert any(s["generated_token_id"] != s["logit_argmax_id"] for s in run.steps)
