"""The four CSVs: the seed's names and columns, and numbers equal to an independent
NumPy computation on vectors read straight from the Zarr arrays."""

from __future__ import annotations

from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from .conftest import MESSAGES_A
from .helpers import SOURCES, cosine, mae, overlap, run_group, vectors_at

# The seed's columns (notebooks/compare_runs.py), written out here on purpose.
SUMMARY = [
    "mean_cosine", "std_cosine", "median_cosine", "min_cosine", "most_divergent_layer",
    "mean_MAE", "std_MAE", "median_MAE", "max_MAE_layer",
    "mean_overlap", "std_overlap", "median_overlap", "min_overlap", "min_overlap_layer",
]  # fmt: skip
SEED_COLUMNS = {
    "comparison_report.csv": ["state", "pair", "run_a", "run_b", "generated_a", "generated_b", "prompt_a",
                              "prompt_b", "source", *SUMMARY],
    "comparison_cosines.csv": ["state", "pair", "run_a", "run_b", "generated_a", "generated_b", "source",
                               "layer", "cosine", "MAE", "overlap"],
    "intra_run_report.csv": ["run", "generated", "prompt", "source", *SUMMARY],
    "intra_run_cosines.csv": ["run", "source", "layer", "cosine", "MAE", "overlap"],
}  # fmt: skip
RTOL, ATOL = 1e-6, 1e-9


@pytest.mark.parametrize("name", list(SEED_COLUMNS))
def test_csv_names_and_columns(two_run_report: Path, name: str) -> None:
    df = pd.read_csv(two_run_report.parent / name)
    assert list(df.columns) == SEED_COLUMNS[name]
    assert len(df) > 0


def test_single_run_comparison_csvs_hold_header_only(one_run_report: Path) -> None:
    for name in ("comparison_report.csv", "comparison_cosines.csv"):
        df = pd.read_csv(one_run_report.parent / name)
        assert list(df.columns) == SEED_COLUMNS[name] and df.empty
    assert len(pd.read_csv(one_run_report.parent / "intra_run_report.csv")) == len(SOURCES)


def _state_vectors(group: Any, state: str, source: str) -> np.ndarray:
    meta = group.attrs["run"]
    pos = meta["prompt_len"] - 1 if state == "initial" else meta["n_positions"] - 1
    return vectors_at(group, source, pos)


def test_intra_run_numbers_match_numpy(two_run_store: Any, two_run_report: Path) -> None:
    per_layer = pd.read_csv(two_run_report.parent / "intra_run_cosines.csv")
    summary = pd.read_csv(two_run_report.parent / "intra_run_report.csv")
    for run_id in two_run_store.run_ids():
        group = run_group(two_run_store, run_id)
        layers = group.attrs["run"]["layers"]
        for source in SOURCES:
            a, b = _state_vectors(group, "initial", source), _state_vectors(group, "final", source)
            cos, err, ovl = cosine(a, b), mae(a, b), overlap(a, b)
            got = per_layer[(per_layer["run"] == run_id) & (per_layer["source"] == source)].sort_values(
                "layer"
            )
            assert got["layer"].tolist() == layers
            np.testing.assert_allclose(got["cosine"], cos, rtol=RTOL, atol=ATOL)
            np.testing.assert_allclose(got["MAE"], err, rtol=RTOL, atol=ATOL)
            np.testing.assert_allclose(got["overlap"], ovl, rtol=RTOL, atol=ATOL)
            row = summary[(summary["run"] == run_id) & (summary["source"] == source)].iloc[0]
            np.testing.assert_allclose(
                [row["mean_cosine"], row["std_cosine"], row["median_cosine"], row["min_cosine"],
                 row["mean_MAE"], row["std_MAE"], row["median_MAE"], row["mean_overlap"], row["min_overlap"]],
                [cos.mean(), cos.std(), np.median(cos), cos.min(), err.mean(), err.std(), np.median(err),
                 ovl.mean(), ovl.min()], rtol=RTOL, atol=ATOL,
            )  # fmt: skip
            assert row["most_divergent_layer"] == layers[int(cos.argmin())]
            assert row["max_MAE_layer"] == layers[int(err.argmax())]
            assert row["min_overlap_layer"] == layers[int(ovl.argmin())]


def test_inter_run_numbers_match_numpy(two_run_store: Any, two_run_report: Path) -> None:
    df = pd.read_csv(two_run_report.parent / "comparison_cosines.csv")
    report = pd.read_csv(two_run_report.parent / "comparison_report.csv")
    ids = two_run_store.run_ids()
    pairs = list(combinations(ids, 2))
    assert len(report) == len(pairs) * 2 * len(SOURCES)
    for a_id, b_id in pairs:
        ga, gb = run_group(two_run_store, a_id), run_group(two_run_store, b_id)
        assert set(report[(report["run_a"] == a_id) & (report["run_b"] == b_id)]["pair"]) == {
            f"{a_id}  vs  {b_id}"
        }
        for state in ("initial", "final"):
            for source in SOURCES:
                a, b = _state_vectors(ga, state, source), _state_vectors(gb, state, source)
                got = df[(df["run_a"] == a_id) & (df["run_b"] == b_id) & (df["state"] == state)
                         & (df["source"] == source)].sort_values("layer")  # fmt: skip
                np.testing.assert_allclose(got["cosine"], cosine(a, b), rtol=RTOL, atol=ATOL)
                np.testing.assert_allclose(got["MAE"], mae(a, b), rtol=RTOL, atol=ATOL)
                np.testing.assert_allclose(got["overlap"], overlap(a, b), rtol=RTOL, atol=ATOL)


def test_text_columns(two_run_store: Any, two_run_report: Path) -> None:
    summary = pd.read_csv(two_run_report.parent / "intra_run_report.csv")
    run = two_run_store.run(two_run_store.run_ids()[0])
    row = summary[summary["run"] == run.id].iloc[0]
    # the conversation as "role: content", one line per message (the first run is MESSAGES_A's)
    assert row["prompt"] == "\n".join(f"{m['role']}: {m['content']}" for m in MESSAGES_A)
    assert (
        str(row["generated"]) == " ".join(run.generated_text().split()) or run.generated_text().strip() == ""
    )
