"""``actstore query`` through click's CliRunner: exit codes and parseable output."""

from __future__ import annotations

import io
import json
from typing import Any

import pandas as pd
import pytest
from click.testing import CliRunner

from actstore.cli import main
from actstore.query.layers import choose_layers


def _run(store: Any, *args: str) -> Any:
    return CliRunner().invoke(main, ["query", *args, "--store", store.location])


def _csv(out: str) -> pd.DataFrame:
    return pd.read_csv(io.StringIO(out))


def test_parse_layers() -> None:
    def pick(text: str) -> list[int] | None:
        return choose_layers(text, range(40)).layers

    assert pick("all") is None
    assert pick("29-33") == [29, 30, 31, 32, 33]
    assert pick("0,5,10") == [0, 5, 10]
    assert pick("0-2,10,1") == [0, 1, 2, 10]


def test_metric_defaults_answer_about_latest_run(synth_store: Any) -> None:
    res = _run(synth_store, "cosine", "--layers", "1-2", "--format", "csv")
    assert res.exit_code == 0, res.output
    df = _csv(res.output)
    assert list(df.columns) == ["run", "state_a", "state_b", "source", "layer", "cosine"]
    assert df["run"].unique().tolist() == [synth_store.run_ids()[-1]] and df["layer"].tolist() == [1, 2]
    assert set(df["source"]) == {"hidden_out"}
    table = _run(synth_store, "mae")
    assert table.exit_code == 0 and "mae" in table.output.splitlines()[0]


@pytest.mark.parametrize(
    ("args", "columns", "rows"),
    [
        (
            ["jaccard", "--runs", "all", "--compare", "runs", "--layers", "0,3"],
            ["run_a", "run_b", "state"],
            3 * 2 * 2,
        ),
        (
            ["cosine", "--compare", "snapshots-references", "--layers", "0"],
            ["message", "role", "reference"],
            5 * 3,
        ),
        (
            ["mae", "--compare", "step:1:snapshot:2", "--source", "hidden_in", "--source", "attn_out"],
            ["state_a"],
            8,
        ),
        (
            ["cosine", "--runs", "synth0", "--summary"],
            ["mean_cosine", "most_divergent_layer", "min_overlap_layer"],
            2,
        ),
        (["jaccard", "--frac", "0.05", "--magnitude"], ["jaccard"], 4),
    ],
)
def test_metric_variants_csv_and_json(
    synth_store: Any, args: list[str], columns: list[str], rows: int
) -> None:
    res = _run(synth_store, *args, "--format", "csv")
    assert res.exit_code == 0, res.output
    df = _csv(res.output)
    assert set(columns) <= set(df.columns) and len(df) == rows
    res = _run(synth_store, *args, "--format", "json")
    assert res.exit_code == 0 and len(json.loads(res.output)) == rows


@pytest.mark.parametrize(
    ("args", "rows"),
    [
        (["cross-layer"], 16),
        (["cross-layer", "--matrix", "--state", "initial"], 4),
        (["trajectory", "--layer", "2", "--neuron", "7"], 6),
        (["trajectory", "--layer", "2", "--neuron", "7", "--over", "positions"], 45),
        (["decomposition", "--steps", "0,-1"], 8),
        (["discrimination", "--top", "1"], 4),
        (["tables", "--table", "role_gap"], 4),
    ],
)
def test_analysis_commands(synth_store: Any, args: list[str], rows: int) -> None:
    res = _run(synth_store, *args, "--format", "csv")
    assert res.exit_code == 0, res.output
    assert len(_csv(res.output)) == rows
    assert _run(synth_store, *args).exit_code == 0  # table format


def test_tables_all_formats(synth_store: Any) -> None:
    res = _run(synth_store, "tables", "--format", "json")
    assert res.exit_code == 0
    assert set(json.loads(res.output)) == {
        "intra_run_drift",
        "message_reference",
        "reference_source",
        "role_gap",
    }
    table = _run(synth_store, "tables")
    assert table.exit_code == 0 and "# message_reference" in table.output and "best" in table.output


@pytest.mark.parametrize(
    "args",
    [
        ["cosine", "--layers", "29-33"],  # no layer of the range was captured
        ["cosine", "--layers", "2,9"],  # a listed layer that was not captured
        ["cosine", "--compare", "nonsense"],
        ["cosine", "--compare", "reference:nope:final"],
        ["cosine", "--runs", "no-such-run"],
        ["trajectory", "--layer", "0", "--neuron", "100000"],
        ["cosine", "--source", "k"],
        ["cosine", "--source", "nope"],  # not a source at all
        ["trajectory", "--layer", "0", "--neuron", "0", "--source", "nope"],
    ],
)
def test_user_errors_exit_2_with_one_line(synth_store: Any, args: list[str]) -> None:
    res = _run(synth_store, *args)
    assert res.exit_code == 2, res.output
    assert res.output.strip().startswith("error:") and len(res.output.strip().splitlines()) == 1


def test_a_range_past_the_last_layer_uses_the_captured_part(synth_store: Any) -> None:
    res = CliRunner().invoke(main, ["query", "cosine", "--layers", "2-9", "--format", "csv", "--store", synth_store.location])
    assert res.exit_code == 0, res.output
    assert "note: --layers 2-9: using [2, 3]" in res.stderr
    assert sorted(set(pd.read_csv(io.StringIO(res.stdout))["layer"])) == [2, 3]


def test_bad_option_values_are_usage_errors(synth_store: Any) -> None:
    assert _run(synth_store, "cosine", "--layers", "x-y").exit_code == 2
    assert _run(synth_store, "jaccard", "--frac", "0").exit_code == 2


def test_every_query_command_has_help() -> None:
    res = CliRunner().invoke(main, ["query", "--help"])
    assert res.exit_code == 0
    for cmd in ("cosine", "mae", "jaccard", "cross-layer", "trajectory", "decomposition", "discrimination",
                "tables", "logit-lens"):  # fmt: skip
        assert cmd in res.output
        sub = CliRunner().invoke(main, ["query", cmd, "--help"])
        assert sub.exit_code == 0 and "--store" in sub.output


def test_a_command_given_the_wrong_number_of_states_lists_them(synth_store: Any) -> None:
    """``query depth`` takes one state; ``initial`` over three runs is three: the error names
    them as RUN@STATE, comma separated, and says how to pick one."""
    ids = synth_store.run_ids()
    res = CliRunner().invoke(main, ["query", "depth", "initial", "--runs", "all", "--store", str(synth_store.location)])
    assert res.exit_code == 2
    shown = ", ".join(f"{i}@initial" for i in ids)
    assert f"depth takes 1 state(s), got {len(ids)} ({shown}); name one run per state with RUN@STATE" in res.output
