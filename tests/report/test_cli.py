"""``actstore report``, ``heatmap`` and ``logit-lens`` through click's CliRunner."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from actstore.cli import main


def _invoke(*args: str) -> Any:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_report_command(two_run_store: Any, tmp_path: Path) -> None:
    first = two_run_store.run_ids()[0]
    res = _invoke(
        "report", "--store", two_run_store.location, "--runs", first, "--out", str(tmp_path), "--quiet"
    )
    assert res.exit_code == 0, res.output
    assert res.output.strip() == str(tmp_path / "report.html")
    assert (tmp_path / "intra_run_report.csv").is_file()


def test_report_command_runs_lists(two_run_store: Any, tmp_path: Path) -> None:
    a, b = two_run_store.run_ids()
    res = _invoke(
        "report", "--store", two_run_store.location, "--runs", f"{a},{b}", "--out", str(tmp_path), "-q"
    )
    assert res.exit_code == 0, res.output
    assert 'id="inter"' in (tmp_path / "report.html").read_text()


def test_report_unknown_run_is_one_clean_line(two_run_store: Any, tmp_path: Path) -> None:
    res = CliRunner().invoke(
        main, ["report", "--store", two_run_store.location, "--runs", "nope", "--out", str(tmp_path)]
    )
    assert res.exit_code == 2
    assert res.output.startswith("error:") and len(res.output.strip().splitlines()) == 1


def test_heatmap_command(two_run_store: Any, tmp_path: Path) -> None:
    run = two_run_store.run_ids()[0]
    res = _invoke("heatmap", run, "--store", two_run_store.location, "--source", "attn_weights", "--layers", "0-1",
                  "--steps", "0,1", "--per-head", "--normalize", "global", "--cmap", "magma", "--out", str(tmp_path))  # fmt: skip
    assert res.exit_code == 0, res.output
    files = sorted((tmp_path / run / "attn_weights").rglob("*.png"))
    heads = two_run_store.run(run).array("attn_weights").shape[1]
    assert len(files) == 2 * 2 * heads
    res = _invoke("heatmap", run, "--store", two_run_store.location, "--layers", "all", "--steps", "all", "--out",
                  str(tmp_path), "--reduce", "abs", "-q")  # fmt: skip
    assert res.exit_code == 0, res.output
    reader = two_run_store.run(run)
    assert (
        len(list((tmp_path / run / "hidden_out").glob("layer_*_step_*.png")))
        == len(reader.layers) * reader.n_steps
    )


def test_heatmap_bad_step_is_one_clean_line(two_run_store: Any, tmp_path: Path) -> None:
    res = CliRunner().invoke(main, ["heatmap", two_run_store.run_ids()[0], "--store", two_run_store.location,
                                    "--steps", "42", "--out", str(tmp_path)])  # fmt: skip
    assert res.exit_code == 2 and res.output.startswith("error:")


def test_heatmap_unknown_source_is_one_clean_line(two_run_store: Any, tmp_path: Path) -> None:
    res = CliRunner().invoke(main, ["heatmap", two_run_store.run_ids()[0], "--store", two_run_store.location,
                                    "--source", "nope", "--out", str(tmp_path)])  # fmt: skip
    assert res.exit_code == 2 and res.output.startswith("error:") and "unknown source 'nope'" in res.output
    assert len(res.output.strip().splitlines()) == 1


def test_logit_lens_command(
    two_run_store: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, loaded: Any
) -> None:
    import actstore.models.loading as loading

    monkeypatch.setattr(
        loading, "load_model", lambda cfg, **kw: loaded
    )  # the run's model is a tiny random one
    run = two_run_store.run(two_run_store.run_ids()[0])
    out = tmp_path / "lens" / "logit_lens.json"
    res = _invoke("logit-lens", run.id, "--store", two_run_store.location, "--steps", "0,1", "--top-k", "3",
                  "--out", str(out))  # fmt: skip
    assert res.exit_code == 0, res.output
    records = json.loads(out.read_text())
    assert len(records) == 2 * len(run.layers)
    for rec in records:
        assert {"layer", "argmax_token", "argmax_logprob", "kl_from_final", "top"} <= set(rec)
        assert len(rec["top"]) == 3 and rec["top"][0]["token"] == rec["argmax_token"]
    last = [r for r in records if r["layer"] == run.layers[-1]]
    assert all(abs(r["kl_from_final"]) < 1e-6 for r in last)  # the last layer is the reference
