"""``actstore check`` and ``actstore gc``: verify every object of a store, remove garbage.

:func:`check_store` lists the store once and then, for each committed run, parses its
metadata, compares the chunk objects that exist with those its arrays must have, and
decodes every one of them (each inner chunk's crc32c and each shard index's checksum are
verified on decode). It reports, never repairs:

* ``damaged``: bytes that do not decode or fail a checksum, metadata that does not parse;
* ``missing``: an object a committed run must have (a chunk, an array's metadata, the run
  group of a catalog entry);
* ``inconsistent``: a catalog entry naming another run, an object no array accounts for;
* ``orphaned``: a run group without a catalog entry (a capture killed, or still running);
* ``temporary``: a leftover temp file of an atomic write, or an unreadable catalog cache.

Train layouts (``layouts/``) are checked the same way, segment by segment: see
store/train_check.py (an uncommitted segment is ``orphaned``).

:func:`collect_garbage` removes what ``check`` calls orphaned or temporary and is older
than ``min_age`` (younger ones may belong to a capture still running), plus the model
cache's half-built folders, and nothing else: damaged runs are the user's to delete.
"""

from __future__ import annotations

import itertools
import os
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zarr
from zarr.core.sync import sync
from zarr.storage import FsspecStore, LocalStore

from actstore import naming
from actstore.store import integrity, train_check
from actstore.store.remote import GONE, SNAPSHOT_KEY, entry_run_id, get_json, is_entry_key

PROBLEMS = ("damaged", "missing", "inconsistent", "orphaned", "temporary")
GC_MIN_AGE = 30 * 60  # seconds: younger orphans may be a capture still writing


@dataclass(frozen=True)
class Finding:
    problem: str  # one of PROBLEMS
    key: str  # the object or prefix, relative to the store
    detail: str
    run: str | None = None
    age_s: float | None = None  # orphans and temp files: seconds since last written


@dataclass
class CheckResult:
    findings: list[Finding] = field(default_factory=list)
    runs: int = 0  # committed runs checked
    objects: int = 0  # chunk objects decoded
    unchecksummed: list[str] = field(default_factory=list)  # runs whose bit damage goes unseen
    layout_segments: int = 0  # committed train-layout segments checked (store-wide checks only)

    @property
    def ok(self) -> bool:
        return not self.findings

    def add(self, problem: str, key: str, detail: str, run: str | None = None, age: float | None = None) -> None:
        self.findings.append(Finding(problem, key, detail, run, age))


# ---- listing ------------------------------------------------------------------------------------
def list_objects(zstore: Any) -> dict[str, float | None]:
    """Every key of the store with its last-modified time (epoch seconds; None if unknown)."""
    if isinstance(zstore, LocalStore):
        root = Path(zstore.root)
        out: dict[str, float | None] = {}
        for dirpath, _dirs, files in os.walk(root):
            for f in files:
                p = Path(dirpath) / f
                try:
                    out[p.relative_to(root).as_posix()] = p.stat().st_mtime
                except FileNotFoundError:  # removed while listing
                    pass
        return out
    if isinstance(zstore, FsspecStore):
        found = sync(zstore.fs._find(zstore.path, detail=True, withdirs=False))
        base = zstore.path.rstrip("/") + "/"
        return {name.removeprefix(base): _mtime(info) for name, info in found.items()}

    async def keys() -> list[str]:
        return [k async for k in zstore.list()]

    return dict.fromkeys(sync(keys()))


def _mtime(info: dict[str, Any]) -> float | None:
    for name in ("LastModified", "mtime", "last_modified", "updated"):
        value = info.get(name)
        if value is None:
            continue
        if hasattr(value, "timestamp"):
            return float(value.timestamp())
        try:
            return float(value)
        except (TypeError, ValueError):
            continue
    return None


def _age(mtimes: Iterable[float | None], now: float) -> float | None:
    known = [m for m in mtimes if m is not None]
    return now - max(known) if known else None


# ---- check --------------------------------------------------------------------------------------
def check_store(store: Any, selectors: Iterable[str] = (), progress: bool | None = None) -> CheckResult:
    """Verify ``store`` (an ActStore). ``selectors``: check only these runs (and skip the
    store-wide orphan and temp-file scan); empty: everything."""
    return _Checker(store).run(list(selectors), progress)


class _Checker:
    def __init__(self, store: Any):
        self.store = store
        self.zstore = store.zstore
        self.result = CheckResult()
        self.now = time.time()
        self.objects = list_objects(self.zstore)
        self.by_run: dict[str, dict[str, float | None]] = {}
        for key, mtime in self.objects.items():
            parts = key.split("/", 2)
            if parts[0] == naming.RUNS_PREFIX and len(parts) == 3:
                self.by_run.setdefault(parts[1], {})[parts[2]] = mtime

    def add(self, *args: Any, **kwargs: Any) -> None:
        self.result.add(*args, **kwargs)

    def run(self, selectors: list[str], progress: bool | None) -> CheckResult:
        from actstore.report.progress import bar

        committed = self.catalog(store_wide=not selectors)
        if selectors:
            wanted = set(self.store.resolve_many(selectors))
            committed = {i: e for i, e in committed.items() if i in wanted}
        else:
            for run_id in sorted(set(self.by_run) - set(committed)):
                objs = self.by_run[run_id]
                age = _age(objs.values(), self.now)
                when = f"last written {age:.0f} s ago" if age is not None else "age unknown"
                self.add("orphaned", f"{naming.RUNS_PREFIX}/{run_id}/",
                         f"run group with no catalog entry ({len(objs)} objects, {when}): a killed "
                         "or still running capture", run_id, age)  # fmt: skip
        total = sum(1 for i in committed for k in self.by_run.get(i, {}) if "/c/" in f"/{k}")
        total += 0 if selectors else train_check.n_chunks(self)
        pbar = bar(total, "check", progress, unit="obj")
        try:
            for run_id in sorted(committed):
                self.result.runs += 1
                self.check_run(run_id, pbar)
            if not selectors:  # train layouts (store/train_check.py): store-wide checks only
                train_check.check_layouts(self, pbar)
        finally:
            pbar.close()
        return self.result

    def get_json(self, key: str) -> Any:
        """The parsed document, or None when it is missing or does not parse."""
        doc = sync(get_json(self.zstore, key))
        return None if doc is GONE else doc

    # -- the catalog ----------------------------------------------------------------------
    def catalog(self, store_wide: bool) -> dict[str, dict[str, Any]]:
        """Check the catalog's objects; return the committed runs' entries by id."""
        committed: dict[str, dict[str, Any]] = {}
        prefix = naming.CATALOG_PREFIX + "/"
        for key in sorted(k for k in self.objects if k.startswith(prefix)):
            name = key[len(prefix) :]
            if key == SNAPSHOT_KEY:
                if not isinstance(self.get_json(key), dict):
                    self.add("temporary", key, "catalog cache does not parse (it is rebuilt; gc removes it)")
                continue
            if name.startswith(".tmp-"):
                if store_wide:
                    self.add("temporary", key, "temp file of an interrupted catalog write",
                             age=_age([self.objects[key]], self.now))  # fmt: skip
                continue
            if not is_entry_key(key) or "/" in name:
                self.add("inconsistent", key, "stray object in the catalog (not a run entry)")
                continue
            run_id = entry_run_id(key)
            if naming.name_problem(run_id, naming.MAX_RUN_ID) is not None:
                self.add("inconsistent", key, "catalog entry whose key is not a run id")
                continue
            entry = self.get_json(key)
            if not isinstance(entry, dict):
                self.add("damaged", key, "catalog entry does not parse as a JSON object", run_id)
                continue
            if entry.get("id") != run_id:
                self.add("inconsistent", key, f"catalog entry names run {entry.get('id')!r}, its key {run_id}",
                         run_id)  # fmt: skip
            if "zarr.json" not in self.by_run.get(run_id, {}):
                self.add("missing", f"{naming.RUNS_PREFIX}/{run_id}/zarr.json",
                         "committed run (it has a catalog entry) has no run group", run_id)  # fmt: skip
                continue
            committed[run_id] = entry
        return committed

    # -- one run --------------------------------------------------------------------------
    def check_run(self, run_id: str, pbar: Any) -> None:
        base = f"{naming.RUNS_PREFIX}/{run_id}"
        objs = self.by_run[run_id]
        doc = self.get_json(f"{base}/zarr.json")
        meta = doc.get("attributes", {}).get("run") if isinstance(doc, dict) else None
        consolidated = (doc or {}).get("consolidated_metadata") if isinstance(doc, dict) else None
        if not isinstance(meta, dict) or not isinstance(consolidated, dict):
            self.add("damaged", f"{base}/zarr.json", "run metadata does not parse or lacks the run's "
                     "attributes", run_id)  # fmt: skip
            return
        strict = integrity.has_checksums(meta)
        if not strict:
            self.result.unchecksummed.append(run_id)
        nodes: dict[str, Any] = consolidated.get("metadata", {})
        accounted = {"zarr.json"}
        try:
            root = zarr.open_group(store=self.zstore, path=base, mode="r", zarr_format=3)
        except Exception:  # noqa: BLE001 - consolidated metadata zarr cannot take: each array
            # then opens by its own zarr.json, so the one at fault is named below
            root = zarr.open_group(
                store=self.zstore, path=base, mode="r", zarr_format=3, use_consolidated=False
            )
        for path, node in sorted(nodes.items()):
            accounted.add(f"{path}/zarr.json")
            own = self.get_json(f"{base}/{path}/zarr.json")
            if not isinstance(own, dict):
                self.add("missing" if f"{path}/zarr.json" not in objs else "damaged", f"{base}/{path}/zarr.json",
                         "array or group metadata is missing or does not parse", run_id)  # fmt: skip
            elif _comparable(own) != _comparable(node):
                self.add("inconsistent", f"{base}/{path}/zarr.json",
                         "metadata differs from the run's consolidated copy", run_id)  # fmt: skip
            if node.get("node_type") != "array":
                continue
            present = {k for k in objs if k.startswith(f"{path}/c/") or k == f"{path}/c"}
            accounted |= present
            expected = set(_chunk_keys(path, node))
            if strict:
                for key in sorted(expected - present):
                    self.add("missing", f"{base}/{key}", "chunk object is missing", run_id)
            for key in sorted(present - expected):
                self.add("inconsistent", f"{base}/{key}", "chunk object outside the array's grid", run_id)
            self.decode(root, run_id, base, path, node, sorted(present & expected), pbar)
        for key in sorted(set(objs) - accounted):
            self.add("inconsistent", f"{base}/{key}", "object that no array of the run accounts for", run_id)

    def decode(self, root: Any, run_id: str, base: str, path: str, node: dict[str, Any],
               keys: list[str], pbar: Any) -> None:  # fmt: skip
        """Read each present chunk object whole: every checksum in it is verified."""
        try:
            arr = root[path]
        except Exception as e:  # noqa: BLE001 - any failure to open is damage to report
            self.add("damaged", f"{base}/{path}/zarr.json", f"array does not open ({_line(e)})", run_id)
            return
        grid = node["chunk_grid"]["configuration"]["chunk_shape"]
        for key in keys:
            coords = [int(c) for c in key[len(path) + 3 :].split("/") if c]
            region = tuple(slice(c * g, min((c + 1) * g, n)) for c, g, n in zip(coords, grid, node["shape"],
                                                                                 strict=True))  # fmt: skip
            try:
                arr[region]
                self.result.objects += 1
            except integrity.DAMAGE_ERRORS as e:
                integrity.raise_if_out_of_memory(e, f"{base}/{key}")
                self.add("damaged", f"{base}/{key}", integrity.describe_damage(e), run_id)
            pbar.update()


def _chunk_keys(path: str, node: dict[str, Any]) -> Iterable[str]:
    """The chunk keys an array of a complete run holds (attention: none above the diagonal)."""
    shape = node["shape"]
    grid = node["chunk_grid"]["configuration"]["chunk_shape"]
    sep = node.get("chunk_key_encoding", {}).get("configuration", {}).get("separator", "/")
    counts = [-(-n // g) for n, g in zip(shape, grid, strict=True)]
    for coords in itertools.product(*(range(c) for c in counts)):
        if not integrity.may_be_missing(path, tuple(coords)):
            yield f"{path}/c" + "".join(f"{sep}{c}" for c in coords)


def _comparable(doc: Any) -> Any:
    if isinstance(doc, dict):  # the run group's consolidated copy drops nothing but this
        return {k: v for k, v in doc.items() if k != "consolidated_metadata"}
    return doc


def _line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:160] if text else type(e).__name__


# ---- gc -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Garbage:
    what: str  # "orphaned run", "temp file", "catalog cache", "model cache build"
    where: str  # store key / prefix, or a folder path for the model cache
    bytes: int | None
    age_s: float | None
    removable: bool  # old enough (or provably abandoned) to remove
    removed: bool = False


def collect_garbage(
    store: Any, *, apply: bool = False, min_age: float = GC_MIN_AGE, cache: Path | None = None
) -> list[Garbage]:
    """What ``check`` calls orphaned or temporary, plus the model cache's half-built
    folders (``cache``: the cache root). Only with ``apply`` is anything removed, and
    only what is older than ``min_age`` seconds (a model-cache build: whose lock is free)."""
    found: list[Garbage] = []
    result = _Checker(store)
    sizes = _sizes(store.zstore)
    committed = result.catalog(store_wide=True)
    for f in result.result.findings:
        if f.problem == "temporary":
            found.append(Garbage("catalog cache" if f.key == SNAPSHOT_KEY else "temp file", f.key,
                                 sizes.get(f.key), f.age_s, f.key == SNAPSHOT_KEY or _old(f.age_s, min_age)))  # fmt: skip
    for run_id in sorted(set(result.by_run) - set(committed)):
        objs = result.by_run[run_id]
        age = _age(objs.values(), result.now)
        size = sum(sizes.get(f"{naming.RUNS_PREFIX}/{run_id}/{k}", 0) for k in objs)
        found.append(Garbage("orphaned run", f"{naming.RUNS_PREFIX}/{run_id}/", size, age, _old(age, min_age)))
    for key in train_check.temp_keys(result):
        age = _age([result.objects[key]], result.now)
        found.append(Garbage("temp file", key, sizes.get(key), age, _old(age, min_age)))
    for prefix, objs in train_check.orphan_segments(result):
        age = _age(objs.values(), result.now)
        size = sum(sizes.get(f"{prefix}{k}", 0) for k in objs)
        found.append(Garbage("orphaned segment", prefix, size, age, _old(age, min_age)))
    if cache is not None:
        found += _cache_builds(cache, min_age)
    if not apply:
        return found
    done = []
    for g in found:
        if g.removable:
            _remove(store.zstore, g)
            g = Garbage(g.what, g.where, g.bytes, g.age_s, True, True)
        done.append(g)
    return done


def _old(age: float | None, min_age: float) -> bool:
    return age is None or age >= min_age


def _sizes(zstore: Any) -> dict[str, int]:
    if isinstance(zstore, LocalStore):
        root = Path(zstore.root)
        return {p.relative_to(root).as_posix(): p.stat().st_size for p in root.rglob("*") if p.is_file()}
    if isinstance(zstore, FsspecStore):
        found = sync(zstore.fs._find(zstore.path, detail=True, withdirs=False))
        base = zstore.path.rstrip("/") + "/"
        return {n.removeprefix(base): int(i.get("size") or 0) for n, i in found.items()}
    return {}


def _remove(zstore: Any, g: Garbage) -> None:
    if g.what == "model cache build":
        shutil.rmtree(g.where, ignore_errors=True)
    elif g.where.endswith("/"):
        sync(zstore.delete_dir(g.where.rstrip("/")))
        if isinstance(zstore, LocalStore):  # LocalStore leaves the emptied folders behind
            shutil.rmtree(Path(zstore.root) / g.where, ignore_errors=True)
    else:
        sync(zstore.delete(g.where))


def _cache_builds(cache: Path, min_age: float) -> list[Garbage]:
    """Half-built model-cache folders (``.<name>.tmp-*``, see models/gguf_cache.py): a
    build in progress holds its folder's lock, so one whose lock is free is abandoned."""
    from actstore.models.gguf_cache import lock_is_free

    out = []
    now = time.time()
    for tmp in sorted(cache.rglob(".*.tmp-*")) if cache.is_dir() else []:
        if not tmp.is_dir():
            continue
        name = tmp.name[1:].split(".tmp-", 1)[0]
        files = [p for p in tmp.rglob("*") if p.is_file()]
        age = now - max([tmp.stat().st_mtime] + [p.stat().st_mtime for p in files])
        free = lock_is_free(tmp.parent / f".{name}.lock")
        out.append(Garbage("model cache build", str(tmp), sum(p.stat().st_size for p in files), age,
                           free or age >= min_age))  # fmt: skip
    return out
