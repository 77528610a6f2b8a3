"""``actstore validate`` and ``actstore.validate_scenario``: every problem of a scenario at
its field, not only the first. Expectations are written from the scenario format (the
README), never read back from the code under test."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import actstore
from actstore.cli import main
from actstore.errors import ScenarioError
from actstore.scenario import load_scenario

ROOT = Path(__file__).resolve().parents[1]
SEED_RUNS = Path("/work/shared/fixtures/seed-runs")

GOOD = """\
name: tiny
model:
  id: smollm2
prompt:
  messages:
    - role: system
      content: "sys"
    - role: user
      content: "hi"
generation:
  max_new_tokens: 4
"""

# Three mistakes in three sections: a dtype that does not exist, a generation length
# below 1, a layer listed twice.
THREE_ERRORS = """\
name: tiny
model:
  id: smollm2
  dtype: float8
prompt:
  messages:
    - role: user
      content: "hi"
generation:
  max_new_tokens: 0
capture:
  layers: [1, 4, 1]
"""

MULTI_PROMPT = """\
name: multi
model:
  id: smollm2
prompt:
  - messages:
      - {role: user, content: "fine"}
  - messages:
      - {role: user, content: "fine"}
      - {role: bot, content: "wrong role"}
  - messages: []
"""


def write(tmp_path: Path, text: str, name: str = "s.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def fields(problems: list[actstore.Problem]) -> list[str]:
    return [p.field for p in problems]


# ---- the Python API -------------------------------------------------------------------------
def test_three_errors_in_three_sections_all_reported(tmp_path: Path) -> None:
    path = write(tmp_path, THREE_ERRORS)
    problems = actstore.validate_scenario(path)
    assert sorted(fields(problems)) == ["capture.layers[2]", "generation.max_new_tokens", "model.dtype"]
    assert {p.severity for p in problems} == {"error"}
    assert {p.file for p in problems} == {str(path)}
    by_field = {p.field: p for p in problems}
    assert "float8" in by_field["model.dtype"].message and "bfloat16" in by_field["model.dtype"].fix
    assert by_field["generation.max_new_tokens"].line() == (
        f"{path}: generation.max_new_tokens: {by_field['generation.max_new_tokens'].message} "
        f"({by_field['generation.max_new_tokens'].fix})"
    )


def test_loading_refuses_exactly_when_validate_finds_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, THREE_ERRORS)
    first = actstore.validate_scenario(path)[0]
    with pytest.raises(ScenarioError) as info:
        load_scenario(path)
    assert str(info.value) == first.line() + " (+2 more)"
    assert actstore.validate_scenario(write(tmp_path, GOOD, "good.yaml")) == []


def test_a_mapping_validates_like_its_file(tmp_path: Path) -> None:
    import yaml

    data = yaml.safe_load(THREE_ERRORS)
    problems = actstore.validate_scenario(data)
    assert sorted(fields(problems)) == ["capture.layers[2]", "generation.max_new_tokens", "model.dtype"]
    assert {p.file for p in problems} == {"<dict>"}


GOOD_FILES = [ROOT / "scenarios" / "quick.yaml", ROOT / "scenarios" / "emotions.yaml"]
SEED_FILES = sorted(SEED_RUNS.glob("*.yaml")) if SEED_RUNS.is_dir() else []


@pytest.mark.parametrize("path", GOOD_FILES, ids=lambda p: p.name)
def test_bundled_scenarios_have_no_problem(path: Path) -> None:
    assert actstore.validate_scenario(path) == []
    assert actstore.validate_scenario(path, strict=True) == []


@pytest.mark.skipif(not SEED_FILES, reason="Activation Lab fixtures not present")
@pytest.mark.parametrize("path", SEED_FILES, ids=lambda p: p.name)
def test_activation_lab_fixture_scenarios_have_no_problem(path: Path) -> None:
    assert actstore.validate_scenario(path, strict=True) == []


def test_unknown_key_warns_with_nearest_key_and_strict_makes_it_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD + "  max_tokens: 5\n")  # under generation:
    [warning] = actstore.validate_scenario(path)
    assert (warning.field, warning.severity) == ("generation.max_tokens", "warning")
    assert "'max_new_tokens'" in warning.message
    [error] = actstore.validate_scenario(path, strict=True)
    assert (error.field, error.severity) == ("generation.max_tokens", "error")


def test_strict_still_checks_the_rest_of_the_section(tmp_path: Path) -> None:
    # an unknown key beside a sampling number that is wrong only because do_sample is true
    path = write(tmp_path, GOOD + "  do_sample: true\n  temperature: 0\n  top_p: 2.0\n  max_tokens: 5\n")
    problems = actstore.validate_scenario(path, strict=True)
    assert sorted(fields(problems)) == ["generation.max_tokens", "generation.temperature", "generation.top_p"]


def test_yaml_syntax_error_is_one_problem_naming_its_line(tmp_path: Path) -> None:
    # line 3 holds a second ':' in a plain value, which YAML refuses
    path = write(tmp_path, "name: x\nmodel:\n  id: a: b\nprompt: {}\n")
    [problem] = actstore.validate_scenario(path)
    assert problem.field == "" and problem.severity == "error"
    assert "line 3" in problem.message and "YAML" in problem.message
    assert problem.line().startswith(f"{path}: line 3")


def test_every_duplicate_key_is_reported_at_its_field_and_line(tmp_path: Path) -> None:
    text = GOOD + "  max_new_tokens: 8\nname: again\n"  # lines 12 and 13
    problems = actstore.validate_scenario(write(tmp_path, text))
    assert fields(problems) == ["generation.max_new_tokens", "name"]
    assert "line 12" in problems[0].message and "line 13" in problems[1].message
    assert all("duplicate key" in p.message for p in problems)


def test_multi_prompt_problems_name_the_prompt_index(tmp_path: Path) -> None:
    problems = actstore.validate_scenario(write(tmp_path, MULTI_PROMPT))
    assert sorted(fields(problems)) == ["prompt[1].messages[1].role", "prompt[2].messages"]


@pytest.mark.parametrize(
    ("text", "needle"),
    [("", "an empty file"), ("- a\n- b\n", "a list"), ("just text\n", "'just text'")],
)
def test_not_a_mapping_is_one_file_level_problem(tmp_path: Path, text: str, needle: str) -> None:
    [problem] = actstore.validate_scenario(write(tmp_path, text))
    assert problem.field == "" and problem.severity == "error"
    assert "mapping" in problem.message and needle in problem.message


def test_missing_file_is_one_problem(tmp_path: Path) -> None:
    [problem] = actstore.validate_scenario(tmp_path / "nope.yaml")
    assert problem.field == "" and "not found" in problem.message


# ---- the model checks -----------------------------------------------------------------------
def scenario_on(model_id: str | Path, layers: str, user: str = "hi", reference: str = "calm") -> str:
    return (
        f"name: m\nmodel:\n  id: {json.dumps(str(model_id))}\n"
        f"prompt:\n  messages:\n    - {{role: user, content: {json.dumps(user)}}}\n"
        f"generation:\n  max_new_tokens: 4\ncapture:\n  layers: {layers}\n"
        f"reference_states:\n  - label: r\n    messages:\n      - {{role: user, content: {json.dumps(reference)}}}\n"
    )


def test_model_check_on_the_tiny_model(tmp_path: Path, tiny_folder: Path) -> None:
    # the tiny llama has 3 layers (0..2) and 512 positions
    path = write(tmp_path, scenario_on(tiny_folder, "[0, 2, 3, 7]"))
    assert actstore.validate_scenario(path) == []  # without a model nothing is out of range
    problems = actstore.validate_scenario(path, model=True)
    assert fields(problems) == ["capture.layers[2]", "capture.layers[3]"]
    assert "3 layers" in problems[0].message and "0..2" in problems[0].fix


def test_model_check_on_the_tiny_model_counts_tokens(tmp_path: Path, tiny_folder: Path) -> None:
    long = " ".join(["word"] * 700)  # > 512 tokens whatever the tokenizer does with spaces
    path = write(tmp_path, scenario_on(tiny_folder, "all", user=long, reference=long))
    problems = actstore.validate_scenario(path, model=True)
    assert fields(problems) == ["prompt.messages", "reference_states[0].messages"]
    assert all("512" in p.message for p in problems)


def test_model_check_on_the_built_in_model(tmp_path: Path) -> None:
    # SmolLM2-135M has 30 layers (0..29); only its config is read
    path = write(tmp_path, scenario_on("smollm2", "[0, 29, 30]"))
    problems = actstore.validate_scenario(path, model=True)
    assert fields(problems) == ["capture.layers[2]"]
    assert "30 layers" in problems[0].message


def test_model_check_against_another_model(tmp_path: Path, tiny_folder: Path) -> None:
    path = write(tmp_path, scenario_on("smollm2", "[2, 3]"))
    assert fields(actstore.validate_scenario(path, model=str(tiny_folder))) == ["capture.layers[1]"]


def test_model_that_cannot_be_found_is_one_problem_on_model_id(tmp_path: Path) -> None:
    path = write(tmp_path, scenario_on(tmp_path / "no-such-model", "[0]"))
    [problem] = actstore.validate_scenario(path, model=True)
    assert (problem.field, problem.severity) == ("model.id", "error")
    assert "no-such-model" in problem.message


# ---- the command ----------------------------------------------------------------------------
def run_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "actstore", "validate", *map(str, args)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def test_cli_exit_codes_and_lines_per_file(tmp_path: Path) -> None:
    good, bad = write(tmp_path, GOOD, "good.yaml"), write(tmp_path, THREE_ERRORS, "bad.yaml")
    ok = run_cli(good)
    assert (ok.returncode, ok.stdout) == (0, f"{good}: ok\n"), ok
    res = run_cli(good, bad)
    assert res.returncode == 2, res
    lines = res.stdout.splitlines()
    assert lines[0] == f"{good}: ok"
    assert len(lines) == 4 and all(line.startswith(f"error: {bad}: ") for line in lines[1:]), lines
    assert {line.split(": ")[2] for line in lines[1:]} == {
        "model.dtype", "generation.max_new_tokens", "capture.layers[2]"
    }  # fmt: skip
    assert "Traceback" not in res.stderr


def test_cli_warning_alone_exits_0_and_strict_exits_2(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD + "  max_tokens: 5\n")
    res = CliRunner().invoke(main, ["validate", str(path)])
    assert res.exit_code == 0, res.output
    assert res.stdout.splitlines() == [
        f"warning: {path}: generation.max_tokens: unknown key 'max_tokens' ignored, nearest known key "
        "'max_new_tokens' (fix or remove it; --strict makes this an error)",
        f"{path}: ok (1 warning)",
    ]
    res = CliRunner().invoke(main, ["validate", "--strict", str(path)])
    assert res.exit_code == 2, res.output
    assert res.stdout.startswith(f"error: {path}: generation.max_tokens: ")


def test_cli_directory_means_its_yaml_files(tmp_path: Path) -> None:
    write(tmp_path, GOOD, "b.yml")
    write(tmp_path, MULTI_PROMPT, "a.yaml")
    write(tmp_path, "not: [a scenario", "notes.txt")
    res = CliRunner().invoke(main, ["validate", str(tmp_path)])
    assert res.exit_code == 2
    lines = res.stdout.splitlines()
    assert lines[-1] == f"{tmp_path / 'b.yml'}: ok"
    assert [line.split(": ")[1] for line in lines[:-1]] == [str(tmp_path / "a.yaml")] * 2
    empty = tmp_path / "empty"
    empty.mkdir()
    res = CliRunner().invoke(main, ["validate", str(empty)])
    assert res.exit_code == 2 and "no *.yaml or *.yml" in res.stdout


def test_cli_json_lists_every_problem(tmp_path: Path) -> None:
    good, bad = write(tmp_path, GOOD, "good.yaml"), write(tmp_path, MULTI_PROMPT, "bad.yaml")
    res = CliRunner().invoke(main, ["validate", "--json", str(good), str(bad), str(tmp_path / "gone.yaml")])
    assert res.exit_code == 2
    records = json.loads(res.stdout)
    assert [(r["file"], r["field"]) for r in records] == [
        (str(bad), "prompt[1].messages[1].role"),
        (str(bad), "prompt[2].messages"),
        (str(tmp_path / "gone.yaml"), ""),
    ]
    assert all(set(r) == {"file", "field", "severity", "message", "fix"} for r in records)
    assert {r["severity"] for r in records} == {"error"}
    res = CliRunner().invoke(main, ["validate", "--json", str(good)])
    assert (res.exit_code, json.loads(res.stdout)) == (0, [])


def test_cli_model_check(tmp_path: Path, tiny_folder: Path) -> None:
    path = write(tmp_path, scenario_on(tiny_folder, "[1, 5]"))
    assert CliRunner().invoke(main, ["validate", str(path)]).exit_code == 0
    res = CliRunner().invoke(main, ["validate", "--model-check", str(path)])
    assert res.exit_code == 2, res.output
    [line] = res.stdout.splitlines()
    assert line.startswith(f"error: {path}: capture.layers[1]: layer index 5 ")
