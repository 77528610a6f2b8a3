"""The query CLI on the real SmolLM2 capture (quick scenario). The metric and analysis
tests above also run on this capture through the ``any_run`` / ``model_run`` fixtures."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from click.testing import CliRunner

from actstore.cli import main

pytestmark = pytest.mark.slow


def test_cosine_layers_29_33_on_latest(smol: Any) -> None:
    res = CliRunner().invoke(main, ["query", "cosine", "--layers", "29-33", "--store", smol.store.location])
    # 30 layers (0-29): the range answers for layer 29 and says so
    assert res.exit_code == 0, res.output
    assert "using [29]" in res.stderr and res.stdout.count("hidden_out") == 1
    res = CliRunner().invoke(
        main, ["query", "cosine", "--layers", "25-29", "--format", "csv", "--store", smol.store.location]
    )
    assert res.exit_code == 0, res.output
    df = pd.read_csv(io.StringIO(res.output))
    assert df["layer"].tolist() == [25, 26, 27, 28, 29] and df["cosine"].between(-1, 1).all()


def test_logit_lens_cli_on_real_model(smol: Any, tmp_path: Path) -> None:
    out = tmp_path / "logit_lens.json"
    res = CliRunner().invoke(main, ["query", "logit-lens", "--steps", "0,1", "--top-k", "3", "--device", "cpu",
                                    "--json-out", str(out), "--format", "csv", "--store", smol.store.location])  # fmt: skip
    assert res.exit_code == 0, res.output
    records = json.loads(out.read_text())
    assert len(records) == 2 * 30
    run = smol.run
    last = [r for r in records if r["layer"] == 29]
    # greedy decoding: the last layer's argmax is the token each step generated
    assert [r["argmax_token"] for r in last] == [
        smol.loaded.tokenizer.decode([run.steps[s]["generated_token_id"]]) for s in (0, 1)
    ]
    assert all(r["kl_from_final"] == pytest.approx(0, abs=1e-6) for r in last)
    assert max(r["kl_from_final"] for r in records if r["layer"] == 0) > 1


def test_discrimination_names_a_layer(smol: Any) -> None:
    res = CliRunner().invoke(
        main, ["query", "discrimination", "--top", "1", "--format", "json", "--store", smol.store.location]
    )
    assert res.exit_code == 0, res.output
    rows = json.loads(res.output)
    assert {r["source"] for r in rows} == {"hidden_in", "hidden_out", "attn_out", "mlp_down_out"}
    assert all(0 <= r["layer"] < 30 and r["rank"] == 1 for r in rows)
