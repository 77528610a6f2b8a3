"""Few requests per run on object storage: reading the catalog, and writing a run.

Writing (:class:`FreshPrefixStore`): zarr probes for existing nodes before it creates an
array or a group (the node itself and every parent: HEAD, GET and LIST requests). On S3
a capture of ~30 arrays made ~390 requests for ~75 objects. A run is written under a
brand-new, uniquely named prefix that no other writer touches, so every key this writer
did not write is known not to exist: the wrapper answers those probes itself and only
the writes go out.

Reading the catalog:

Data flow of one listing (:func:`read_catalog`)::

    LIST catalog/  (one request per 1,000 keys, with each key's ETag or mtime+size)
      -> GET catalog/.snapshot.json   (if listed: entries as of its writing, with versions)
      -> GET every entry that is new or changed since the snapshot, concurrently
      -> (if many were fetched) PUT a fresh snapshot, best effort

The listing stays the truth: a run is visible iff its own entry key is listed, so the
commit-marker rule is untouched (an entry in the snapshot whose key is gone is dropped,
one whose version changed is read again). The snapshot only saves GETs: with 1,000 runs
on loopback S3 the entry-by-entry read took ~6 s (one request per run, even when run
64 at a time), the LIST + one snapshot GET a fraction of that; see benchmarks/results/
scale.md. Concurrent snapshot writers are harmless: each writes one whole object, and
any of them is a valid cache. Readers without write permission simply skip the PUT.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

from zarr.abc.store import ByteRequest, Store
from zarr.core.buffer import Buffer, BufferPrototype, default_buffer_prototype
from zarr.storage import FsspecStore, LocalStore, WrapperStore

from actstore import naming

SNAPSHOT_KEY = f"{naming.CATALOG_PREFIX}/.snapshot.json"  # dot: never mistaken for a run entry
SNAPSHOT_MIN_FETCHED = 32  # rewrite the snapshot once a listing had to GET this many entries
CONCURRENCY = 64  # entry GETs in flight at once


async def list_versions(zstore: Store, prefix: str) -> dict[str, str | None]:
    """Keys under ``prefix`` (relative to the store) with a version that changes whenever
    the object is rewritten (S3 ETag, else mtime+size); None when the backend has none."""
    if isinstance(zstore, LocalStore):
        return await asyncio.to_thread(_local_versions, Path(zstore.root), prefix)
    if isinstance(zstore, FsspecStore):
        base = f"{zstore.path}/{prefix}".rstrip("/")
        try:
            found = await zstore.fs._find(base, detail=True, withdirs=False)
        except FileNotFoundError:
            return {}
        root = zstore.path.rstrip("/") + "/"
        return {name.removeprefix(root): _version(info) for name, info in found.items()}
    return {k: None async for k in zstore.list_prefix(prefix)}


def _local_versions(root: Path, prefix: str) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    try:
        with os.scandir(root / prefix) as it:
            for e in it:
                if e.is_file():
                    st = e.stat()
                    out[f"{prefix.rstrip('/')}/{e.name}"] = f"{st.st_size}:{st.st_mtime_ns}"
    except FileNotFoundError:
        pass
    return out


def _version(info: dict[str, Any]) -> str | None:
    for field in ("ETag", "etag", "md5Hash", "mtime", "LastModified", "last_modified"):
        if info.get(field):
            return f"{info.get('size')}:{info[field]}"
    return None


def is_entry_key(key: str) -> bool:
    name = key.rsplit("/", 1)[-1]
    return name.endswith(".json") and not name.startswith(".")  # ".tmp-*", ".snapshot.json"


async def read_catalog(
    zstore: Store, *, write_snapshot: bool = True, problems: list[str] | None = None
) -> list[dict[str, Any]]:
    """Every committed run's catalog entry (unsorted); see the module docstring.

    An entry's key is the truth about its run id: an entry whose ``id`` is missing or
    differs is served under its key's id (so no run is listed twice), and one that does
    not parse is left out. Both are described in ``problems`` when given."""
    listed = await list_versions(zstore, naming.CATALOG_PREFIX + "/")
    keys = {k: v for k, v in listed.items() if is_entry_key(k)}
    snap = await get_json(zstore, SNAPSHOT_KEY) if SNAPSHOT_KEY in listed else None
    snap = None if snap is GONE else snap
    cached: dict[str, Any] = (snap or {}).get("entries", {}) if isinstance(snap, dict) else {}
    fresh = {k: cached[k] for k, v in keys.items() if v is not None and cached.get(k, {}).get("version") == v}
    missing = [k for k in keys if k not in fresh]
    sem = asyncio.Semaphore(CONCURRENCY)

    async def get(key: str) -> tuple[str, Any]:
        async with sem:
            return key, await get_json(zstore, key)

    for key, entry in await asyncio.gather(*(get(k) for k in missing)):
        if entry is GONE:  # deleted since the LIST
            continue
        if isinstance(entry, dict):
            fresh[key] = {"version": keys[key], "entry": entry}
        elif problems is not None:  # entries are written whole (rename / one PUT): this is damage
            problems.append(f"catalog entry {key} is unreadable (not a JSON object); its run is not listed")
    out = []
    for key, item in fresh.items():
        entry, run_id = item["entry"], entry_run_id(key)
        if naming.name_problem(run_id, naming.MAX_RUN_ID) is not None:  # no run group can have this id
            if problems is not None:
                problems.append(f"catalog entry {key} has a key that is not a run id; its run is not listed")
            continue
        if entry.get("id") != run_id:
            if problems is not None:
                problems.append(
                    f"catalog entry {key} names run {entry.get('id')!r}; listed as {run_id}, its key"
                )
            entry = {**entry, "id": run_id}
        out.append(entry)
    if write_snapshot and len(missing) >= SNAPSHOT_MIN_FETCHED:
        await _write_snapshot(zstore, {k: v for k, v in fresh.items() if v["version"] is not None})
    return out


def entry_run_id(key: str) -> str:
    """The run id a catalog entry key commits: ``catalog/<id>.json``."""
    return key.rsplit("/", 1)[-1].removesuffix(".json")


GONE = object()  # a key listed, then deleted before its GET


async def get_json(zstore: Store, key: str) -> Any:
    """The JSON document at ``key``; GONE if there is no such key, None if it does not parse."""
    buf = await zstore.get(key, prototype=default_buffer_prototype())
    if buf is None:
        return GONE
    try:
        return json.loads(buf.to_bytes())
    except ValueError:
        return None


async def _write_snapshot(zstore: Store, entries: dict[str, Any]) -> None:
    data = json.dumps({"format": 1, "entries": entries}, separators=(",", ":")).encode()
    try:
        await put_atomic(zstore, SNAPSHOT_KEY, data)
    except (OSError, PermissionError, NotImplementedError, ValueError):
        pass  # a read-only reader: the snapshot is only a cache


async def put_atomic(zstore: Store, key: str, data: bytes) -> None:
    """Write one object so readers see all of it or nothing: one PUT on object storage,
    write-to-temp + rename on local disk."""
    if isinstance(zstore, LocalStore):
        await asyncio.to_thread(_local_put_atomic, Path(zstore.root) / key, data)
    else:
        await zstore.set(key, default_buffer_prototype().buffer.from_bytes(data))


def create_temp(folder: Path) -> tuple[int, str]:
    """A new ``.tmp-*`` file in ``folder``, open for writing: (fd, path). Unlike
    mkstemp's 0600, its mode follows the umask, as every other file of the store, so the
    rename that publishes it leaves it readable by the store's other users."""
    while True:
        tmp = str(folder / f".tmp-{secrets.token_hex(8)}")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:
            continue


def _local_put_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = create_temp(path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---- writing a run ----------------------------------------------------------------------------
class FreshPrefixStore(WrapperStore[Store]):
    """A store rooted at a new prefix that only this writer writes (see module docstring).

    Reads of keys it wrote, and all writes, go to the wrapped store; a key it did not
    write does not exist, without asking. Listing answers from the same record.
    """

    def __init__(self, store: Store) -> None:
        super().__init__(store)
        self._written: set[str] = set()
        self._metadata: dict[str, bytes] = {}  # zarr.json documents as last written here

    async def get(
        self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None
    ) -> Buffer | None:
        if key not in self._written:
            return None
        if byte_range is None and key in self._metadata:  # zarr re-reads parents per array
            return prototype.buffer.from_bytes(self._metadata[key])
        return await self._store.get(key, prototype, byte_range)

    async def get_partial_values(
        self, prototype: BufferPrototype, key_ranges: Iterable[tuple[str, ByteRequest | None]]
    ) -> list[Buffer | None]:
        ranges = list(key_ranges)
        known = [(k, r) for k, r in ranges if k in self._written]
        got = iter(await self._store.get_partial_values(prototype, known) if known else [])
        return [next(got) if k in self._written else None for k, _ in ranges]

    async def exists(self, key: str) -> bool:
        return key in self._written

    async def set(self, key: str, value: Buffer) -> None:
        await self._store.set(key, value)
        self._written.add(key)
        if key.rsplit("/", 1)[-1] == "zarr.json":
            self._metadata[key] = value.to_bytes()

    async def set_if_not_exists(self, key: str, value: Buffer) -> None:
        if key not in self._written:
            await self.set(key, value)

    async def _set_many(self, values: Iterable[tuple[str, Buffer]]) -> None:
        for key, value in values:
            await self.set(key, value)

    async def delete(self, key: str) -> None:
        if key in self._written:
            await self._store.delete(key)
            self._written.discard(key)
            self._metadata.pop(key, None)

    async def is_empty(self, prefix: str) -> bool:
        return not any(k.startswith(prefix) for k in self._written)

    async def _listed(self, keys: Iterable[str]) -> AsyncIterator[str]:
        for k in sorted(keys):
            yield k

    def list(self) -> AsyncIterator[str]:
        return self._listed(self._written)

    def list_prefix(self, prefix: str) -> AsyncIterator[str]:
        return self._listed(k for k in self._written if k.startswith(prefix))

    def list_dir(self, prefix: str) -> AsyncIterator[str]:
        base = prefix.rstrip("/") + "/" if prefix else ""
        return self._listed({k[len(base) :].split("/", 1)[0] for k in self._written if k.startswith(base)})

    async def delete_dir(self, prefix: str) -> None:
        for k in [k for k in self._written if k.startswith(prefix)]:
            await self.delete(k)


def fresh_prefix_store(zstore: Store, prefix: str) -> FreshPrefixStore | None:
    """A :class:`FreshPrefixStore` rooted at ``prefix`` of ``zstore`` (None: a backend
    this module does not know how to re-root; callers then write through ``zstore``)."""
    if isinstance(zstore, LocalStore):
        return FreshPrefixStore(LocalStore(Path(zstore.root) / prefix))
    if isinstance(zstore, FsspecStore):
        sub = FsspecStore(
            fs=zstore.fs, path=f"{zstore.path}/{prefix}", allowed_exceptions=zstore.allowed_exceptions
        )
        return FreshPrefixStore(sub)
    return None
