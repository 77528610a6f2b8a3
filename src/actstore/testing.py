"""Test helpers shared by actstore's test suite: tiny random models and a real tokenizer.

``tiny_model(family)`` builds a 2-layer random model of each supported family in-process
(no download), with the SmolLM2 tokenizer's vocabulary so prompts tokenize for real.
``test_tokenizer()`` is that tokenizer (it has a chat template); it is read from the
built-in model's cache folder when that exists, else extracted once from the GGUF
(~5 s) and saved under ``$ACTSTORE_CACHE/tokenizers/smollm2``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
import zarr
from zarr.abc.store import ByteRequest
from zarr.core.buffer import Buffer, BufferPrototype
from zarr.storage import LocalStore, WrapperStore

from actstore.models.gguf_cache import cache_root, embedded_cache_dir, embedded_gguf_path, file_lock
from actstore.store.store import ActStore

FAMILIES: tuple[str, ...] = ("llama", "mistral", "qwen2", "gemma", "gemma2", "gpt_neox", "gpt2", "phi3")

# Tiny but not degenerate: 4 heads, 2 KV heads where the family has GQA.
HIDDEN = 64
INTERMEDIATE = 96
LAYERS = 3
HEADS = 4
KV_HEADS = 2
MAX_POSITIONS = 512


def _tokenizer_cache_dir() -> Path:
    return cache_root() / "tokenizers" / "smollm2"


def _tokenizer_folder() -> Path:
    """A folder holding the SmolLM2 tokenizer, building the small cache if needed."""
    model_folder = embedded_cache_dir()
    if (model_folder / "tokenizer_config.json").is_file():
        return model_folder
    folder = _tokenizer_cache_dir()
    if (folder / "tokenizer_config.json").is_file():
        return folder
    from transformers import AutoTokenizer

    gguf = embedded_gguf_path()
    with file_lock(folder.parent / ".smollm2.lock"):
        if (folder / "tokenizer_config.json").is_file():
            return folder
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".smollm2.tmp-", dir=folder.parent))
        try:
            AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(str(tmp))
            os.replace(tmp, folder)  # atomic: readers never see a partial folder
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return folder


@lru_cache(maxsize=2)
def test_tokenizer(chat_template: bool = True) -> Any:
    """The SmolLM2 tokenizer; ``chat_template=False`` gives a separate copy without one.

    Cached and shared: callers must not mutate it.
    """
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(_tokenizer_folder()))
    if not chat_template:
        tok.chat_template = None
    return tok


test_tokenizer.__test__ = False  # type: ignore[attr-defined]  # not a pytest test


@lru_cache(maxsize=1)
def _vocab_size() -> int:
    return len(test_tokenizer())


def tiny_config(family: str) -> Any:
    """A fresh tiny ``PretrainedConfig`` of ``family`` (one of FAMILIES)."""
    import transformers as tf

    vocab = _vocab_size()
    tok = test_tokenizer()
    common: dict[str, Any] = dict(
        vocab_size=vocab,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    llama_like = dict(
        common,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=False,
    )
    if family == "llama":
        return tf.LlamaConfig(**llama_like)
    if family == "mistral":
        return tf.MistralConfig(**llama_like, sliding_window=None)
    if family == "qwen2":
        return tf.Qwen2Config(**llama_like)
    if family == "gemma":
        return tf.GemmaConfig(**llama_like, head_dim=HIDDEN // HEADS, hidden_act="gelu_pytorch_tanh")
    if family == "gemma2":
        return tf.Gemma2Config(
            **llama_like,
            head_dim=HIDDEN // HEADS,
            query_pre_attn_scalar=HIDDEN // HEADS,
            hidden_activation="gelu_pytorch_tanh",
            sliding_window=8,  # small window so the sliding layers actually differ
        )
    if family == "gpt_neox":
        return tf.GPTNeoXConfig(
            **common,
            hidden_size=HIDDEN,
            intermediate_size=INTERMEDIATE,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            max_position_embeddings=MAX_POSITIONS,
            use_parallel_residual=True,
            tie_word_embeddings=False,
        )
    if family == "gpt2":
        return tf.GPT2Config(
            **common,
            n_embd=HIDDEN,
            n_inner=INTERMEDIATE,
            n_layer=LAYERS,
            n_head=HEADS,
            n_positions=MAX_POSITIONS,
        )
    if family == "phi3":
        return tf.Phi3Config(**llama_like)
    raise ValueError(f"unknown test family {family!r}; choose from {', '.join(FAMILIES)}")


def tiny_model(family: str, *, attn_implementation: str | None = None, seed: int = 0) -> tuple[Any, Any]:
    """(model, tokenizer): a fresh seeded random float32 model in eval mode, grads off.

    Not cached: tests attach hooks to models, so each call builds a new one (~0.1 s).
    """
    from transformers import AutoModelForCausalLM

    config = tiny_config(family)
    kwargs: dict[str, Any] = {"dtype": torch.float32}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, **kwargs)
    model.eval()
    model.requires_grad_(False)
    return model, test_tokenizer()


# A short conversation and two references, shared by tests that capture tiny runs.
SAMPLE_MESSAGES: list[dict[str, str]] = [
    {"role": "system", "content": "You are a calm assistant."},
    {"role": "user", "content": "I am thrilled, the sun is out!"},
    {"role": "assistant", "content": "That sounds lovely."},
    {"role": "user", "content": "Now I am scared of the storm."},
]
SAMPLE_REFERENCES: list[dict[str, Any]] = [
    {"label": "joy", "messages": [{"role": "user", "content": "I am so happy!"}]},
    {"label": "fear", "messages": [{"role": "user", "content": "I am terrified."}]},
]


def tiny_loaded(family: str = "llama", *, eager: bool = True) -> Any:
    """A tiny random model wrapped as the LoadedModel that capture takes (CPU, float32)."""
    import torch

    from actstore.models.loading import LoadedModel

    model, tok = tiny_model(family, attn_implementation="eager" if eager else None)
    return LoadedModel(
        model=model, tokenizer=tok, device=torch.device("cpu"), dtype=torch.float32,
        source="tiny random model", model_id=f"tiny-{family}",
    )  # fmt: skip


# An instrumented store: proves what a query reads (objects, bytes), in tests and benchmarks.
class CountingStore(WrapperStore[Any]):
    """Records (key, bytes) of every get / get_partial_values."""

    def __init__(self, store: Any, log: list[tuple[str, int]] | None = None) -> None:
        super().__init__(store)
        self.log: list[tuple[str, int]] = [] if log is None else log

    def _with_store(self, store: Any) -> CountingStore:
        return type(self)(store, self.log)

    async def get(
        self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None
    ) -> Buffer | None:
        buf = await self._store.get(key, prototype, byte_range)
        self.log.append((key, 0 if buf is None else len(buf)))
        return buf

    async def get_partial_values(self, prototype: BufferPrototype, key_ranges: Any) -> list[Buffer | None]:
        key_ranges = list(key_ranges)
        bufs = await self._store.get_partial_values(prototype, key_ranges)
        for (key, _), buf in zip(key_ranges, bufs, strict=True):
            self.log.append((key, 0 if buf is None else len(buf)))
        return bufs

    def data_reads(self) -> list[tuple[str, int]]:
        """Reads of array data (not metadata, not the catalog)."""
        return [(k, n) for k, n in self.log if not k.endswith("zarr.json") and not k.startswith("catalog/")]

    def reset(self) -> None:
        self.log.clear()


def counting_store(location: str | Path) -> tuple[ActStore, CountingStore]:
    cs = CountingStore(LocalStore(str(location), read_only=True))
    return ActStore(cs, str(location), zarr.open_group(store=cs, mode="r")), cs


def topic_texts(n: int, *, min_chars: int = 20, max_chars: int = 240) -> list[tuple[str, str]]:
    """``n`` (topic, text) pairs of varied lengths: real English text, offline, cut from
    Python's own help topics (``pydoc_data.topics``, shipped with every Python)."""
    from pydoc_data.topics import topics

    keys = sorted(topics)
    out = []
    for i in range(n):
        key = keys[(i * 7) % len(keys)]
        text = " ".join(topics[key].split())  # one line: .txt input is one sequence per line
        start = (i * 53) % max(1, len(text) // 2)
        length = min_chars + (i * 37) % (max_chars - min_chars)
        out.append((key, text[start : start + length].strip() or key))
    return out
