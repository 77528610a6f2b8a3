"""Bounded capture: the prompt is checked against the model's context and the machine's
memory before anything is created, with one line and exit 2 when it cannot fit.

CLI cases run ``actstore capture`` in a subprocess under an address-space limit
(``ulimit -v``), on a tiny random llama saved to a folder (512 positions): before
these checks a 1 MB message asked eager attention for hundreds of GB and 10,000
messages rendered snapshot prefixes for minutes.
"""

from __future__ import annotations

import json
import re
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

import actstore
from actstore.capture import budget
from actstore.capture.prompts import render_ids
from actstore.capture.runner import capture_run, preflight
from actstore.cli import main
from actstore.errors import ResourceError, ScenarioError
from actstore.models.architectures import resolve_sites
from actstore.store.store import ActStore
from actstore.testing import MAX_POSITIONS, tiny_config, tiny_model

from .conftest import MESSAGES, loaded_tiny, make_scenario

LIMIT = 3 * 2**30  # a tiny capture peaks under 2 GiB of address space (torch included)
MB_MESSAGE = "word " * 200_000  # 1 MB, about 200k tokens


@pytest.fixture(scope="module")
def models(tmp_path_factory: Any) -> dict[str, Path]:
    """The tiny llama saved as a model folder, and a copy that claims 10^6 positions
    (rope has no position table, so it runs; only the memory check stops a long prompt)."""
    root = tmp_path_factory.mktemp("models")
    model, tok = tiny_model("llama", attn_implementation="eager")
    short, long = root / "short", root / "long"
    for folder in (short, long):
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
    cfg = json.loads((long / "config.json").read_text())
    (long / "config.json").write_text(json.dumps({**cfg, "max_position_embeddings": 10**6}))
    return {"short": short, "long": long}


def _scenario_file(folder: Path, name: str, model: Path, messages: list[dict[str, str]], **extra: Any) -> Path:
    data = {"name": "bounded", "model": {"id": str(model), "dtype": "float32", "device": "cpu"},
            "prompt": {"messages": messages}, "generation": {"max_new_tokens": 3}, **extra}  # fmt: skip
    path = folder / name
    path.write_text(yaml.safe_dump(data))
    return path


def _capture_limited(path: Path, store: Path, *flags: str) -> tuple[subprocess.CompletedProcess[str], float]:
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "actstore", "capture", str(path), "--store", str(store), "--quiet", *flags],
        capture_output=True, text=True, timeout=300,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (LIMIT, LIMIT)),
    )  # fmt: skip
    return proc, time.perf_counter() - t0


def _one_line(stderr: str, *needles: str) -> str:
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# ---- CLI, under ulimit -v --------------------------------------------------------------------
@pytest.mark.slow  # subprocesses, a browser or many captures: the full suite runs it
def test_a_1mb_message_fails_on_the_context_in_one_line(models: dict[str, Path], tmp_path: Path) -> None:
    path = _scenario_file(tmp_path, "long.yaml", models["short"], [{"role": "user", "content": MB_MESSAGE}])
    proc, _ = _capture_limited(path, tmp_path / "store.zarr")
    assert proc.returncode == 2, proc.stderr
    line = _one_line(proc.stderr, str(path), "prompt.messages", "generation.max_new_tokens", f"handles {MAX_POSITIONS}")
    assert int(line.split("the prompt is ")[1].split()[0]) > 100_000
    assert not (tmp_path / "store.zarr").exists()


@pytest.mark.slow  # subprocesses, a browser or many captures: the full suite runs it
def test_ten_thousand_messages_fail_in_seconds(models: dict[str, Path], tmp_path: Path) -> None:
    msgs = [{"role": ("user", "assistant")[i % 2], "content": f"message {i}"} for i in range(10_000)]
    path = _scenario_file(tmp_path, "many.yaml", models["short"], msgs)
    proc, took = _capture_limited(path, tmp_path / "store.zarr")
    assert proc.returncode == 2, proc.stderr
    _one_line(proc.stderr, str(path), "prompt.messages")
    assert took < 120, took  # rendering every prefix first took ~13 minutes on the real model
    assert not (tmp_path / "store.zarr").exists()


@pytest.mark.slow  # subprocesses under limits, or a CLI per call: the full suite runs it
def test_a_prompt_that_fits_the_context_but_not_memory_fails_in_one_line(
    models: dict[str, Path], tmp_path: Path
) -> None:
    path = _scenario_file(tmp_path, "long.yaml", models["long"], [{"role": "user", "content": MB_MESSAGE}])
    proc, _ = _capture_limited(path, tmp_path / "store.zarr")
    assert proc.returncode == 2, proc.stderr
    line = _one_line(proc.stderr, str(path), "GiB", "--force", "attention scores")
    need = float(line.split("needs about ")[1].split()[0])
    assert need > 100  # 2 x 4 heads x (200k tokens)^2 x 4 bytes alone is 1.2 TiB
    assert not (tmp_path / "store.zarr").exists()


@pytest.mark.slow  # subprocesses, a browser or many captures: the full suite runs it
def test_a_capture_that_fits_still_works_under_the_limit(models: dict[str, Path], tmp_path: Path) -> None:
    path = _scenario_file(tmp_path, "ok.yaml", models["short"], MESSAGES)
    proc, _ = _capture_limited(path, tmp_path / "store.zarr")
    assert proc.returncode == 0, proc.stderr
    run = ActStore.open(tmp_path / "store.zarr").run("latest")
    assert run.n_steps == 3 and len(run.snapshot_index) == len(MESSAGES) + 1  # + the generated reply


# ---- CLI, in process (cheap cases) ---------------------------------------------------------
@pytest.mark.parametrize(
    "extra,needles",
    [
        ({"generation": {"max_new_tokens": MAX_POSITIONS}},
         ["generation.max_new_tokens", f"is {MAX_POSITIONS},",
          "(shorten prompt.messages or lower generation.max_new_tokens)"]),
        ({"reference_states": [{"label": "long", "messages": [{"role": "user", "content": "hi " * 600}]}]},
         ["reference_states[0].messages", f"handles {MAX_POSITIONS}", "(shorten that reference's messages)"]),
    ],
)  # fmt: skip
def test_context_errors_name_the_field(models: dict[str, Path], tmp_path: Path, extra: dict[str, Any],
                                       needles: list[str]) -> None:  # fmt: skip
    path = _scenario_file(tmp_path, "s.yaml", models["short"], MESSAGES, **extra)
    res = CliRunner().invoke(main, ["capture", str(path), "--store", str(tmp_path / "store.zarr"), "-q"])
    assert res.exit_code == 2, res.output
    _one_line(res.stderr, str(path), *needles)
    assert not (tmp_path / "store.zarr").exists()


def test_the_last_position_may_reach_the_context_exactly(tmp_path: Path) -> None:
    loaded = loaded_tiny("llama", eager=False)
    n = len(render_ids(loaded.tokenizer, MESSAGES))
    fits = make_scenario(generation={"max_new_tokens": MAX_POSITIONS - n + 1})  # feeds 512 positions
    preflight(fits, loaded)
    over = make_scenario(generation={"max_new_tokens": MAX_POSITIONS - n + 2})
    with pytest.raises(ScenarioError, match=f"{MAX_POSITIONS + 1} positions"):
        preflight(over, loaded)
    store = ActStore.open(tmp_path / "s.zarr", create=True)
    with pytest.raises(ScenarioError):
        capture_run(over, store, loaded)
    assert store.run_ids() == [] and store.orphans() == []


# ---- memory check and --force, through the Python API ----------------------------------------
def test_the_memory_check_refuses_and_force_captures_the_same_numbers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sc = make_scenario(generation={"max_new_tokens": 2})
    normal = actstore.capture_scenario(sc, str(tmp_path / "a.zarr"), loaded=loaded_tiny("llama"), progress=False)
    monkeypatch.setattr(budget, "available_memory", lambda device=None: 1024)
    with pytest.raises(ResourceError, match="pass --force"):
        actstore.capture_scenario(sc, str(tmp_path / "b.zarr"), loaded=loaded_tiny("llama"), progress=False)
    assert not (tmp_path / "b.zarr").exists()
    forced = actstore.capture_scenario(sc, str(tmp_path / "b.zarr"), loaded=loaded_tiny("llama"),
                                       progress=False, force=True)  # fmt: skip
    a = ActStore.open(tmp_path / "a.zarr").run(normal[0].run_id)
    b = ActStore.open(tmp_path / "b.zarr").run(forced[0].run_id)
    np.testing.assert_array_equal(a.array("hidden_out").compute(), b.array("hidden_out").compute())


def test_the_cli_force_flag_reaches_the_memory_check(models: dict[str, Path], tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.setattr(budget, "available_memory", lambda device=None: 1024)
    path = _scenario_file(tmp_path, "s.yaml", models["short"], MESSAGES)
    store = tmp_path / "store.zarr"
    refused = CliRunner().invoke(main, ["capture", str(path), "--store", str(store), "-q"])
    assert refused.exit_code == 2 and not store.exists()
    _one_line(refused.stderr, "--force")
    forced = CliRunner().invoke(main, ["capture", str(path), "--store", str(store), "-q", "--force"])
    assert forced.exit_code == 0, forced.output
    assert len(ActStore.open(store).run_ids()) == 1


def test_the_estimate_counts_what_the_prefill_holds() -> None:
    loaded = loaded_tiny("llama")
    sites = resolve_sites(loaded.model)
    t, layers = 100, 3
    est = budget.estimate(sites, layers, ["attn_weights", "hidden_in", "hidden_out", "logits"], t, 2, eager=True)
    # Independently: what a real eager forward returns for these tokens.
    with torch.inference_mode():
        out = loaded.model(torch.zeros((1, t), dtype=torch.long), output_attentions=True,
                           output_hidden_states=True)  # fmt: skip
    att = out.attentions[0][0]  # (heads, T, T) float32, as eager computes scores
    assert est.attention_scores == 2 * att.numel() * 4
    assert est.attention_weights == layers * att.numel() * 2
    assert est.logits == out.logits[0].numel() * (4 + 2)
    assert est.activations == layers * t * out.hidden_states[0].shape[-1] * 2
    assert budget.estimate(sites, layers, ["hidden_in"], t, 2, eager=False).attention_scores == 0
    # embeddings: one more hidden-size row per token, whatever the number of layers
    width = out.hidden_states[0].shape[-1]
    with_emb = budget.estimate(sites, layers, ["hidden_in", "embeddings"], t, 2, eager=False)
    assert with_emb.activations == (layers + 1) * t * width * 2
    assert budget.estimate(sites, layers, ["embeddings"], t, 4, eager=False).activations == t * width * 4


def test_context_limit_reads_each_family_and_unknown_is_none() -> None:
    assert budget.context_limit(tiny_config("llama")) == MAX_POSITIONS
    assert budget.context_limit(tiny_config("gpt2")) == MAX_POSITIONS  # n_positions
    assert budget.context_limit(object()) is None


def test_available_memory_honours_the_address_space_limit() -> None:
    code = ("import resource; n = 3 * 2**30; resource.setrlimit(resource.RLIMIT_AS, (n, n));"
            "from actstore.capture.budget import available_memory; print(available_memory())")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert 0 < int(out) < 3 * 2**30


def _meminfo_available() -> int:
    with open("/proc/meminfo") as f:
        return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("MemAvailable:"))


@pytest.mark.skipif(not Path("/proc/meminfo").exists(), reason="no /proc/meminfo on this system")
def test_free_memory_is_memavailable_not_free_pages() -> None:
    # MemAvailable counts the page cache the kernel would give back; the free pages
    # (os.sysconf's fallback) leave it out, and on a machine that has read a model they
    # are gigabytes lower. 10% absorbs what other processes allocate between the reads.
    before = _meminfo_available()
    got = budget.available_memory()
    after = _meminfo_available()
    assert got is not None and 0.9 * min(before, after) <= got <= 1.1 * max(before, after)


def test_free_gpu_memory_is_what_is_free_not_the_cards_total(monkeypatch: pytest.MonkeyPatch) -> None:
    # torch.cuda.mem_get_info(device) returns (free, total) in bytes; no GPU here, so a
    # function with that contract stands in for it
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (3 * 2**30, 80 * 2**30))
    assert budget.available_memory(torch.device("cuda", 0)) == 3 * 2**30


# ---- snapshot prefixes: progress ---------------------------------------------------------------
def test_prefix_rendering_shows_progress(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = ActStore.open(tmp_path / "s.zarr", create=True)
    capture_run(make_scenario(generation={"max_new_tokens": 1}), store, loaded_tiny("llama"), progress=True)
    # the bar counts the conversation's messages, one prefix each, in messages
    bar = re.search(r"render tiny prefixes: +\d+%\|[^|]*\| \d+/(\d+) \[[^]]*msg/s\]", capsys.readouterr().err)
    assert bar is not None and int(bar.group(1)) == len(MESSAGES)
    capture_run(make_scenario(generation={"max_new_tokens": 1}), store, loaded_tiny("llama"), progress=False)
    assert "prefixes" not in capsys.readouterr().err


@pytest.mark.slow
def test_smollm2_a_1mb_message_fails_on_its_8192_positions(tmp_path: Path) -> None:
    from actstore.models.gguf_cache import ensure_embedded_cache

    ensure_embedded_cache()  # a first-time cache build would print its own progress
    path = _scenario_file(tmp_path, "long.yaml", Path("smollm2"), [{"role": "user", "content": MB_MESSAGE}])
    proc, _ = _capture_limited(path, tmp_path / "store.zarr")
    assert proc.returncode == 2, proc.stderr
    _one_line(proc.stderr, str(path), "prompt.messages", "handles 8192")
    assert not (tmp_path / "store.zarr").exists()


def test_the_memory_refusal_states_each_part_in_readable_units() -> None:
    """Sizes from 0.1 GiB up are given in GiB, smaller ones in MiB (2**20 bytes), each to
    one decimal; the refusal names the total, the parts that are not zero and what is free."""
    need = budget.Estimate(attention_scores=3 * 2**30, attention_weights=2**29, activations=50 * 2**20, logits=0)
    with pytest.raises(ResourceError) as info:
        budget.check_memory(make_scenario(), need, available=2**30, force=False)
    assert ("capturing needs about 3.5 GiB (attention scores 3.0 GiB, attention weights 0.5 GiB, "
            "activations 50.0 MiB) but 1.0 GiB is available") in str(info.value)  # fmt: skip
    # the boundary: 0.1 GiB is 102.4 MiB
    assert budget.Estimate(0, 0, 102 * 2**20, 0).describe() == "activations 102.0 MiB"
    assert budget.Estimate(0, 0, 103 * 2**20, 0).describe() == "activations 0.1 GiB"
    assert budget.Estimate(0, 0, 0, 7 * 2**31).describe() == "logits 14.0 GiB"
    budget.check_memory(make_scenario(), need, available=need.total, force=False)  # exactly enough: no refusal


def test_preflight_checks_memory_unless_forced(monkeypatch: pytest.MonkeyPatch) -> None:
    """``preflight`` (public: a caller checks a scenario before loading a store) applies
    the memory check by default; only ``force=True`` skips it."""
    monkeypatch.setattr(budget, "available_memory", lambda device=None: 1024)
    sc, loaded = make_scenario(generation={"max_new_tokens": 2}), loaded_tiny("llama")
    with pytest.raises(ResourceError, match="but 0.0 MiB is available"):
        preflight(sc, loaded)
    preflight(sc, loaded, force=True)
