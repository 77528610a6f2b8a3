"""End to end on the real embedded model: the CLI captures the bundled quick scenario,
and what is stored matches HF's own forward pass and generate()."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from actstore.cli import main
from actstore.models.loading import load_model
from actstore.scenario import load_scenario
from actstore.store.store import ActStore

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def captured(tmp_path_factory: Any) -> tuple[ActStore, str]:
    location = tmp_path_factory.mktemp("e2e") / "store.zarr"
    result = CliRunner().invoke(main, ["capture", str(ROOT / "scenarios" / "quick.yaml"), "--store", str(location), "-q"])
    assert result.exit_code == 0, result.output
    run_id = result.stdout.split("\t")[0].strip()
    return ActStore.open(location), run_id


def test_cli_capture_ls_inspect(captured: tuple[ActStore, str]) -> None:
    store, run_id = captured
    assert store.run_ids() == [run_id]
    ls = CliRunner().invoke(main, ["ls", "--store", store.location])
    assert ls.exit_code == 0 and run_id in ls.output
    shown = CliRunner().invoke(main, ["inspect", run_id, "--store", store.location])
    assert shown.exit_code == 0
    for word in ("llama", "30 layers", "hidden_out", "attn_weights", "references: calm, angry"):
        assert word in shown.output


def test_real_model_matches_hf(captured: tuple[ActStore, str]) -> None:
    store, run_id = captured
    run = store.run(run_id)
    sc = load_scenario(ROOT / "scenarios" / "quick.yaml")
    loaded = load_model(sc.model)
    tokens = run.tokens()
    with torch.inference_mode():
        out = loaded.model(input_ids=torch.tensor([tokens.tolist()]), output_hidden_states=True)
        gen = loaded.model.generate(
            torch.tensor([tokens[: run.prompt_len].tolist()]),
            attention_mask=torch.ones(1, run.prompt_len, dtype=torch.long),
            max_new_tokens=sc.generation.max_new_tokens, do_sample=False,
        )  # fmt: skip
    assert run.meta["generated_token_ids"] == gen[0, run.prompt_len :].tolist()
    hout = run.array("hidden_out").compute().astype(np.float32)  # stored as float16
    assert hout.shape == (30, run.n_positions, 576)
    for layer in (0, 14, 28):
        expected = out.hidden_states[layer + 1][0].numpy()
        # float16 storage: relative error of one rounding
        np.testing.assert_allclose(hout[layer], expected, rtol=2e-3, atol=2e-3 * np.abs(expected).max())
    cos = (hout[28] * out.hidden_states[29][0].numpy()).sum(-1) / (
        np.linalg.norm(hout[28], axis=-1) * np.linalg.norm(out.hidden_states[29][0].numpy(), axis=-1)
    )
    assert cos.min() > 0.9999
