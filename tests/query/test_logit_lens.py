"""Logit lens against an independent computation: the model's own modules applied with
torch to vectors read straight from Zarr, and log-softmax of the stored logits."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from actstore.query.logit_lens import logit_lens, write_logit_lens_json

from .helpers import raw


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_logit_lens_matches_independent_computation(model_run: Any, tmp_path: Path) -> None:
    run, loaded = model_run.run, model_run.loaded
    df = logit_lens(run, loaded, steps=[0, -1], top_k=5)
    assert len(df) == 2 * len(run.layers)
    hidden = raw(run, "hidden_out")
    model = loaded.model
    final_norm, head = model.model.norm, model.lm_head  # llama layout, independent of resolve_sites
    for step, pos in ((0, run.prompt_len - 1), (run.n_steps - 1, run.n_positions - 1)):
        with torch.inference_mode():
            h = torch.from_numpy(hidden[:, pos].astype(np.float32))
            expected = _log_softmax(head(final_norm(h)).double().numpy())  # (L, V)
        sub = df[df.step == step].sort_values("layer")
        assert (sub["position"] == pos).all()
        kl = (np.exp(expected[-1]) * (expected[-1] - expected)).sum(-1)
        np.testing.assert_allclose(
            sub["kl_from_final"], np.maximum(kl, 0), rtol=1e-4, atol=2e-4
        )  # float32 lens
        np.testing.assert_array_equal(sub["argmax_id"], expected.argmax(-1))
        np.testing.assert_allclose(sub["argmax_logprob"], expected.max(-1), rtol=1e-4, atol=2e-4)
        top = sub["top"].iloc[3 % len(sub)]
        assert [t["id"] for t in top] == list(np.argsort(-expected[3 % len(sub)])[:5])
        # the last layer's lens is the model's own next-token distribution
        if "logits" in run.sources:
            stored = _log_softmax(raw(run, "logits")[pos])
            assert sub["argmax_id"].iloc[-1] == stored.argmax()
            assert sub["argmax_logprob"].iloc[-1] == pytest.approx(stored.max(), abs=2e-2)
        assert sub["kl_from_final"].iloc[-1] == pytest.approx(0, abs=1e-6)

    path = write_logit_lens_json(df, tmp_path / "logit_lens.json")
    records = json.loads(path.read_text())
    assert len(records) == len(df)
    assert set(records[0]) == {"step", "layer", "argmax_token", "argmax_logprob", "kl_from_final", "top"}
    assert set(records[0]["top"][0]) == {"token", "logprob"}


def test_logit_lens_position_out_of_range(model_run: Any) -> None:
    from actstore.errors import SelectionError

    with pytest.raises(SelectionError):
        logit_lens(model_run.run, model_run.loaded, steps=[1], position=1)
