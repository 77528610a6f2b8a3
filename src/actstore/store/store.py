"""A store: one Zarr v3 hierarchy holding many runs, plus a catalog of committed runs.

Layout::

    <store>/zarr.json                 root group (attrs: actstore format version)
    <store>/runs/<run_id>/...         one group per run (arrays, metadata in attrs)
    <store>/catalog/<run_id>.json     one small JSON per committed run

A run's catalog entry is written last, in one atomic put (rename on local disk, one
PUT on object storage). It is the commit marker: readers list ``catalog/`` only, so a
capture killed half-way leaves an orphan group that no reader ever sees, and two
captures never touch the same key, so concurrent writers both land. Listing the catalog
reads the small JSON entries concurrently and never opens a tensor array.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import warnings
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import zarr
from zarr.abc.store import Store
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import FsspecStore, LocalStore

from actstore import naming
from actstore.errors import DamagedRunError, DamageWarning, RunNotFoundError, StoreError
from actstore.paths import check_folder, describe, is_user_error
from actstore.store.integrity import StrictStore

FORMAT_VERSION = 1
_CONSOLIDATED_WARNING = "Consolidated metadata is currently not part"  # of the v3 spec; zarr-python reads it
_ROOT_ATTR = "actstore"


def _is_url(location: str) -> bool:
    return "://" in location and not location.startswith("file://")


def open_zarr_store(
    location: str | os.PathLike[str],
    storage_options: dict[str, Any] | None = None,
    *,
    read_only: bool = False,
) -> LocalStore | FsspecStore:
    """A zarr Store for a local path or an fsspec URL (``s3://bucket/prefix``)."""
    loc = os.fspath(location)
    if _is_url(loc):
        opts = dict(storage_options or {})
        if loc.startswith(("s3://", "s3a://")):
            # s3fs HEADs every whole-object read to decide on a chunked parallel download;
            # our whole-object reads are small (metadata, snapshot rows): one GET is enough.
            opts.setdefault("max_concurrency", 1)
            # botocore's legacy default retries a refused connection 5 times with backoff;
            # the standard mode's 3 attempts (AWS's recommended default) fail in ~1 s.
            config = dict(opts.get("config_kwargs") or {})
            config.setdefault("retries", {"mode": "standard", "total_max_attempts": 3})
            opts["config_kwargs"] = config
        return FsspecStore.from_url(loc, storage_options=opts, read_only=read_only)
    if loc.startswith("file://"):
        loc = loc[len("file://") :]
    return LocalStore(loc, read_only=read_only)


def _missing(loc: str) -> str:
    return f"no actstore store at {loc} (run `actstore capture` first, or check --store)"


def check_location(location: str | os.PathLike[str], *, create: bool = False) -> None:
    """Raise StoreError, creating nothing, when a local ``location`` is no store to read
    (``create=False``: missing, or a file) or no folder to capture into (a file, or not
    writable). URLs are checked by the first request."""
    loc = os.fspath(location)
    if _is_url(loc):
        return
    path = Path(loc.removeprefix("file://"))
    if not create:
        if path.exists() and not path.is_dir():
            raise StoreError(f"--store {loc}: a file, not an actstore store folder (check --store)")
        if not path.is_dir():  # zarr's LocalStore would create it on open
            raise StoreError(_missing(loc))
        return
    check_folder(path, "--store", StoreError)
    for sub in (naming.RUNS_PREFIX, naming.CATALOG_PREFIX):  # a shared store made by another user
        if (path / sub).is_dir():
            check_folder(path / sub, "--store", StoreError)


def _reach_error(e: Exception, loc: str, storage_options: dict[str, Any] | None) -> StoreError | None:
    """A StoreError naming the endpoint when object storage cannot be reached (or a
    local store cannot be written), else None (a bug: keep the traceback)."""
    if not _is_url(loc):
        return (
            StoreError(describe(e, "--store", loc)) if isinstance(e, OSError) and is_user_error(e) else None
        )
    try:
        from botocore.exceptions import EndpointConnectionError, NoCredentialsError
    except ImportError:  # not s3fs: only the builtin families below
        EndpointConnectionError = NoCredentialsError = ConnectionError  # noqa: N806
    endpoint = (
        (storage_options or {}).get("endpoint_url")
        or os.environ.get("AWS_ENDPOINT_URL")
        or "the default endpoint"
    )
    if isinstance(e, NoCredentialsError):
        return StoreError(
            f"--store {loc}: no credentials for object storage (set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY, or --storage-option key=... secret=...)"
        )
    if isinstance(e, EndpointConnectionError | ConnectionError | TimeoutError):
        return StoreError(
            f"--store {loc}: cannot reach object storage at {endpoint} ({type(e).__name__}); "
            "check --storage-option endpoint_url and that the server is up"
        )
    return None


def catalog_entry(meta: dict[str, Any], run_id: str) -> dict[str, Any]:
    """A run's catalog row, built from its metadata: what `actstore ls` shows without
    opening any array."""
    return {
        "id": run_id,
        "scenario": meta["scenario"]["name"],
        "model": meta["model"]["id"],
        "created_at": meta["created_at"],
        "prompt_len": meta["prompt_len"],
        "n_steps": meta["n_steps"],
        "n_positions": meta["n_positions"],
        "n_layers": len(meta["layers"]),
        "layers": meta["layers"],
        "sources": meta["sources"],
        "n_snapshots": len(meta["snapshots"]),
        "n_references": len(meta["references"]),
        "store_dtype": meta["store_dtype"],
        "generated_text": meta["generated_text"][:200],
        # The id shared by the runs of one scenario file (absent in older stores).
        "scenario_run": meta.get("scenario_run"),
        "prompt_index": meta.get("prompt_index"),
    }


class ActStore:
    """Many runs in one Zarr store.

    >>> store = ActStore.open("stores/actstore.zarr")          # doctest: +SKIP
    >>> store.catalog()                                         # doctest: +SKIP
    >>> run = store.run("latest"); run.array("hidden_out")       # doctest: +SKIP
    """

    def __init__(self, zstore: Store, location: str, root: zarr.Group):
        self.zstore = zstore
        self.location = location
        self.root = root
        self._writing: dict[str, Any] = {}  # run id -> the store its group is being written through

    # ---- opening -------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        location: str | os.PathLike[str],
        *,
        create: bool = False,
        storage_options: dict[str, Any] | None = None,
    ) -> ActStore:
        loc = os.fspath(location)
        check_location(loc, create=create)
        zstore = open_zarr_store(loc, storage_options)
        strict = StrictStore(zstore)  # reads: a missing chunk is damage, not zeros
        try:
            # Root attrs go in with the creating PUT: concurrent first writers then write the
            # same zarr.json, and no reader ever sees a root without them.
            attrs: dict[str, Any] | None = (
                {_ROOT_ATTR: {"format_version": FORMAT_VERSION}} if create else None
            )
            try:
                root = zarr.open_group(
                    store=strict, mode="r+" if not create else "a", zarr_format=3, attributes=attrs
                )
            except zarr.errors.ContainsGroupError:
                # Another writer created the root between zarr's check and its write: the
                # store exists now, which is all a creating open wanted.
                root = zarr.open_group(store=strict, mode="r+", zarr_format=3)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError) as e:  # type: ignore[attr-defined]
            raise StoreError(_missing(loc)) from e
        except Exception as e:
            err = _reach_error(e, loc, storage_options)
            if err is None:
                raise
            raise err from e
        if create and _ROOT_ATTR not in root.attrs:
            root.attrs[_ROOT_ATTR] = {"format_version": FORMAT_VERSION}
        elif _ROOT_ATTR not in root.attrs:
            raise StoreError(f"{loc}: a Zarr group, but not an actstore store (no '{_ROOT_ATTR}' attribute)")
        return cls(zstore, loc, root)

    # ---- writing ---------------------------------------------------------------------
    def new_run_id(self, name: str) -> str:
        """``<name>_<utc timestamp>_<random>``: sortable by time, unique across writers."""
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
        return naming.check_run_id(f"{name}_{stamp}_{secrets.token_hex(3)}")

    def create_run_group(self, run_id: str) -> zarr.Group:
        """The new run's group, for writing. It is opened on a store rooted at the run's
        own prefix that answers zarr's existence probes locally (store/remote.py): on
        S3 that is ~75 instead of ~390 requests per capture. Read runs through ``run()``."""
        from actstore.store.remote import fresh_prefix_store

        try:
            runs = self.root.require_group(naming.RUNS_PREFIX)
        except zarr.errors.ContainsGroupError:
            # The first captures into a new store race to create "runs" (zarr checks,
            # then writes): another writer made it, which is all this one needed.
            runs = self.root.require_group(naming.RUNS_PREFIX)
        path = naming.run_path(run_id)
        sub = fresh_prefix_store(self.zstore, path)
        if sub is None:
            return runs.create_group(run_id)
        if sync(self.zstore.exists(f"{path}/zarr.json")):  # the one real check: ids are unique
            raise StoreError(f"{self.location}: run {run_id} already exists")
        self._writing[run_id] = sub
        return zarr.open_group(store=sub, mode="w-", zarr_format=3)

    def _consolidate(self, run_id: str) -> None:
        """Put every array's metadata of the finished run into its group's zarr.json, so a
        reader opens a run, and all its arrays, with one GET (a query over N runs would
        otherwise make ~16 metadata requests per run, one after another)."""
        # A global, idempotent filter rather than catch_warnings, which is not thread-safe
        # (writers run concurrently) and the warning is raised on zarr's event-loop thread.
        warnings.filterwarnings("ignore", message=_CONSOLIDATED_WARNING, category=UserWarning)
        sub = self._writing.pop(run_id, None)
        if sub is not None:  # served from what this writer wrote: one PUT, no reads
            zarr.consolidate_metadata(sub)
        else:  # written through another ActStore object: list and read it back
            zarr.consolidate_metadata(self.zstore, path=naming.run_path(run_id))

    def commit(self, run_id: str, entry: dict[str, Any]) -> None:
        """Make a run visible: consolidate its metadata, then write its catalog entry
        atomically, as the last step. A committed run is never modified again."""
        self._consolidate(run_id)
        data = json.dumps({**entry, "id": run_id}, sort_keys=True).encode()
        key = naming.catalog_key(run_id)
        if isinstance(self.zstore, LocalStore):
            from actstore.store.remote import _local_put_atomic

            # In this thread, not zarr's: an interrupt cannot leave the rename pending
            # behind a discard(), and the temp file goes with the failure.
            _local_put_atomic(Path(self.zstore.root) / key, data)
        else:
            buf = default_buffer_prototype().buffer.from_bytes(data)
            sync(self.zstore.set(key, buf))

    def discard(self, run_id: str) -> None:
        """Best effort: remove the group of a run whose writing failed or was interrupted
        (left behind, it is an orphan no reader sees, for ``actstore gc``). Never a
        committed run: an interrupt may land just after its catalog entry was written."""
        self._writing.pop(run_id, None)
        try:
            sync(_settle())  # a write the interrupt left in flight would land after the delete
            if sync(self.zstore.exists(naming.catalog_key(run_id))):
                return
            path = naming.run_path(run_id)
            sync(self.zstore.delete_dir(path))
            if isinstance(self.zstore, LocalStore):  # delete_dir leaves the emptied folders
                shutil.rmtree(Path(self.zstore.root) / path, ignore_errors=True)
        except Exception:  # noqa: BLE001 - cleanup must not hide the original error
            pass

    # ---- reading ---------------------------------------------------------------------
    def catalog_entries(self) -> list[dict[str, Any]]:
        """Every committed run's catalog entry, oldest first. Reads entries concurrently.
        A damaged entry is a :class:`DamageWarning` naming it, never a silent gap."""
        problems: list[str] = []
        entries = sync(self._read_catalog(problems))
        for p in problems:
            warnings.warn(f"{self.location}: {p} (see `actstore check`)", DamageWarning, stacklevel=2)
        return entries

    async def _read_catalog(self, problems: list[str] | None = None) -> list[dict[str, Any]]:
        # One LIST, one snapshot GET, then only the entries newer than the snapshot
        # (concurrently): see store/remote.py for why and for the numbers.
        from actstore.store.remote import read_catalog

        entries = await read_catalog(self.zstore, problems=problems)
        return sorted(entries, key=lambda e: (str(e.get("created_at", "")), e["id"]))

    def catalog(self, entries: list[dict[str, Any]] | None = None) -> Any:
        """The catalog (or ``entries`` of it, already read) as a pandas DataFrame, one row per run."""
        import pandas as pd

        rows = self.catalog_entries() if entries is None else entries
        columns = [
            "id", "scenario", "model", "created_at", "prompt_len", "n_steps",
            "n_positions", "n_layers", "sources", "n_snapshots", "n_references", "scenario_run",
        ]  # fmt: skip
        df = pd.DataFrame(rows)
        for c in columns:
            if c not in df:
                df[c] = None
        return df[columns + [c for c in df.columns if c not in columns]]

    def run_ids(self) -> list[str]:
        return [e["id"] for e in self.catalog_entries()]

    def resolve(self, selector: str = "latest", entries: list[dict[str, Any]] | None = None) -> list[str]:
        """Run ids for a selector: an exact id, a scenario-run id (every run captured
        from one scenario file, in order), an id prefix, a scenario name (every run of
        it), ``latest``, ``latest:<scenario>`` or ``all``. ``entries``: a catalog already
        read (else it is read here)."""
        entries = self.catalog_entries() if entries is None else entries
        if not entries:
            raise RunNotFoundError(f"{self.location}: the store holds no committed runs")
        ids = [e["id"] for e in entries]
        if selector == "all":
            return ids
        if selector == "latest":
            return [ids[-1]]
        if selector.startswith("latest:"):
            name = selector.split(":", 1)[1]
            named = [e["id"] for e in entries if e.get("scenario") == name]
            if not named:
                raise RunNotFoundError(f"{self.location}: no run of scenario {name!r}")
            return [named[-1]]
        if selector in ids:
            return [selector]
        by_file = [e["id"] for e in entries if e.get("scenario_run") == selector]
        if by_file:
            return by_file
        by_name = [e["id"] for e in entries if e.get("scenario") == selector]
        if by_name:
            return by_name
        by_prefix = [i for i in ids if i.startswith(selector)]
        if len(by_prefix) == 1:
            return by_prefix
        if by_prefix:
            shown = ", ".join(by_prefix[:5]) + (", ..." if len(by_prefix) > 5 else "")
            raise RunNotFoundError(f"{selector!r} matches {len(by_prefix)} runs ({shown}); give more of the id")
        raise RunNotFoundError(
            f"{self.location}: no run matches {selector!r} (see `actstore ls` for the run ids)"
        )

    def resolve_many(
        self, selectors: Iterable[str], entries: list[dict[str, Any]] | None = None
    ) -> list[str]:
        entries = self.catalog_entries() if entries is None else entries  # one listing for all
        out: list[str] = []
        seen: set[str] = set()
        for s in selectors:
            new = [i for i in self.resolve(s, entries) if i not in seen]
            out += new
            seen.update(new)
        return out

    def run(self, selector: str = "latest") -> Any:
        """A lazy reader for one committed run (a scenario-run id: its latest run)."""

        listed = self.catalog_entries()
        ids = self.resolve(selector, listed)
        if len(ids) > 1 and all(e.get("scenario_run") == selector for e in listed if e["id"] in ids):
            ids = ids[-1:]
        if len(ids) > 1:
            raise RunNotFoundError(f"{selector!r} names {len(ids)} runs; pick one id")
        entry = next(e for e in listed if e["id"] == ids[0])
        return self.runs_from([entry], skip_damaged=False)[0]

    def runs(self, selectors: Iterable[str] = ("all",), *, skip_damaged: bool = False) -> list[Any]:
        """Readers of the selected runs. A run whose group cannot be opened (metadata
        missing or corrupt) raises a DamagedRunError naming it, or with ``skip_damaged``
        is left out with a DamageWarning naming it."""
        listed = self.catalog_entries()
        entries = {e["id"]: e for e in listed}
        ids = self.resolve_many(selectors, listed)
        return self.runs_from([entries[i] for i in ids], skip_damaged=skip_damaged)

    def runs_from(self, entries: list[dict[str, Any]], *, skip_damaged: bool = False) -> list[Any]:
        from actstore.store.reader import RunReader

        out = []
        for entry, opened in zip(entries, self._open_groups([e["id"] for e in entries]), strict=True):
            try:
                if isinstance(opened, BaseException):
                    raise DamagedRunError(entry["id"], f"its group does not open ({_first_line(opened)})")
                out.append(RunReader(entry["id"], opened, entry, store=self))
            except DamagedRunError as e:
                if not skip_damaged:
                    raise
                warnings.warn(f"skipped: {e}", DamageWarning, stacklevel=2)
        return out

    def _open_groups(self, run_ids: list[str]) -> list[zarr.Group | BaseException]:
        """Open run groups concurrently: one GET each (metadata is consolidated), 64 in
        flight, instead of one round trip after another (~25 s for 1,000 runs on S3).
        A group that fails to open is returned as its error, for the caller to name."""
        from zarr.core.group import AsyncGroup

        root_path = self.root.store_path

        async def open_all() -> list[AsyncGroup | BaseException]:
            sem = asyncio.Semaphore(64)

            async def one(run_id: str) -> AsyncGroup:
                async with sem:
                    return await AsyncGroup.open(root_path / naming.run_path(run_id), zarr_format=3)

            return await asyncio.gather(*(one(i) for i in run_ids), return_exceptions=True)

        groups = sync(open_all())
        return [g if isinstance(g, BaseException) else zarr.Group(g) for g in groups]

    def orphans(self) -> list[str]:
        """Run groups with no catalog entry: captures that were killed or are running."""
        committed = set(self.run_ids())
        if naming.RUNS_PREFIX not in self.root:
            return []
        runs = self.root[naming.RUNS_PREFIX]
        assert isinstance(runs, zarr.Group)
        return sorted(k for k in runs.group_keys() if k not in committed)


async def _settle(timeout: float = 30) -> None:
    """Wait for the other tasks on zarr's event loop (writes an interrupted caller left)."""
    me = asyncio.current_task()
    pending = [t for t in asyncio.all_tasks() if t is not me]
    if pending:
        await asyncio.wait(pending, timeout=timeout)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:160]}" if text else type(e).__name__
