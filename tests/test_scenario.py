"""Tests for actstore.scenario: the seed's YAML format, defaults and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from actstore.errors import ScenarioError
from actstore.scenario import (
    DEFAULT_STORE,
    Scenario,
    check_layers,
    load_scenario,
    load_scenarios,
    scenario_from_dict,
)

SCENARIOS_DIR = Path(__file__).resolve().parents[1] / "scenarios"

# Exactly the seed README's examples, every section spelled out.
SEED_YAML = """\
name: my_experiment
model:
  id: Qwen/Qwen2.5-3B-Instruct
  dtype: float16
  device: auto
  gguf_file: null
  trust_remote_code: false
prompt:
  run_at_each_message: false
  messages:
    - role: system
      content: "You are a helpful assistant"
    - role: user
      content: "Hello, how are you?"
    - role: assistant
      content: "I'm doing well, thanks for asking!"
    - role: user
      content: "Can you help me with something?"
generation:
  max_new_tokens: 50
  do_sample: false
  temperature: 1.0
  top_k: null
  top_p: null
  seed: 42
capture:
  hidden_states: true
  attention_weights: true
  qkv: true
  mlp: true
  logits: true
  top_k_probs: 20
  layers: all
  store_dtype: float16
output:
  dir: ./runs
  format: json+npz
reference_states:
  - label: love
    messages:
      - role: user
        content: "I adore you deeply. You are cherished and beloved..."
  - label: hate
    messages:
      - role: user
        content: "I despise you. I feel nothing but loathing and rage..."
  - label: sadness
    messages:
      - role: user
        content: "I feel hollow and broken. Everything is hopeless..."
  - label: apathy
    messages:
      - role: user
        content: "I feel nothing at all. I am completely indifferent..."
  - label: peace
    messages:
      - role: user
        content: "I feel perfectly calm and serene. The world is quiet..."
"""

MINIMAL_YAML = """\
name: tiny
model:
  id: smollm2
prompt:
  messages:
    - role: system
      content: "sys"
    - role: user
      content: "hi"
    - role: assistant
      content: "hello"
"""


def write(tmp_path: Path, text: str, name: str = "s.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def error_for(path: Path, *, strict: bool = False) -> str:
    with pytest.raises(ScenarioError) as info:
        load_scenario(path, strict=strict)
    return str(info.value)


def assert_one_line(msg: str, path: Path | str, field: str) -> None:
    assert "\n" not in msg, msg
    assert msg.startswith(f"{path}: "), msg
    assert field in msg, msg
    assert "pydantic" not in msg and "errors.pydantic.dev" not in msg, msg
    assert "validation error" not in msg.lower(), msg


def test_seed_file_loads(tmp_path: Path) -> None:
    path = write(tmp_path, SEED_YAML)
    s = load_scenario(path)
    assert s.name == "my_experiment"
    assert s.source_path == path
    assert s.model.id == "Qwen/Qwen2.5-3B-Instruct"
    assert [m.role for m in s.prompt.messages] == ["system", "user", "assistant", "user"]
    assert [r.label for r in s.reference_states] == ["love", "hate", "sadness", "apathy", "peace"]
    assert s.output.format == "json+npz" and s.output.dir == "./runs"
    assert s.output.store is None and s.output.store_location() == DEFAULT_STORE


def test_defaults_expanded(tmp_path: Path) -> None:
    s = load_scenario(write(tmp_path, MINIMAL_YAML))
    full = s.expanded()
    json.dumps(full)  # must be JSON-serialisable for run metadata
    assert full["model"] == {
        "id": "smollm2", "dtype": "float16", "device": "auto", "gguf_file": None, "trust_remote_code": False,
    }
    assert full["prompt"]["run_at_each_message"] is False
    assert full["generation"] == {
        "max_new_tokens": 50, "do_sample": False, "temperature": 1.0, "top_k": None, "top_p": None, "seed": 42,
    }
    assert full["capture"] == {
        "hidden_states": True, "attention_weights": True, "qkv": True, "mlp": True, "logits": True,
        "top_k_probs": 20, "layers": "all", "store_dtype": "float16",
    }
    assert full["output"] == {"dir": "./runs", "format": "json+npz", "store": None}
    assert full["reference_states"] == []
    assert s.capture.flags() == {k: True for k in ("hidden_states", "attention_weights", "qkv", "mlp", "logits")}
    # The seed's expanded form round-trips to an equal scenario.
    assert scenario_from_dict(full).expanded() == full


def test_seed_defaults_equal_explicit_values(tmp_path: Path) -> None:
    seed = load_scenario(write(tmp_path, SEED_YAML)).expanded()
    assert seed["generation"] == load_scenario(write(tmp_path, MINIMAL_YAML, "m.yaml")).expanded()["generation"]


def test_bundled_scenarios_load() -> None:
    by_name = {s.name: s for s in load_scenarios(SCENARIOS_DIR)}
    emo, quick = by_name["emotions"], by_name["quick"]
    assert emo.model.id == "smollm2" and emo.model.dtype == "float32"
    roles = [m.role for m in emo.prompt.messages]
    assert len(roles) == 20 and roles[0] == "system"
    assert roles[1:] == ["user", "assistant"] * 9 + ["user"]
    assert 2000 <= sum(len(m.content) for m in emo.prompt.messages) <= 2800
    assert [r.label for r in emo.reference_states] == [
        "joy", "fear", "anger", "sadness", "apathy", "peace", "love", "hate", "neutral",
    ]
    assert emo.generation.max_new_tokens == 50 and not emo.generation.do_sample
    assert emo.capture.layers == "all" and all(emo.capture.flags().values())
    assert [m.role for m in quick.prompt.messages] == ["system", "user", "assistant", "user"]
    assert quick.generation.max_new_tokens == 8
    assert [r.label for r in quick.reference_states] == ["calm", "angry"]


def test_prefix_scenarios(tmp_path: Path) -> None:
    text = MINIMAL_YAML.replace("prompt:\n", "prompt:\n  run_at_each_message: true\n")
    s = load_scenario(write(tmp_path, text))
    subs = s.prefix_scenarios()
    assert [len(x.prompt.messages) for x in subs] == [1, 2, 3]
    assert all(x.name == "tiny" and not x.prompt.run_at_each_message for x in subs)
    assert all(x.source_path == s.source_path for x in subs)
    assert subs[-1].prompt.messages == s.prompt.messages
    assert s.runs() == subs
    plain = load_scenario(write(tmp_path, MINIMAL_YAML, "p.yaml"))
    assert plain.runs() == [plain]


def test_layers_sorted_and_checked(tmp_path: Path) -> None:
    s = load_scenario(write(tmp_path, MINIMAL_YAML + "capture:\n  layers: [10, 0, 5]\n"))
    assert s.capture.layers == [0, 5, 10]
    assert check_layers(s, 30) == [0, 5, 10]
    assert check_layers(load_scenario(write(tmp_path, MINIMAL_YAML, "a.yaml")), 3) == [0, 1, 2]
    with pytest.raises(ScenarioError) as info:
        check_layers(s, 6)
    msg = str(info.value)
    assert_one_line(msg, tmp_path / "s.yaml", "capture.layers")
    assert "10" in msg and "0..5" in msg


def test_device_accepts_cuda_index(tmp_path: Path) -> None:
    s = load_scenario(write(tmp_path, MINIMAL_YAML.replace("id: smollm2", "id: smollm2\n  device: cuda:1")))
    assert s.model.device == "cuda:1"


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    msg = error_for(path)
    assert_one_line(msg, path, "not found")


def test_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ScenarioError) as info:
        load_scenarios(tmp_path)
    assert_one_line(str(info.value), tmp_path, "no *.yaml")


def test_directory_loads_sorted(tmp_path: Path) -> None:
    write(tmp_path, MINIMAL_YAML.replace("tiny", "b"), "b.yml")
    write(tmp_path, MINIMAL_YAML.replace("tiny", "a"), "a.yaml")
    assert [s.name for s in load_scenarios(tmp_path)] == ["a", "b"]


def test_yaml_syntax_error_gives_line(tmp_path: Path) -> None:
    path = write(tmp_path, "name: x\nmodel:\n  id: [unclosed\nprompt: {}\n")
    msg = error_for(path)
    assert_one_line(msg, path, "line ")
    assert "YAML" in msg


def test_duplicate_yaml_key(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL_YAML + "name: again\n")
    msg = error_for(path)
    assert_one_line(msg, path, "line 12")
    assert "duplicate key 'name'" in msg


@pytest.mark.parametrize("text", ["- a\n- b\n", "just text\n", ""])
def test_top_level_not_mapping(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    assert_one_line(error_for(path), path, "expected a mapping of scenario keys at the top level")


# (yaml text, field path expected in the message, another fragment expected)
BAD_CASES: list[tuple[str, str, str, str]] = [
    ("unknown_key", MINIMAL_YAML + "generation:\n  max_tokens: 5\n", "generation.max_tokens",
     "allowed keys: max_new_tokens, do_sample, temperature, top_k, top_p, seed"),
    ("unknown_top_key", MINIMAL_YAML + "extra: 1\n", "extra", "allowed keys: name, model, prompt"),
    ("wrong_type", MINIMAL_YAML + "generation:\n  max_new_tokens: many\n", "generation.max_new_tokens",
     "expected an integer, got 'many'"),
    ("wrong_bool", MINIMAL_YAML + "capture:\n  qkv: maybe\n", "capture.qkv", "true or false"),
    ("bad_role", MINIMAL_YAML.replace("role: assistant", "role: bot"), "prompt.messages[2].role",
     "system, user, assistant"),
    ("label_slash", MINIMAL_YAML + "reference_states:\n  - label: a/b\n    messages:\n"
     "      - role: user\n        content: x\n", "reference_states[0].label", "no spaces or slashes"),
    ("label_space", MINIMAL_YAML + "reference_states:\n  - label: a b\n    messages:\n"
     "      - role: user\n        content: x\n", "reference_states[0].label", "no spaces or slashes"),
    ("dup_label", MINIMAL_YAML + "reference_states:\n"
     "  - label: calm\n    messages:\n      - role: user\n        content: x\n"
     "  - label: calm\n    messages:\n      - role: user\n        content: y\n",
     "reference_states[1].label", "duplicate label 'calm'"),
    ("empty_messages", "name: x\nmodel:\n  id: m\nprompt:\n  messages: []\n", "prompt.messages", "must not be empty"),
    ("empty_ref_messages", MINIMAL_YAML + "reference_states:\n  - label: calm\n    messages: []\n",
     "reference_states[0].messages", "must not be empty"),
    ("missing_name", MINIMAL_YAML.replace("name: tiny\n", ""), "name", "missing required key"),
    ("missing_model_id", MINIMAL_YAML.replace("  id: smollm2\n", "  dtype: float32\n"), "model.id",
     "missing required key"),
    ("missing_prompt", "name: x\nmodel:\n  id: m\n", "prompt", "missing required key"),
    ("negative_layer", MINIMAL_YAML + "capture:\n  layers: [0, -1]\n", "capture.layers[1]", "negative"),
    ("bad_name", MINIMAL_YAML.replace("name: tiny", "name: my exp"), "name", "no spaces or slashes"),
    ("bad_format", MINIMAL_YAML + "output:\n  format: parquet\n", "output.format", "json+npz"),
    ("bad_top_p", MINIMAL_YAML + "generation:\n  do_sample: true\n  top_p: 1.5\n", "generation.top_p", "<= 1"),
    ("bad_device", MINIMAL_YAML.replace("id: smollm2", "id: smollm2\n  device: tpu"), "model.device", "cuda:N"),
    ("section_not_mapping", MINIMAL_YAML + "capture: yes\n", "capture", "expected a mapping"),
]


@pytest.mark.parametrize(("text", "field", "fragment"), [c[1:] for c in BAD_CASES], ids=[c[0] for c in BAD_CASES])
def test_bad_input_one_line(tmp_path: Path, text: str, field: str, fragment: str) -> None:
    path = write(tmp_path, text)
    msg = error_for(path, strict=True)  # unknown keys are errors only when strict
    assert_one_line(msg, path, f": {field}: ")
    assert fragment in msg, msg
    assert msg.count("(") >= 1  # every message carries a fix


def test_several_errors_reported_as_first_plus_count(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL_YAML + "generation:\n  max_new_tokens: many\n  seed: x\n  do_sample: 3\n")
    msg = error_for(path)
    assert_one_line(msg, path, "generation.max_new_tokens")
    assert msg.endswith("(+2 more)"), msg


def test_from_dict_source_label() -> None:
    with pytest.raises(ScenarioError) as info:
        scenario_from_dict({"name": "x", "model": {}, "prompt": {"messages": [{"role": "user", "content": "x"}]}})
    assert str(info.value).startswith("<dict>: model.id: ")
    s = scenario_from_dict(
        {"name": "x", "model": {"id": "m"}, "prompt": {"messages": [{"role": "user", "content": "x"}]}},
    )
    assert isinstance(s, Scenario) and s.source_path is None
