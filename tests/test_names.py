"""One naming rule for every name that becomes a path piece (naming.check_name).

Scenario names and reference labels are refused at validation, so ``actstore capture``
fails with one line naming the file and the field before any model loads or any store
is created. The same rule accepts every name the bundled scenarios and Activation Lab's
own run directories use.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from actstore import naming
from actstore.cli import main
from actstore.errors import ActstoreError, BadNameError, ScenarioError
from actstore.scenario import load_scenarios, scenario_from_dict

ROOT = Path(__file__).resolve().parents[1]
SEED_RUNS = Path("/work/shared/fixtures/seed-runs")

HOSTILE = {
    "dotdot": "..",
    "dash": "-x",
    "hidden": ".hidden",
    "colon": "a:b",
    "non_ascii": "caf\u00e9",
    "nul": "a\x00b",
    "long": "x" * 300,
    "slash": "../../../../../x/PWN",
    "backslash": "a\\b",
    "space": "my exp",
    "empty": "",
}


@pytest.mark.parametrize("value", list(HOSTILE.values()), ids=list(HOSTILE))
def test_check_name_refuses(value: str) -> None:
    with pytest.raises(BadNameError) as info:
        naming.check_name(value, "label", "f.yaml")
    msg = str(info.value)
    assert isinstance(info.value, ActstoreError) and "\n" not in msg and "\x00" not in msg
    assert msg.startswith("f.yaml: label ") and "(" in msg  # names file, field and the fix
    # The suggested fix, when it is a name, passes the rule itself.
    fix = msg.rsplit("(use e.g. ", 1)
    if len(fix) == 2:
        assert naming.name_problem(fix[1].rstrip(")")) is None


@pytest.mark.parametrize("value", ["calm", "a", "x" * 100, "Run-1.2_b", "0day", "prompt_1_msg1of2"])
def test_check_name_accepts(value: str) -> None:
    assert naming.check_name(value, "label") == value


def test_length_limit_is_100_and_run_ids_have_room_for_the_suffix() -> None:
    assert naming.name_problem("x" * 100) is None and naming.name_problem("x" * 101) is not None
    run_id = "x" * 100 + "_20261130T120000_abcdef"  # what ActStore.new_run_id makes of it
    assert naming.check_run_id(run_id) == run_id
    with pytest.raises(BadNameError):
        naming.check_run_id("../../x")


def _seed_names() -> list[str]:
    """Names, labels and roles that Activation Lab's real run directories use."""
    names: list[str] = []
    for path in sorted(SEED_RUNS.glob("*/*/run.json")):
        names.append(json.loads(path.read_text())["scenario"]["name"])
    for path in sorted(SEED_RUNS.glob("*/references/index.json")):
        names += json.loads(path.read_text())["labels"]
    for path in sorted(SEED_RUNS.glob("*/*/conversation_snapshots/index.json")):
        names += [s["role"] for s in json.loads(path.read_text())["snapshots"]]
    return names


def test_real_names_pass() -> None:
    bundled = load_scenarios(ROOT / "scenarios")
    names = [s.name for s in bundled] + [r.label for s in bundled for r in s.reference_states]
    assert len(names) > 10
    if SEED_RUNS.is_dir():
        seed = _seed_names()
        assert {"seed_fixture_single", "joy", "calm", "user", "assistant"} <= set(seed)
        names += seed
    assert [n for n in names if naming.name_problem(n) is not None] == []


# ---------------------------------------------------------------------- scenarios


def _scenario(name: str = "ok", label: str = "calm") -> dict[str, object]:
    return {
        "name": name,
        # A model that cannot load: reaching the loader would fail with another message.
        "model": {"id": "/no/such/model/dir", "device": "cpu"},
        "prompt": {"messages": [{"role": "user", "content": "hi"}]},
        "reference_states": [{"label": label, "messages": [{"role": "user", "content": "x"}]}],
    }


def test_scenario_from_dict_uses_the_rule() -> None:
    for value in HOSTILE.values():
        with pytest.raises(ScenarioError, match=r"^<dict>: name: "):
            scenario_from_dict(_scenario(name=value))
        with pytest.raises(ScenarioError, match=r"^<dict>: reference_states\[0\]\.label: "):
            scenario_from_dict(_scenario(label=value))


CAPTURE_CASES = {
    **{f"name_{k}": ("name", v) for k, v in HOSTILE.items() if k in ("dotdot", "dash", "colon", "non_ascii", "nul", "long")},
    **{f"label_{k}": ("label", v) for k, v in HOSTILE.items() if k in ("nul", "long", "colon", "slash")},
}  # fmt: skip


@pytest.mark.parametrize("case", list(CAPTURE_CASES))
def test_capture_refuses_bad_name_before_anything(tmp_path: Path, case: str) -> None:
    field, value = CAPTURE_CASES[case]
    data = _scenario(**{field: value})
    path = tmp_path / "s.yaml"
    # allow_unicode=False: YAML escapes NUL and non-ASCII in double quotes.
    path.write_text(yaml.safe_dump(data, allow_unicode=False), encoding="utf-8")
    assert yaml.safe_load(path.read_text()) == data  # the file really holds the hostile value
    store = tmp_path / "store.zarr"
    r = CliRunner().invoke(main, ["capture", str(path), "--store", str(store), "-q"])
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.output
    want = "name: name " if field == "name" else "reference_states[0].label: label "
    assert lines[0].startswith(f"error: {path}: {want}"), lines[0]
    assert "model" not in lines[0]  # refused by validation, not by the model loader
    assert not store.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["s.yaml"]
