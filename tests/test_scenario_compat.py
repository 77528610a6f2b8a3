"""Activation Lab's scenario files load in actstore and mean what Activation Lab took them
to mean: checked against the scenario.json and run.json files Activation Lab itself wrote
for the fixture scenarios (../shared/fixtures/seed-runs)."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from actstore.cli import main
from actstore.errors import ScenarioError, ScenarioWarning
from actstore.scenario import load_scenario, scenario_from_dict

SEED_RUNS = Path("/work/shared/fixtures/seed-runs")  # as tests/test_names.py finds them
FIXTURES = ["seed_fixture_single", "seed_fixture_multi"]

pytestmark = pytest.mark.skipif(not SEED_RUNS.is_dir(), reason="Activation Lab fixtures not present")


def run_dir(name: str) -> Path:
    [found] = sorted(SEED_RUNS.glob(f"{name}_*/"))
    return found


def al_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def load_quietly(path: Path, **kw: Any) -> Any:
    """Load with every warning an error: Activation Lab's files must load cleanly."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return load_scenario(path, **kw)


@pytest.mark.parametrize("name", FIXTURES)
def test_fixture_scenario_loads_unchanged_and_strict(name: str) -> None:
    path = SEED_RUNS / f"{name}.yaml"
    assert load_quietly(path, strict=True).expanded() == load_quietly(path).expanded()


@pytest.mark.parametrize("name", FIXTURES)
def test_fixture_scenario_means_what_activation_lab_parsed(name: str) -> None:
    sc = load_quietly(SEED_RUNS / f"{name}.yaml")
    theirs = al_json(run_dir(name) / "scenario.json")  # Activation Lab's own parse, defaults expanded
    ours = sc.expanded()
    assert [p.model_dump(mode="json") for p in sc.prompts] == theirs["prompt"]
    for key in ("do_sample", "temperature", "top_k", "top_p", "seed", "max_new_tokens"):
        assert ours["generation"][key] == theirs["generation"][key], key
    assert {k: ours["capture"][k] for k in theirs["capture"]} == theirs["capture"]
    assert ours["reference_states"] == theirs["reference_states"]
    assert {k: ours["model"][k] for k in ("dtype", "device", "gguf_file", "trust_remote_code")} == {
        k: theirs["model"][k] for k in ("dtype", "device", "gguf_file", "trust_remote_code")
    }
    assert ours["name"] == theirs["name"]


def _al_sub_runs(name: str) -> list[tuple[str, tuple[int, int, int]]]:
    """Activation Lab's sub-run folders, ordered as it numbers them: prompt_N or
    prompt_N_msgKofM."""
    out = []
    for d in run_dir(name).iterdir():
        m = re.fullmatch(r"prompt_(\d+)(?:_msg(\d+)of(\d+))?", d.name)
        if m:
            n, k, total = int(m[1]), int(m[2] or 0), int(m[3] or 0)
            out.append((d.name, (n, k, total)))
    return sorted(out, key=lambda x: x[1])


@pytest.mark.parametrize("name", FIXTURES)
def test_runs_are_activation_labs_sub_runs_in_order(name: str) -> None:
    from actstore.capture.prompts import render_ids
    from actstore.testing import test_tokenizer

    sc = load_quietly(SEED_RUNS / f"{name}.yaml")
    runs = sc.runs()
    theirs = _al_sub_runs(name)
    assert len(runs) == len(theirs) and len(theirs) >= 1
    tok = test_tokenizer()  # SmolLM2's tokenizer, the one the fixtures were made with
    for sub, (folder, (n, k, _)) in zip(runs, theirs, strict=True):
        run_json = al_json(run_dir(name) / folder / "run.json")
        [their_prompt] = run_json["scenario"]["prompt"]
        assert sub.single_prompt.model_dump(mode="json") == their_prompt, folder
        assert sub.prompt_index == (n if isinstance(sc.prompt, list) else None)
        if k:
            assert len(sub.single_prompt.messages) == k
        assert render_ids(tok, sub.single_prompt.messages) == run_json["prompt_token_ids"], folder


def test_multi_prompt_runs_index_their_prompts() -> None:
    sc = load_quietly(SEED_RUNS / "seed_fixture_multi.yaml")
    assert [(r.prompt_index, len(r.single_prompt.messages)) for r in sc.runs()] == [(0, 1), (1, 1), (1, 2)]
    assert all(not r.single_prompt.run_at_each_message and not isinstance(r.prompt, list) for r in sc.runs())
    with pytest.raises(ScenarioError, match=r"prompt: a list of 2 prompts is several runs"):
        sc.single_prompt  # noqa: B018


# ---------------------------------------------------------------- schema, one field at a time

BASE: dict[str, Any] = {
    "name": "x",
    "model": {"id": "m"},
    "prompt": {"messages": [{"role": "user", "content": "hi"}]},
}


def with_(section: str, **values: Any) -> dict[str, Any]:
    return {**BASE, section: {**BASE.get(section, {}), **values}}


def error(data: dict[str, Any], **kw: Any) -> str:
    with pytest.raises(ScenarioError) as info:
        scenario_from_dict(data, **kw)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("<dict>: "), msg
    return msg


def test_single_mapping_and_one_item_list_mean_the_same() -> None:
    one = scenario_from_dict(BASE)
    listed = scenario_from_dict({**BASE, "prompt": [BASE["prompt"]]})
    assert [r.expanded() for r in one.runs()] == [r.expanded() for r in listed.runs()]


@pytest.mark.parametrize(
    ("prompt", "field", "fragment"),
    [
        ([], "prompt", "must not be empty"),
        ([{"messages": []}], "prompt[0].messages", "must not be empty"),
        ([BASE["prompt"], {"messages": [{"role": "bot", "content": "x"}]}], "prompt[1].messages[0].role",
         "system, user, assistant"),
        ("hello", "prompt", "expected a mapping"),
        ({"messages": [{"role": "bot", "content": "x"}]}, "prompt.messages[0].role", "system, user"),
    ],
)  # fmt: skip
def test_prompt_errors_name_the_field_as_written(prompt: Any, field: str, fragment: str) -> None:
    msg = error({**BASE, "prompt": prompt})
    assert f": {field}: " in msg and fragment in msg, msg


@pytest.mark.parametrize(
    ("values", "ok"),
    [
        ({"do_sample": False, "temperature": 0}, True),  # Activation Lab's bundled scenario
        ({"do_sample": False, "temperature": -3.5, "top_k": 0, "top_p": 7}, True),
        ({"temperature": 0}, True),  # do_sample defaults to false
        ({"do_sample": True, "temperature": 0.7, "top_k": 1, "top_p": 1}, True),
    ],
)
def test_sampling_numbers_unchecked_without_do_sample(values: dict[str, Any], ok: bool) -> None:
    sc = scenario_from_dict(with_("generation", **values))
    for key, value in values.items():
        assert getattr(sc.generation, key) == value


@pytest.mark.parametrize(
    ("values", "field", "fragment"),
    [
        ({"temperature": 0}, "generation.temperature", "must be > 0 when do_sample is true, got 0"),
        ({"temperature": -1.0}, "generation.temperature", "got -1.0"),
        ({"top_k": 0}, "generation.top_k", "must be >= 1"),
        ({"top_p": 0}, "generation.top_p", "must be > 0 and <= 1"),
        ({"top_p": 1.5}, "generation.top_p", "got 1.5"),
    ],
)
def test_sampling_numbers_checked_with_do_sample(values: dict[str, Any], field: str, fragment: str) -> None:
    msg = error(with_("generation", do_sample=True, **values))
    assert f": {field}: " in msg and fragment in msg and "do_sample: false" in msg, msg


def test_sampling_numbers_keep_their_types() -> None:
    msg = error(with_("generation", temperature="hot"))
    assert ": generation.temperature: expected a number" in msg


@pytest.mark.parametrize("device", ["auto", "mps", "cpu", "cuda", "cuda:1"])
def test_device_accepts_activation_labs_and_cuda(device: str) -> None:
    assert scenario_from_dict(with_("model", device=device)).model.device == device


def test_device_refuses_others() -> None:
    assert ": model.device: unknown device 'tpu'" in error(with_("model", device="tpu"))


@pytest.mark.parametrize("bad", ["a b", "a/b", "a\\b", "a\tb", ""])
def test_labels_and_names_refuse_whitespace_and_slashes(bad: str) -> None:
    refs = [{"label": bad, "messages": [{"role": "user", "content": "x"}]}]
    assert ": reference_states[0].label: " in error({**BASE, "reference_states": refs})
    assert ": name: " in error({**BASE, "name": bad})


# ---------------------------------------------------------------- unknown keys


def test_unknown_keys_warn_with_the_nearest_known_key_and_are_ignored() -> None:
    data = {
        **with_("generation", max_tokens=5),
        "prompt": [{"messages": [{"role": "user", "content": "hi", "rloe": "z"}], "run_at_each_mesage": True}],
        "extra_top": 1,
    }
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sc = scenario_from_dict(data)
    msgs = [str(w.message) for w in caught if issubclass(w.category, ScenarioWarning)]
    assert len(msgs) == len(caught) == 4, msgs
    assert all("\n" not in m and m.startswith("<dict>: ") for m in msgs)
    expected = {
        "generation.max_tokens": ("'max_tokens'", "'max_new_tokens'"),
        "prompt[0].messages[0].rloe": ("'rloe'", "'role'"),
        "prompt[0].run_at_each_mesage": ("'run_at_each_mesage'", "'run_at_each_message'"),
        "extra_top": ("'extra_top'", None),
    }
    for field, (key, near) in expected.items():
        [m] = [m for m in msgs if m.startswith(f"<dict>: {field}: ")]
        assert f"unknown key {key} ignored" in m and "--strict" in m, m
        if near:
            assert f"nearest known key {near}" in m, m
    # ignored: the defaults stand, as if the keys were not written
    assert sc.generation.max_new_tokens == 50
    assert sc.single_prompt.run_at_each_message is False
    with pytest.raises(ScenarioError, match=r"^<dict>: prompt\[0\]\.messages\[0\]\.rloe: unknown key 'rloe' \(allowed keys: role, content\) \(\+3 more\)$"):
        sc.check_strict()


def test_strict_makes_an_unknown_key_todays_error() -> None:
    msg = error(with_("generation", max_tokens=5), strict=True)
    assert msg == (
        "<dict>: generation.max_tokens: unknown key 'max_tokens' "
        "(allowed keys: max_new_tokens, do_sample, temperature, top_k, top_p, seed)"
    )
    msg = error({**BASE, "prompt": [{"messages": [{"role": "user", "content": "x"}], "extra": 1}]}, strict=True)
    assert msg.startswith("<dict>: prompt[0].extra: unknown key 'extra' (allowed keys: messages, run_at_each_message)")


def test_capture_scenario_strict_refuses_before_loading_a_model(tmp_path: Path) -> None:
    import actstore

    path = tmp_path / "s.yaml"
    path.write_text("name: x\nmodel: {id: /no/such/model}\nprompt: {messages: [{role: user, content: hi}]}\n"
                    "generation: {max_tokens: 3}\n")  # fmt: skip
    with pytest.raises(ScenarioError, match=r"generation\.max_tokens: unknown key 'max_tokens' \(allowed"):
        actstore.capture_scenario(str(path), str(tmp_path / "store.zarr"), strict=True)
    with pytest.warns(ScenarioWarning):
        sc = actstore.load_scenario(str(path))
    with pytest.raises(ScenarioError, match=r"generation\.max_tokens: unknown key"):
        actstore.capture_scenario(sc, str(tmp_path / "store.zarr"), strict=True)
    assert not (tmp_path / "store.zarr").exists()


def test_cli_warns_in_one_line_and_strict_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    store = tmp_path / "store.zarr"
    path.write_text("name: x\nmodel: {id: /no/such/model, device: cpu}\n"
                    "prompt: {messages: [{role: user, content: hi}]}\ngeneration: {max_tokens: 3}\n")  # fmt: skip
    res = CliRunner().invoke(main, ["capture", str(path), "--store", str(store), "-q", "--strict"])
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}: generation.max_tokens: unknown key"), lines
    # without --strict: one warning line, then the capture goes on (to fail on the model)
    res = CliRunner().invoke(main, ["capture", str(path), "--store", str(store), "-q"])
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert lines[0] == (
        f"warning: {path}: generation.max_tokens: unknown key 'max_tokens' ignored, nearest known key "
        "'max_new_tokens' (fix or remove it; --strict makes this an error)"
    ), lines
    assert len(lines) == 2 and lines[1].startswith("error: ") and "max_tokens" not in lines[1], lines
    assert not store.exists()
