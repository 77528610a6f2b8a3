"""The store's strict reads over a plain Zarr ``MemoryStore``: a chunk object a complete run
must hold and does not is an error that names its key, whether it is asked for alone
(``get``) or in a batch of byte ranges (``get_partial_values``); what a run may lack
(attention shards above the diagonal, every chunk of a run written before checksums)
reads as absent, and present objects read as the bytes on disk."""

from __future__ import annotations

import pytest
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import MemoryStore

from actstore.store.integrity import MissingObjectError, StrictStore

RUN = "runs/r1"
PRESENT = f"{RUN}/acts/hidden_out/c/0/0/0"
MISSING = f"{RUN}/acts/hidden_out/c/0/1/0"
ABOVE_DIAGONAL = f"{RUN}/acts/attn_weights/c/0/0/0/1"


@pytest.fixture()
def memory() -> tuple[MemoryStore, bytes]:
    # MemoryStore keeps the store contract a batch read relies on (None for an absent key;
    # zarr's LocalStore raises FileNotFoundError there instead)
    data = bytes(range(64))
    store = MemoryStore()
    sync(store.set(PRESENT, default_buffer_prototype().buffer.from_bytes(data)))
    return store, data


def _partial(store: StrictStore, keys: list[str]) -> list[bytes | None]:
    got = sync(store.get_partial_values(default_buffer_prototype(), [(k, None) for k in keys]))
    return [None if b is None else b.to_bytes() for b in got]


def test_a_batch_of_reads_names_the_missing_chunk(memory: tuple[MemoryStore, bytes]) -> None:
    store, data = StrictStore(memory[0]), memory[1]
    assert _partial(store, [PRESENT, ABOVE_DIAGONAL]) == [data, None]
    with pytest.raises(MissingObjectError) as info:
        _partial(store, [PRESENT, MISSING])
    assert info.value.key == MISSING and str(info.value) == f"stored object {MISSING} is missing"


def test_a_single_read_names_the_missing_chunk(memory: tuple[MemoryStore, bytes]) -> None:
    store, data = StrictStore(memory[0]), memory[1]
    got = sync(store.get(PRESENT, default_buffer_prototype()))
    assert got is not None and got.to_bytes() == data
    with pytest.raises(MissingObjectError, match=f"stored object {MISSING} is missing"):
        sync(store.get(MISSING, default_buffer_prototype()))


def test_a_run_written_before_checksums_reads_missing_chunks_as_absent(
    memory: tuple[MemoryStore, bytes],
) -> None:
    store = StrictStore(memory[0], lenient=["r1"])
    assert _partial(store, [MISSING]) == [None]
    assert sync(store.get(MISSING, default_buffer_prototype())) is None


def test_a_decode_that_cannot_allocate_is_out_of_memory_not_damage() -> None:
    """numcodecs' zstd reports a failed allocation as a RuntimeError (this message is the
    one it gave under an address-space limit in test_out_of_core); that is no evidence
    about the stored bytes, so it is a MemoryError, while a codec's other errors stay damage."""
    from actstore.errors import DamagedRunError
    from actstore.store import integrity

    with pytest.raises(MemoryError, match=r"^run r1: acts/q: a chunk's decoding could not allocate \(Zstd"):
        with integrity.naming_damage("r1", "acts/q"):
            raise RuntimeError("Zstd decompression error: b'Allocation error : not enough memory'")
    with pytest.raises(DamagedRunError, match="acts/q: a chunk cannot be decoded"):
        with integrity.naming_damage("r1", "acts/q"):
            raise RuntimeError("Zstd decompression error: b'Unknown frame descriptor'")
    with pytest.raises(DamagedRunError, match="checksum"):
        with integrity.naming_damage("r1", "acts/q"):
            raise ValueError("Stored and computed checksum do not match")
