"""Damage is detected on read and named, never served as numbers.

Two kinds of damage, two guards:

* **Bytes changed** (flipped, truncated): every inner chunk ends in a crc32c checksum
  (``CHECKSUMMED`` closes each array's codec chain; a shard's index already had one), so
  a decode of damaged bytes raises instead of returning garbage.
* **An object gone**: Zarr reads a missing chunk object as its fill value, so a deleted
  shard would read as zeros. Runs written with :data:`INTEGRITY` store every chunk of the
  region they write (``write_empty_chunks``), so for them a missing chunk key is damage:
  :class:`StrictStore` raises :class:`MissingObjectError` naming the key. The one region
  never written is attention above the causal diagonal (shard column > shard row).

:class:`GuardedArray` turns either failure, raised deep inside Zarr, into a
:class:`~actstore.errors.DamagedRunError` that names the run and the array. Runs written
before checksums keep reading as they always did (``inspect`` says damage goes unseen).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from zarr.abc.store import ByteRequest, Store
from zarr.codecs import Crc32cCodec
from zarr.core.buffer import Buffer, BufferPrototype
from zarr.storage import WrapperStore

from actstore import naming
from actstore.errors import DamagedRunError

# Recorded in a run's metadata: its chunks carry checksums and every chunk is stored.
INTEGRITY = {"checksums": "crc32c", "all_chunks_stored": True}

# Decode failures that mean the stored bytes are not what was written: a checksum
# mismatch or undecodable index (ValueError), a compressor error (RuntimeError), a
# missing object (MissingObjectError is a KeyError).
DAMAGE_ERRORS: tuple[type[BaseException], ...] = (ValueError, RuntimeError, KeyError, EOFError)

_CHUNK_KEY = re.compile(r"^(?P<prefix>.*?)(?P<run>runs/[^/]+)/(?P<array>.+?)/c(?P<coords>(?:/\d+)*)$")
_ATTN = f"{naming.ACTS_GROUP}/attn_weights"


def checksummed(*compressors: Any) -> list[Any]:
    """A codec chain that ends in a crc32c checksum."""
    return [*compressors, Crc32cCodec()]


def has_checksums(meta: dict[str, Any]) -> bool:
    return bool(meta.get("integrity", {}).get("checksums"))


class MissingObjectError(KeyError):
    """A chunk object that a complete run must have is not in the store."""

    def __init__(self, key: str):
        super().__init__(key)
        self.key = key

    def __str__(self) -> str:
        return f"stored object {self.key} is missing"


def parse_chunk_key(key: str) -> tuple[str, str, tuple[int, ...]] | None:
    """``(run_id, array path, chunk coordinates)`` of a run's chunk key, else None."""
    m = _CHUNK_KEY.match(key)
    if not m:
        return None
    coords = tuple(int(c) for c in m["coords"].split("/")[1:])
    return m["run"].split("/", 1)[1], m["array"], coords


def may_be_missing(array: str, coords: tuple[int, ...]) -> bool:
    """Chunks a complete run legitimately lacks: attention shards above the diagonal."""
    return array == _ATTN and len(coords) == 4 and coords[3] > coords[2]


class CheckedReads(WrapperStore[Store]):
    """Reads through to a store, every value answered passing through ``_check`` (which
    raises for what must be there and is not)."""

    def _check(self, key: str, value: Buffer | None) -> Buffer | None:
        raise NotImplementedError

    async def get(
        self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None
    ) -> Buffer | None:
        return self._check(key, await self._store.get(key, prototype, byte_range))

    async def get_partial_values(
        self, prototype: BufferPrototype, key_ranges: Iterable[tuple[str, ByteRequest | None]]
    ) -> list[Buffer | None]:
        ranges = list(key_ranges)
        got = await self._store.get_partial_values(prototype, ranges)
        return [self._check(k, v) for (k, _), v in zip(ranges, got, strict=True)]


class StrictStore(CheckedReads):
    """Reads through to a store; a missing chunk of a complete run raises.

    ``lenient`` holds ids of runs written before :data:`INTEGRITY`: their missing chunks
    still read as the fill value (they skipped all-zero chunks on purpose).
    """

    def __init__(self, store: Store, lenient: Iterable[str] = ()) -> None:
        super().__init__(store)
        self.lenient: set[str] = set(lenient)

    def _with_store(self, store: Store) -> StrictStore:
        return type(self)(store, self.lenient)

    def _check(self, key: str, value: Buffer | None) -> Buffer | None:
        if value is None:
            parsed = parse_chunk_key(key)
            if parsed and parsed[0] not in self.lenient and not may_be_missing(parsed[1], parsed[2]):
                raise MissingObjectError(key)
        return value


def mark_lenient(group: Any, run_id: str) -> None:
    """Let a pre-integrity run read missing chunks as fill values, as it always did."""
    store = group.store_path.store
    if isinstance(store, StrictStore):
        store.lenient.add(run_id)


# How the compressors say an allocation failed (numcodecs' zstd: "Allocation error : not
# enough memory"): a decode that ran out of memory says nothing about the stored bytes.
_NO_MEMORY = ("not enough memory", "allocation error", "out of memory", "cannot allocate memory")


def raise_if_out_of_memory(e: BaseException, where: str) -> None:
    """Raise MemoryError (from ``e``) when ``e``, caught as possible damage, is a decode
    that could not allocate: the answer is more memory or a smaller read, not ``check``."""
    text = str(e).lower()
    if isinstance(e, RuntimeError) and any(s in text for s in _NO_MEMORY):
        raise MemoryError(f"{where}: a chunk's decoding could not allocate ({str(e).splitlines()[0][:120]})") from e


@contextmanager
def naming_damage(run_id: str, path: str) -> Iterator[None]:
    """Re-raise a decode failure of ``run_id``'s array ``path`` as a DamagedRunError."""
    try:
        yield
    except DamagedRunError:
        raise
    except DAMAGE_ERRORS as e:
        raise_if_out_of_memory(e, f"run {run_id}: {path}")
        raise DamagedRunError(run_id, f"{path}: {describe_damage(e)}") from e


def describe_damage(e: BaseException) -> str:
    if isinstance(e, MissingObjectError):
        return str(e)
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    if "checksum" in text.lower():
        return "a chunk fails its checksum (bytes changed on disk)"
    return f"a chunk cannot be decoded ({text[:120]})"


class GuardedArray:
    """A Zarr array whose reads name the run and array when the data is damaged.

    Everything but reads is the wrapped array's (shape, dtype, attrs, chunks...)."""

    def __init__(self, arr: Any, run_id: str, path: str):
        self._arr, self._run_id, self._path = arr, run_id, path

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("_arr", "_run_id", "_path"):  # unpickling: not set yet
            raise AttributeError(name)
        return getattr(self._arr, name)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self._arr.shape)

    @property
    def ndim(self) -> int:
        return len(self._arr.shape)

    @property
    def dtype(self) -> Any:
        return self._arr.dtype

    def __len__(self) -> int:
        return int(self._arr.shape[0])

    def __getitem__(self, key: Any) -> Any:
        with naming_damage(self._run_id, self._path):
            return self._arr[key]

    def get_orthogonal_selection(self, selection: Any) -> Any:
        with naming_damage(self._run_id, self._path):
            return self._arr.get_orthogonal_selection(selection)

    def __array__(self, dtype: Any = None, copy: Any = None) -> Any:
        import numpy as np

        data = self[...]
        return np.asarray(data, dtype=dtype) if dtype is not None else np.asarray(data)

    def __repr__(self) -> str:
        return f"GuardedArray({self._run_id!r}, {self._path!r}, shape={self.shape})"
