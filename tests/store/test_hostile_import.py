"""Hostile run directories: import refuses each with one line and exit 2, reads nothing
outside the directory, never unpickles, never expands a zip bomb, writes nothing.

Each case starts from a valid hand-made seed directory (test_npz.make_seed_dir, which
imports cleanly) and breaks one thing. Export of a run whose metadata holds a hostile
name is refused before anything is created, and export folders get umask permissions.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
from click.testing import CliRunner
from test_npz import make_seed_dir

from actstore import naming
from actstore.cli import main
from actstore.errors import StoreError
from actstore.store.npz import export_npz, import_npz, read_seed_dir, read_seed_dirs
from actstore.store.store import ActStore

RSS_BOUND = 1 << 30  # bytes; an import that expanded the bomb would hold 2 GiB


def _tree(root: Path) -> dict[str, str]:
    """Every file and folder under root with a digest of its bytes: what 'nothing
    written' is checked against."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = "link:" + os.readlink(p)
        elif p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[rel] = "dir"
    return out


def _json(path: Path) -> Any:
    return json.loads(path.read_text())


def _edit_json(path: Path, fn: Callable[[Any], None]) -> None:
    data = _json(path)
    fn(data)
    path.write_text(json.dumps(data))


def _npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


class _Boom:
    """Unpickling this creates a folder: proof that nothing was unpickled if it is absent."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.makedirs, (self.marker,))


# ---------------------------------------------------------------------- cases
# Each takes the run directory and a folder outside it, breaks one thing, and returns
# a regex the one error line must match.


def _label(value: str) -> Callable[[Path, Path], str]:
    def case(d: Path, outside: Path) -> str:
        _edit_json(d / "references/index.json", lambda x: x.update(labels=[value]))
        return r"references/index\.json: labels\[0\] .* \(.*\)$"

    return case


def _role(d: Path, outside: Path) -> str:
    _edit_json(d / "conversation_snapshots/index.json", lambda x: x[0].update(role="../../evil"))
    return (
        r"conversation_snapshots/index\.json: \[0\]\.role '\.\./\.\./evil' must contain no spaces or slashes"
    )


def _snapshot_entry(d: Path, outside: Path) -> str:
    _edit_json(d / "conversation_snapshots/index.json", lambda x: x[0].pop("index"))
    return (
        r"conversation_snapshots/index\.json: expected a list \(or \{\"snapshots\": \[\.\.\.\]\}\) "
        r"of \{index, role, content_preview\}$"
    )


def _scenario_name(d: Path, outside: Path) -> str:
    _edit_json(d / "run.json", lambda x: x["scenario"].update(name="../../x"))
    return r"run\.json: scenario\.name '\.\./\.\./x' must contain no spaces or slashes"


def _duplicate_label(d: Path, outside: Path) -> str:
    _edit_json(d / "references/index.json", lambda x: x.update(labels=["calm", "calm"]))
    return r"labels\[1\] 'calm' is listed twice"


def _tensors_file(value: Callable[[Path], str], pattern: str) -> Callable[[Path, Path], str]:
    def case(d: Path, outside: Path) -> str:
        shutil.copy(d / "tensors/step_001.npz", outside / "step_001.npz")  # a valid file to steal
        rel = value(outside)
        _edit_json(d / "steps.json", lambda x: x["steps"][1].update(tensors_file=rel))
        return pattern

    return case


def _symlink(rel: str) -> Callable[[Path, Path], str]:
    """Move a file or folder of the run outside and leave a symlink to it: a valid
    directory read through the link, unless the link is refused."""

    def case(d: Path, outside: Path) -> str:
        target = outside / Path(rel).name
        shutil.move(d / rel, target)
        (d / rel).symlink_to(target)
        return rf"{rel}.* resolves to {target}.*, outside {d} \(import reads only inside"

    return case


def _pickle(rel: str, key: str) -> Callable[[Path, Path], str]:
    def case(d: Path, outside: Path) -> str:
        arrays: dict[str, Any] = _npz(d / rel)
        arrays[key] = np.array([_Boom(outside / "UNPICKLED")], dtype=object)
        np.savez(d / rel, **arrays)  # np.savez pickles object arrays
        return rf"{Path(rel).name}: {key}: dtype object holds Python objects .* never unpickles"

    return case


def _forge_header(d: Path, shape: tuple[int, ...]) -> None:
    """Step 1's layer_00/q becomes a .npy header declaring ``shape`` over 16 bytes."""
    path = d / "tensors/step_001.npz"
    arrays = _npz(path)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for key, arr in arrays.items():
            if key == "layer_00/q":
                with z.open(key + ".npy", "w") as f:
                    np.lib.format.write_array_header_1_0(f, {"descr": "<f2", "fortran_order": False, "shape": shape})
                    f.write(bytes(16))
            else:
                with z.open(key + ".npy", "w") as f:
                    np.lib.format.write_array(f, arr)


def _lying_header(d: Path, outside: Path) -> str:
    # A member whose .npy header claims 10^12 values but holds 16 bytes.
    _forge_header(d, (1, 1, 10**12))
    return r"step_001\.npz: layer_00/q: the zip entry declares \d+ bytes, but its header describes \d+"


def _negative_shape(d: Path, outside: Path) -> str:
    # numpy's header parser accepts negative lengths; its byte count would come out negative
    _forge_header(d, (1, -1, 8))
    return r"step_001\.npz: layer_00/q: negative shape \[1, -1, 8\]$"


def _huge_prompt(d: Path, outside: Path) -> str:
    # steps.json claims a 10^6-token prompt; the NPZ holds 5 tokens.
    def grow(x: Any) -> None:
        x["steps"][0].update(input_token_ids=list(range(10**6)), seq_len=10**6)

    _edit_json(d / "steps.json", grow)
    return (
        r"step_000\.npz: layer_00/hidden_in has shape \[1, 5, 8\], expected \[1, 1000000, 8\] "
        r"\(steps\.json: step 0 feeds 1000000 tokens\)"
    )



def _integer_tensors(d: Path, outside: Path) -> str:
    # step 0's tensors as int32: no store dtype; the file and key are named
    arrays = _npz(d / "tensors/step_000.npz")
    np.savez(d / "tensors/step_000.npz", **{k: v.astype(np.int32) for k, v in arrays.items()})
    first = re.escape(next(iter(arrays)))
    return rf"step_000\.npz: {first}: dtype int32 is not a store dtype \(float16, float32, bfloat16 as float32\)"

CASES: dict[str, Callable[[Path, Path], str]] = {
    "label_path_pieces": _label("../../../../../x/PWN"),
    "label_colon": _label("a:b"),
    "label_nul": _label("a\x00b"),
    "label_300_chars": _label("x" * 300),
    "label_dotdot": _label(".."),
    "duplicate_label": _duplicate_label,
    "role_path_pieces": _role,
    "snapshot_entry_without_index": _snapshot_entry,
    "scenario_name_path_pieces": _scenario_name,
    "tensors_file_dotdot": _tensors_file(
        lambda o: "../outside/step_001.npz",
        r"steps\.json: steps\[1\]: tensors_file '\.\./outside/step_001\.npz': '\.\.' must start with a letter",
    ),
    "tensors_file_absolute": _tensors_file(
        lambda o: str(o / "step_001.npz"),
        r"steps\[1\]: tensors_file '/\S+ is an absolute path \(import reads",
    ),
    "tensors_file_backslash": _tensors_file(
        lambda o: "tensors\\..\\..\\x.npz", r"steps\[1\]: tensors_file .* must contain no spaces or slashes"
    ),
    "symlinked_step_file": _symlink("tensors/step_001.npz"),
    "symlinked_references": _symlink("references"),
    "symlinked_run_json": _symlink("run.json"),
    "pickle_in_step": _pickle("tensors/step_001.npz", "layer_00/q"),
    "pickle_in_reference": _pickle("references/ref_calm.npz", "layer_00/hidden_in"),
    "pickle_in_unread_key": _pickle("conversation_snapshots/snapshot_00_user.npz", "qkv_last"),
    "lying_npy_header": _lying_header,
    "negative_npy_shape": _negative_shape,
    "huge_declared_prompt": _huge_prompt,
    "integer_tensors": _integer_tensors,
}


def _cli_import(d: Path, store: Path) -> Any:
    return CliRunner().invoke(main, ["import", "npz", str(d), "--store", str(store), "-q"])


def test_the_unbroken_directory_imports(tmp_path: Path) -> None:
    # The cases below differ from this directory in one thing only.
    d = make_seed_dir(tmp_path / "in")
    r = _cli_import(d, tmp_path / "store.zarr")
    assert r.exit_code == 0, r.output
    assert ActStore.open(tmp_path / "store.zarr").run_ids() == [r.stdout.strip()]


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_dir_is_refused(tmp_path: Path, case: str) -> None:
    d = make_seed_dir(tmp_path / "in")
    outside = tmp_path / "outside"
    outside.mkdir()
    pattern = CASES[case](d, outside)
    before = _tree(tmp_path)
    store = tmp_path / "store.zarr"
    r = _cli_import(d, store)
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output and isinstance(r.exception, SystemExit)
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "\x00" not in lines[0], r.stderr
    assert re.search(pattern, lines[0]), lines[0]
    assert not store.exists()  # checked before the store is even opened
    assert _tree(tmp_path) == before  # nothing written or unpickled anywhere
    assert not (outside / "UNPICKLED").exists()


def test_refused_through_the_api_leaves_no_run(tmp_path: Path) -> None:
    # With an existing store: no run committed, no orphan group.
    store = ActStore.open(tmp_path / "store.zarr", create=True)
    d = make_seed_dir(tmp_path / "in")
    _label("../x")(d, tmp_path)
    with pytest.raises(StoreError, match=r"labels\[0\] '\.\./x'"):
        import_npz(store, d, quiet=True)
    assert store.run_ids() == [] and store.orphans() == []


def test_memory_needed_is_bounded(tmp_path: Path) -> None:
    d = make_seed_dir(tmp_path / "in")
    # Computed here, independently: the bytes of step 0's arrays, a lower bound of what
    # the import holds at once.
    step0 = sum(a.nbytes for a in _npz(d / "tensors/step_000.npz").values())
    with pytest.raises(StoreError, match=r"step_000\.npz: importing this run needs about .* GiB of memory"):
        read_seed_dir(d, max_bytes=step0 - 1)
    with pytest.raises(StoreError, match=r"step_000\.npz: importing this run needs about"):
        read_seed_dirs(d, max_bytes=step0 - 1)  # the bound reaches a run directory read as a whole
    assert read_seed_dir(d).schema.memory_needed() >= step0


# ---------------------------------------------------------------------- memory


def _bomb_dir(root: Path) -> Path:
    """A run of logits only whose one member is 2 GiB of zeros deflated to ~9 MB.
    Everything it declares agrees: steps.json's prompt length, the .npy header, the
    zip entry's size; only the compression ratio gives it away."""
    P, V = 1 << 17, 1 << 13
    d = root / "bomb"
    (d / "tensors").mkdir(parents=True)
    (d / "run.json").write_text(json.dumps({"scenario": {"name": "bomb"}}))
    step = {"step": 0, "kind": "prefill", "input_token_ids": [1] * P, "tensors_file": naming.step_file(0)}
    (d / "steps.json").write_text(json.dumps({"steps": [step]}))
    chunk = bytes(1 << 24)
    with zipfile.ZipFile(d / naming.step_file(0), "w", zipfile.ZIP_DEFLATED, compresslevel=1) as z:
        with z.open("logits.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(
                f, {"descr": "<f2", "fortran_order": False, "shape": (1, P, V)}
            )
            for _ in range(P * V * 2 // len(chunk)):
                f.write(chunk)
    return d


def _import_in_child(d: Path, store: Path) -> tuple[int, str, int]:
    """(exit code, stderr, peak RSS in bytes) of `actstore import npz` in a fresh
    process. A wrapper process reports RUSAGE_CHILDREN, so earlier children of the test
    process do not count."""
    wrapper = (
        "import resource, subprocess, sys\n"
        "r = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
        "sys.stderr.write(r.stderr)\n"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)\n"
        "sys.exit(r.returncode)\n"
    )
    cmd = [sys.executable, "-c", wrapper, sys.executable, "-m", "actstore", "import", "npz", str(d),
           "--store", str(store), "-q"]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    return r.returncode, r.stderr, int(r.stdout.strip())


@pytest.mark.slow  # subprocesses under limits, or a CLI per call: the full suite runs it
def test_zip_bomb_is_refused_before_expansion(tmp_path: Path) -> None:
    d = _bomb_dir(tmp_path)
    path = d / naming.step_file(0)
    info = zipfile.ZipFile(path).getinfo("logits.npy")
    assert info.file_size > 2 * RSS_BOUND and path.stat().st_size < 20 << 20  # a real bomb
    rc, err, rss = _import_in_child(d, tmp_path / "store.zarr")
    assert rc == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and "Traceback" not in err
    assert "step_000.npz: logits: " in lines[0] and "a zip bomb" in lines[0], lines[0]
    assert rss < RSS_BOUND, f"peak RSS {rss / 2**20:.0f} MiB"
    assert not (tmp_path / "store.zarr").exists()


def test_huge_declared_prompt_allocates_nothing(tmp_path: Path) -> None:
    d = make_seed_dir(tmp_path / "in")
    _huge_prompt(d, tmp_path)
    rc, err, rss = _import_in_child(d, tmp_path / "store.zarr")
    assert rc == 2 and len(err.splitlines()) == 1 and "expected [1, 1000000, 8]" in err, err
    assert rss < RSS_BOUND, f"peak RSS {rss / 2**20:.0f} MiB"


# ---------------------------------------------------------------------- export


@pytest.fixture
def imported(tmp_path: Path) -> tuple[ActStore, str]:
    store = ActStore.open(tmp_path / "store.zarr", create=True)
    return store, import_npz(store, make_seed_dir(tmp_path / "in"), quiet=True)


def _set_meta(store: ActStore, run_id: str, **changes: Any) -> None:
    """Rewrite a committed run's metadata directly with zarr, as a hand edit or another
    tool could."""
    group = zarr.open_group(store.location, mode="r+")[naming.run_path(run_id)]
    group.attrs["run"] = {**group.attrs["run"], **changes}  # type: ignore[dict-item]


@pytest.mark.parametrize(
    "changes",
    [
        {"references": ["../../../../../x/PWN"]},
        {"references": ["a\x00b"]},
        {"references": ["x" * 300]},
        {"snapshots": [{"index": 0, "role": "../../../PWN", "content_preview": ""}]},
        {"snapshots": [{"index": "../x", "role": "user", "content_preview": ""}]},
    ],
    ids=["label_path", "label_nul", "label_300", "role_path", "index_not_int"],
)
def test_export_of_hostile_metadata_cannot_escape(
    tmp_path: Path, imported: tuple[ActStore, str], changes: dict[str, Any]
) -> None:
    store, run_id = imported
    _set_meta(store, run_id, **changes)
    key, value = next(iter(changes.items()))
    seen = store.run(run_id).meta[key]
    assert seen == value  # the reader really serves the hostile name
    before = _tree(tmp_path)
    out = tmp_path / "exports" / "deep" / "er"
    r = CliRunner().invoke(main, ["export", "npz", run_id, "--store", store.location, "--out", str(out)])
    assert r.exit_code == 2, r.output
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: run {run_id}: ") and "Traceback" not in r.output
    assert _tree(tmp_path) == before  # not even --out was created


def test_export_of_hostile_catalog_id_is_refused(tmp_path: Path, imported: tuple[ActStore, str]) -> None:
    store, run_id = imported
    entry = _json(Path(store.location) / naming.catalog_key(run_id))
    evil = "../../../PWN"
    (Path(store.location) / "catalog" / "evil.json").write_text(json.dumps({**entry, "id": evil}))
    before = _tree(tmp_path)
    r = CliRunner().invoke(
        main, ["export", "npz", evil, "--store", store.location, "--out", str(tmp_path / "o")]
    )
    assert r.exit_code == 2, r.output
    # The entry's key is its run's id: the path in its "id" field names nothing (a warning
    # says the entry disagrees with its key) and is never a path piece.
    errors = [line for line in r.stderr.splitlines() if not line.startswith("warning:")]
    assert len(errors) == 1 and "no run matches '../../../PWN'" in errors[0], r.stderr
    assert "catalog/evil.json names run '../../../PWN'" in r.stderr
    assert _tree(tmp_path) == before


@pytest.mark.parametrize("umask", [0o022, 0o002], ids=["022", "002"])
def test_export_folder_has_umask_permissions(
    tmp_path: Path, imported: tuple[ActStore, str], umask: int
) -> None:
    store, run_id = imported
    old = os.umask(umask)
    try:
        out = export_npz(store.run(run_id), tmp_path / "exports" / run_id, layout="readme", quiet=True)
    finally:
        os.umask(old)
    modes = {str(p.relative_to(out)): p.stat().st_mode & 0o777 for p in [out, *out.rglob("*")]}
    dirs = {k: v for k, v in modes.items() if (out / k).is_dir()}
    files = {k: v for k, v in modes.items() if (out / k).is_file()}
    assert set(dirs.values()) == {0o777 & ~umask} and "." in dirs and "tensors" in dirs
    assert set(files.values()) == {0o666 & ~umask} and "steps.json" in files
