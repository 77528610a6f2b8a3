"""One meaning per flag: ``--layers``, ``--steps``, ``--source``, ``--top-k`` and
``--compare`` behave the same in every command, and a bad value is one line, exit 2.

The store is synthetic (4 layers, 6 steps, references ``joy`` and ``a:b``): every
command here that loads a model must fail before it does, so none is needed.
"""

from __future__ import annotations

import io
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner, Result

from actstore.cli import main
from actstore.store.store import ActStore

from .synth import write_synthetic_run

ROOT = Path(__file__).resolve().parents[2]

# Every command that takes --layers, with the value column that tells its answers apart.
LAYER_COMMANDS: dict[str, tuple[list[str], str]] = {
    "cosine": (["query", "cosine"], "cosine"),
    "mae": (["query", "mae"], "mae"),
    "jaccard": (["query", "jaccard"], "jaccard"),
    "cosine-runs": (["query", "cosine", "--runs", "all", "--compare", "runs"], "cosine"),
    "cross-layer": (["query", "cross-layer"], "cosine"),
    "decomposition": (["query", "decomposition"], "norm_hidden_out"),
    "discrimination": (["query", "discrimination"], "separation"),
    "tables": (["query", "tables", "--table", "intra_run_drift"], "mean"),
    "pair": (["query", "pair", "initial", "final"], "cosine"),
    "group": (["query", "group", "initial", "final", "reference:joy"], "cos_to_centroid"),
}


@pytest.fixture(scope="module")
def store(tmp_path_factory: Any) -> ActStore:
    st = ActStore.open(tmp_path_factory.mktemp("flags") / "store.zarr", create=True)
    for seed in range(2):
        write_synthetic_run(st, name="flags", seed=seed, n_layers=4, prompt_len=12, n_steps=4,
                            width=32, n_snapshots=3, labels=("joy", "a:b"), store_dtype="float32")  # fmt: skip
    return st


def _run(store: ActStore, *args: str) -> Result:
    return CliRunner().invoke(main, [*args, "--store", store.location])


def _one_line_error(res: Result, *needles: str) -> str:
    assert res.exit_code == 2, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
    assert "Traceback" not in res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), res.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _csv(store: ActStore, *args: str) -> pd.DataFrame:
    res = _run(store, *args, "--format", "csv")
    assert res.exit_code == 0, res.output
    return pd.read_csv(io.StringIO(res.stdout))


# ---- --layers ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(LAYER_COMMANDS))
def test_a_range_past_the_captured_layers_is_clipped_in_every_command(store: ActStore, name: str) -> None:
    args, column = LAYER_COMMANDS[name]
    clipped = _csv(store, *args, "--layers", "2-99")
    exact = _csv(store, *args, "--layers", "2-3")
    layer_cols = [c for c in ("layer", "layer_a", "layer_b", "min_layer") if c in clipped]
    assert layer_cols and all(set(clipped[c]) <= {2, 3} for c in layer_cols)
    assert set(clipped[layer_cols[0]]) == {2, 3} or name == "tables"
    pd.testing.assert_frame_equal(clipped, exact)
    assert clipped[column].notna().all()
    # Huge ranges run in a subprocess under a memory limit (below): a regression here
    # would take the test host down.
    pd.testing.assert_frame_equal(_csv(store, *args, "--layers", "0-999"), _csv(store, *args, "--layers", "all"))


def test_the_clipped_range_answers_the_numbers_of_the_captured_layers(store: ActStore) -> None:
    run = store.run("latest")
    df = _csv(store, "query", "cosine", "--layers", "2-99")
    x = run.array("hidden_out").compute().astype(np.float64)
    a, b = x[:, run.prefill_position], x[:, run.final_position]
    want = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    np.testing.assert_allclose(df["cosine"], want[[2, 3]], rtol=1e-6)
    assert "note: --layers 2-99: using [2, 3]" in _run(store, "query", "cosine", "--layers", "2-99").stderr


@pytest.mark.parametrize("name", [*LAYER_COMMANDS, "logit-lens", "heatmap"])
@pytest.mark.parametrize("value", ["5-999", "7", "0-3,9", "x-y", "3-1"])
def test_a_layer_selection_that_misses_is_one_line(store: ActStore, tmp_path: Path, name: str, value: str) -> None:
    if name == "logit-lens":
        args = ["query", "logit-lens"]
    elif name == "heatmap":
        args = ["heatmap", "latest", "--out", str(tmp_path / "maps")]
    else:
        args = LAYER_COMMANDS[name][0]
    line = _one_line_error(_run(store, *args, "--layers", value), "--layers")
    if value[0].isdigit() and "-" not in value[-2:]:
        assert "captured: 0-3" in line or "backwards" in line
    assert not (tmp_path / "maps").exists()


def test_listed_layers_keep_their_order_and_a_range_inside_a_list_is_clipped(store: ActStore) -> None:
    df = _csv(store, "query", "mae", "--layers", "3,0-1,2-50")
    assert list(df["layer"]) == [3, 0, 1, 2]


def test_a_huge_range_stays_small_under_a_memory_limit(store: ActStore) -> None:
    """With the range expanded into a list (as before), 2 GiB of address space ran out."""
    limit = 2 * 2**30
    for args in (["query", "cosine"], ["query", "cross-layer"], ["query", "decomposition"]):
        proc = subprocess.run(
            [sys.executable, "-m", "actstore", *args, "--layers", "0-99999999999",
             "--store", store.location, "--format", "csv"],
            capture_output=True, text=True, timeout=120,
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit)),
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        assert "Traceback" not in proc.stderr
        assert set(pd.read_csv(io.StringIO(proc.stdout)).filter(like="layer").stack()) == {0, 1, 2, 3}


# ---- --steps -------------------------------------------------------------------------------
@pytest.mark.parametrize("cmd", [["query", "decomposition"], ["query", "logit-lens"], ["logit-lens", "latest"],
                                 ["heatmap", "latest"]])  # fmt: skip
@pytest.mark.parametrize("steps", ["99", "4", "-5", "0,-99", "a"])
def test_out_of_range_steps_are_one_line_everywhere(store: ActStore, tmp_path: Path, cmd: list[str], steps: str) -> None:
    extra = ["--out", str(tmp_path / "out")] if cmd[0] in ("heatmap", "logit-lens") else []
    line = _one_line_error(_run(store, *cmd, "--steps", steps, *extra), "steps")
    if steps != "a":
        assert "0..3" in line
    assert not (tmp_path / "out").exists()


def test_in_range_negative_steps_count_from_the_end(store: ActStore) -> None:
    last = _csv(store, "query", "decomposition", "--steps", "-1")
    assert set(last["step"]) == {3}
    pd.testing.assert_frame_equal(last, _csv(store, "query", "decomposition", "--steps", "3"))


# ---- --source, --top-k ----------------------------------------------------------------------
@pytest.mark.parametrize("source", ["logits", "embeddings"])
@pytest.mark.parametrize(
    "cmd",
    [["query", "cosine"], ["query", "mae"], ["query", "jaccard"], ["query", "cross-layer"],
     ["query", "trajectory", "--layer", "0", "--neuron", "0"], ["query", "discrimination"]],
)  # fmt: skip
def test_a_source_without_layers_is_one_line_in_per_layer_queries(store: ActStore, cmd: list[str], source: str) -> None:
    _one_line_error(_run(store, *cmd, "--source", source), source)


@pytest.mark.parametrize("cmd", [["query", "logit-lens"], ["logit-lens", "latest"]])
@pytest.mark.parametrize("top_k", ["-5", "0"])
def test_top_k_below_one_is_one_line(store: ActStore, tmp_path: Path, cmd: list[str], top_k: str) -> None:
    out = tmp_path / "lens.json"
    extra = ["--out", str(out)] if cmd[0] == "logit-lens" else []
    _one_line_error(_run(store, *cmd, "--top-k", top_k, *extra), "--top-k")
    assert not out.exists()


# ---- --compare and labels with ':' ---------------------------------------------------------
def test_a_label_with_a_colon_is_addressable(store: ActStore) -> None:
    run = store.run("latest")
    snaps = run.snapshots("hidden_out").compute().astype(np.float64)
    refs = run.references("hidden_out").compute().astype(np.float64)
    a, b = snaps[1], refs[run.reference_labels.index("a:b")]
    want = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    for compare in ("snapshot:1:reference:a:b", "reference:a:b:snapshot:1"):
        df = _csv(store, "query", "cosine", "--compare", compare)
        assert set(df["state_a"]) | set(df["state_b"]) == {"snapshot:1", "reference:a:b"}
        np.testing.assert_allclose(df["cosine"], want, rtol=1e-6)
    cross = _csv(store, "query", "cross-layer", "--state", "reference:a:b")
    diag = cross[cross["layer_a"] == cross["layer_b"]]["cosine"]
    np.testing.assert_allclose(diag, 1.0, rtol=1e-6)


@pytest.mark.parametrize(
    "compare,needle",
    [("reference:x:reference:y:reference:z", "two ways"), ("reference:nope:final", "no reference 'nope'"),
     ("final:final:final", "two states"), ("step:x:final", "whole number")],
)  # fmt: skip
def test_a_compare_that_reads_wrong_is_one_line(store: ActStore, compare: str, needle: str) -> None:
    _one_line_error(_run(store, "query", "cosine", "--compare", compare), needle)


# ---- the real model (slow) -----------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize(
    "args",
    [["query", "cosine"], ["query", "cross-layer"], ["query", "decomposition"], ["query", "discrimination"],
     ["query", "logit-lens", "--steps", "0", "--device", "cpu"]],
)  # fmt: skip
def test_smollm2_a_range_past_layer_29_answers_layers_28_and_29(smol: Any, args: list[str]) -> None:
    assert smol.run.layers == list(range(30))
    clipped = _csv(smol.store, *args, "--layers", "28-99")
    exact = _csv(smol.store, *args, "--layers", "28-29")
    for col in [c for c in ("layer", "layer_a", "layer_b") if c in clipped]:
        assert set(clipped[col]) == {28, 29}
    pd.testing.assert_frame_equal(clipped, exact)
