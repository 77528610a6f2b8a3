"""What ``actstore check`` and ``actstore gc`` make of train layouts (store/train_layout.py).

Every object under ``layouts/`` is accounted for:

* a segment with a commit marker is checked like a run: its marker parses, the folder it
  names has every array the marker implies, with its metadata and every chunk of its
  row grid, and each chunk decodes (its crc32c verified); anything else in it is
  ``inconsistent``;
* a segment folder no marker names is ``orphaned`` (a killed or running writer, or an
  attempt another one superseded), which ``gc`` removes once old enough;
* a leftover temp file of a marker write is ``temporary``;
* the parent groups' ``zarr.json`` (which every segment writer writes alike) are
  accounted for; any other object under ``layouts/`` is ``inconsistent``.
"""

from __future__ import annotations

from typing import Any

import zarr

from actstore.store import integrity
from actstore.store import rows as row_facts
from actstore.store import train_layout as tl


def _split(objects: dict[str, float | None]) -> tuple[dict[tuple[str, str], dict[str, float | None]],
                                                     dict[tuple[str, str], str], list[str], list[str]]:  # fmt: skip
    """(segment objects by (layout, segment), marker keys by (layout, segment), temp
    keys, stray keys) of every object under ``layouts/``."""
    segments: dict[tuple[str, str], dict[str, float | None]] = {}
    markers: dict[tuple[str, str], str] = {}
    temps: list[str] = []
    strays: list[str] = []
    for key, mtime in objects.items():
        parts = key.split("/")
        if parts[0] != tl.LAYOUTS_PREFIX or _parent_group(parts):
            continue
        if len(parts) >= 5 and parts[2] == tl.SEGMENTS:
            segments.setdefault((parts[1], parts[3]), {})["/".join(parts[4:])] = mtime
        elif len(parts) == 4 and parts[2] == tl.COMMITTED and parts[3].startswith(".tmp-"):
            temps.append(key)
        elif len(parts) == 4 and parts[2] == tl.COMMITTED and parts[3].endswith(".json"):
            markers[(parts[1], parts[3][: -len(".json")])] = key
        else:
            strays.append(key)
    return segments, markers, temps, strays


def _parent_group(parts: list[str]) -> bool:
    """The group metadata zarr writes above a segment's group (``layouts/``,
    ``layouts/<name>/``, ``layouts/<name>/segments/``): the same document from every writer."""
    return parts[-1] == "zarr.json" and (
        len(parts) in (2, 3) or (len(parts) == 4 and parts[2] == tl.SEGMENTS)
    )


def _markers(checker: Any) -> dict[tuple[str, str], tuple[str, tl.SegmentInfo | None]]:
    """(layout, segment) -> (marker key, parsed marker or None when it does not parse),
    read once per check."""
    cached = getattr(checker, "_layout_markers", None)
    if cached is None:
        cached = {}
        for k, key in sorted(_split(checker.objects)[1].items()):
            try:
                cached[k] = (key, tl.SegmentInfo.from_json(checker.get_json(key)))
            except (ValueError, KeyError, TypeError, AttributeError):
                cached[k] = (key, None)
        checker._layout_markers = cached
    return cached


def _referenced(checker: Any) -> set[tuple[str, str]]:
    """(layout, folder) of every committed segment."""
    return {(name, info.folder) for (name, _s), (_k, info) in _markers(checker).items() if info is not None}


def orphan_segments(checker: Any) -> list[tuple[str, dict[str, float | None]]]:
    """(prefix, objects) of every segment folder no commit marker names."""
    segments = _split(checker.objects)[0]
    used = _referenced(checker)
    return [(f"{tl.segment_path(*k)}/", objs) for k, objs in sorted(segments.items()) if k not in used]


def temp_keys(checker: Any) -> list[str]:
    return _split(checker.objects)[2]


def n_chunks(checker: Any) -> int:
    segments = _split(checker.objects)[0]
    used = _referenced(checker)
    return sum(1 for k, objs in segments.items() if k in used for o in objs if "/c/" in f"/{o}")


def check_layouts(checker: Any, pbar: Any) -> None:
    """Add every layout finding to ``checker`` (a check._Checker)."""
    from actstore.store.check import _age

    segments, _m, temps, strays = _split(checker.objects)
    for key in sorted(temps):
        checker.add("temporary", key, "temp file of an interrupted layout commit marker write",
                    age=_age([checker.objects[key]], checker.now))  # fmt: skip
    for key in sorted(strays):
        checker.add("inconsistent", key, "object under layouts/ that is no segment, marker or temp file")
    for prefix, objs in orphan_segments(checker):
        age = _age(objs.values(), checker.now)
        when = f"last written {age:.0f} s ago" if age is not None else "age unknown"
        checker.add("orphaned", prefix,
                    f"layout segment folder no commit marker names ({len(objs)} objects, {when}): a killed, "
                    "still running or superseded writer", None, age)  # fmt: skip
    for (name, seg), (key, info) in sorted(_markers(checker).items()):
        checker.result.layout_segments += 1
        if info is None:
            checker.add("damaged", key, "layout commit marker does not parse", f"{name}/{seg}")
            continue
        _check_segment(checker, name, seg, key, info, segments.get((name, info.folder), {}), pbar)


def _check_segment(checker: Any, name: str, seg: str, marker: str, info: tl.SegmentInfo,
                   objs: dict[str, float | None], pbar: Any) -> None:  # fmt: skip
    base = tl.segment_path(name, info.folder)
    label = f"{name}/{seg}"
    if info.layout != name or info.segment != seg:
        checker.add(
            "inconsistent", marker, f"commit marker names segment {info.layout}/{info.segment}", label
        )
    if "zarr.json" not in objs:
        checker.add("missing", f"{base}/zarr.json", "committed segment (it has a marker) has no group", label)
        return
    paths = [f"{tl.SITES_GROUP}/{tl.site_name(s)}" for s in info.sites]
    paths += [f"{row_facts.ROWS_GROUP}/{c}" for c in ("token_ids", "sequence_index", "position")]
    paths += [f"{row_facts.LABELS_GROUP}/{c}" for c in info.labels]
    groups = {tl.SITES_GROUP, row_facts.ROWS_GROUP} | ({row_facts.LABELS_GROUP} if info.labels else set())
    accounted = {"zarr.json"} | {f"{g}/zarr.json" for g in groups}
    for g in sorted(groups):
        if f"{g}/zarr.json" not in objs:
            checker.add("missing", f"{base}/{g}/zarr.json", "group metadata is missing", label)
    root = zarr.open_group(store=checker.zstore, path=base, mode="r", zarr_format=3)
    expected_chunks = [f"c/{i}" for i in range(info.n_chunks)]
    for path in paths:
        accounted.add(f"{path}/zarr.json")
        if f"{path}/zarr.json" not in objs:
            checker.add("missing", f"{base}/{path}/zarr.json", "array metadata is missing", label)
            continue
        try:
            arr: Any = root[path]
            if arr.shape[0] != info.n_rows or arr.chunks[0] != info.chunk_rows:
                checker.add("inconsistent", f"{base}/{path}/zarr.json",
                            f"array of {arr.shape[0]} rows in chunks of {arr.chunks[0]}, the marker says "
                            f"{info.n_rows} in chunks of {info.chunk_rows}", label)  # fmt: skip
                continue
        except Exception as e:  # noqa: BLE001 - any failure to open is damage to report
            checker.add("damaged", f"{base}/{path}/zarr.json", f"array does not open ({_line(e)})", label)
            continue
        tail = "/0" * (arr.ndim - 1)
        expected = {f"{path}/{c}{tail}" for c in expected_chunks}
        present = {k for k in objs if k.startswith(f"{path}/c/")}
        accounted |= present
        for key in sorted(expected - present):
            checker.add("missing", f"{base}/{key}", "chunk object is missing", label)
        for key in sorted(present - expected):
            checker.add("inconsistent", f"{base}/{key}", "chunk object outside the array's rows", label)
        for key in sorted(present & expected):
            i = int(key[len(path) + 3 :].split("/")[0])
            try:
                arr[i * info.chunk_rows : (i + 1) * info.chunk_rows]
                checker.result.objects += 1
            except integrity.DAMAGE_ERRORS as e:
                integrity.raise_if_out_of_memory(e, f"{base}/{key}")
                checker.add("damaged", f"{base}/{key}", integrity.describe_damage(e), label)
            pbar.update()
    for key in sorted(set(objs) - accounted):
        checker.add(
            "inconsistent", f"{base}/{key}", "object that no array of the segment accounts for", label
        )


def _line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:160] if text else type(e).__name__
