"""One error style: every user error below is one line on stderr, exit code 2, no
traceback, and leaves the filesystem as it found it (issue 9, items 9 and 10).

Each test lists the files under its temporary folder (and the working directory, which
is that folder) before and after the command. Permission and full-disk cases use real
kernels' answers: a tmpfs of 2 MB, the same tmpfs remounted read-only, and a process
without CAP_DAC_OVERRIDE (root ignores file modes otherwise); they are skipped where the
test process may not mount or drop capabilities.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

import actstore
from actstore.cli import main
from actstore.store.store import ActStore
from query.synth import write_synthetic_run

SRC = Path(actstore.__file__).resolve().parents[1]  # the actstore under test


# ---- helpers ------------------------------------------------------------------------------
def listing(root: Path) -> dict[str, int]:
    """Every path under ``root`` with its size (folders: -1)."""
    return {
        str(p.relative_to(root)): (-1 if p.is_dir() else p.stat().st_size) for p in sorted(root.rglob("*"))
    }


def invoke(*args: str | Path) -> Any:
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_line(res: Any, *needles: str) -> None:
    """Exit 2, one ``error:`` line on stderr naming each needle, no traceback."""
    assert res.exit_code == 2, (res.exit_code, res.output, res.exception)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert "Traceback" not in res.output
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def fails_cleanly(root: Path, *args: str | Path, needles: tuple[str, ...] = ()) -> str:
    """Run the CLI; assert the one-line error and that nothing under ``root`` changed."""
    before = listing(root)
    res = invoke(*args)
    assert_one_line(res, *needles)
    assert listing(root) == before
    return str(res.stderr)


@pytest.fixture(scope="module")
def synth_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    location = tmp_path_factory.mktemp("synth") / "store.zarr"
    write_synthetic_run(ActStore.open(location, create=True), n_layers=2, prompt_len=8, n_steps=3, width=16)
    return location


@pytest.fixture
def world(tmp_path: Path, synth_source: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """tmp_path as the working directory, holding a store with one run and a plain file."""
    shutil.copytree(synth_source, tmp_path / "store.zarr")
    (tmp_path / "afile").write_text("not a folder\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def scenario_file(folder: Path, model_id: str | Path, **capture: Any) -> Path:
    path = folder / "scenario.yaml"
    path.write_text(yaml.safe_dump({
        "name": "tiny",
        "model": {"id": str(model_id), "dtype": "float32", "device": "cpu"},
        "prompt": {"messages": [{"role": "user", "content": "Hello there, how are you?"}]},
        "generation": {"max_new_tokens": 3},
        "capture": {"store_dtype": "float32", "logits": True, **capture},
    }))  # fmt: skip
    return path


# ---- --store is a regular file, or missing ---------------------------------------------------
READ_COMMANDS: list[list[str]] = [
    ["ls"],
    ["inspect"],
    ["query", "cosine"],
    ["query", "trajectory", "--layer", "0", "--neuron", "0"],
    ["query", "pair", "initial", "final"],
    ["query", "group", "initial", "final"],
    ["query", "depth", "final"],
    ["query", "next-token"],
    ["report", "--out", "rep", "-q"],
    ["export", "npz", "--out", "exp", "-q"],
    ["heatmap", "--out", "maps", "-q"],
    ["logit-lens", "--out", "lens.json"],
    ["view", "--no-browser", "--port", "0"],
]


@pytest.mark.parametrize("args", READ_COMMANDS, ids=lambda a: " ".join(a[:2]))
def test_store_that_is_a_file(world: Path, args: list[str]) -> None:
    fails_cleanly(world, *args, "--store", "afile", needles=("--store afile", "not an actstore store"))


@pytest.mark.parametrize("args", READ_COMMANDS, ids=lambda a: " ".join(a[:2]))
def test_read_commands_never_create_a_missing_store(world: Path, args: list[str]) -> None:
    missing = world / "no" / "such" / "store.zarr"
    fails_cleanly(world, *args, "--store", missing, needles=(f"no actstore store at {missing}",))
    assert not (world / "no").exists()


def test_writing_commands_refuse_a_store_that_is_a_file(world: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "exported"
    # The synthetic run has no full passes: Activation Lab's layout refuses it (test_npz_layout.py)
    assert invoke("export", "npz", "--store", "store.zarr", "--out", run_dir, "--layout", "readme", "-q").exit_code == 0
    exported = next(run_dir.iterdir())
    sc = scenario_file(world, world / "no-such-model")  # the store is checked before the model loads
    for args in (["import", "npz", exported, "-q"], ["capture", sc, "-q"]):
        fails_cleanly(world, *args, "--store", "afile", needles=("--store afile", "not a folder"))
        # a file on the way to the store: nothing can create it
        fails_cleanly(world, *args, "--store", "afile/store.zarr", needles=("afile is a file, not a folder",))


# ---- --out is a regular file -----------------------------------------------------------------
@pytest.mark.parametrize(
    "args",
    [
        ["report", "-q"],
        ["export", "npz", "--layout", "readme", "-q"],
        ["heatmap", "-q"],
    ],
    ids=lambda a: a[0],
)
def test_out_that_is_a_file(world: Path, args: list[str]) -> None:
    fails_cleanly(
        world, *args, "--store", "store.zarr", "--out", "afile", needles=("--out afile", "not a folder")
    )
    fails_cleanly(
        world,
        *args,
        "--store",
        "store.zarr",
        "--out",
        "afile/sub",
        needles=("afile is a file, not a folder",),
    )


def test_logit_lens_out_that_is_a_folder(world: Path) -> None:
    (world / "lens").mkdir()
    # checked before the model loads (the synthetic run's model id loads nothing)
    fails_cleanly(
        world, "logit-lens", "--store", "store.zarr", "--out", "lens", needles=("--out lens", "a folder")
    )
    fails_cleanly(
        world,
        "logit-lens",
        "--store",
        "store.zarr",
        "--out",
        "afile/x.json",
        needles=("afile is a file, not a folder",),
    )


# ---- options out of range --------------------------------------------------------------------
@pytest.mark.parametrize("port", ["70000", "-1"])
def test_view_port_out_of_range(world: Path, port: str) -> None:
    fails_cleanly(
        world,
        "view",
        "--store",
        "store.zarr",
        "--no-browser",
        "--port",
        port,
        needles=(f"--port {port}", "0-65535"),
    )


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("address", "needle"),
    [("bogus", "not a scheduler address"), ("local:0", "1 or more"), ("local:x", "1 or more")],
)
def test_bad_scheduler(world: Path, address: str, needle: str) -> None:
    """``local:0`` used to start a cluster with no workers and wait on it forever."""
    sc = scenario_file(world, world / "no-such-model")
    for args in (["query", "cosine", "--store", "store.zarr"], ["capture", sc, "--store", "new.zarr"]):
        fails_cleanly(world, *args, "--scheduler", address, needles=(f"--scheduler {address}", needle))


# ---- object storage out of reach -----------------------------------------------------------
def _refused_port() -> int:
    """A loopback port that refuses connections: bound, never listening."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port: int = s.getsockname()[1]
    s.close()
    return port


@pytest.mark.timeout(120)
def test_unreachable_s3_endpoint_is_one_quick_line(world: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    endpoint = f"http://127.0.0.1:{_refused_port()}"
    for args in (["ls"], ["query", "cosine"], ["inspect"]):
        t0 = time.monotonic()
        fails_cleanly(world, *args, "--store", "s3://bucket/acts.zarr", "--storage-option", f"endpoint_url={endpoint}",
                      needles=(f"cannot reach object storage at {endpoint}",))  # fmt: skip
        assert time.monotonic() - t0 < 20  # botocore's legacy 5 retries with backoff took ~10 s


def test_s3_without_credentials_is_one_line(world: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for key in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(world / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(world / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    endpoint = f"http://127.0.0.1:{_refused_port()}"
    fails_cleanly(world, "ls", "--store", "s3://bucket/acts.zarr", "--storage-option", f"endpoint_url={endpoint}",
                  needles=("no credentials",))  # fmt: skip


# ---- capture: the store is created only once the model loads and fits -----------------------
def test_capture_with_a_model_that_cannot_load_creates_no_store(world: Path) -> None:
    sc = scenario_file(world, "no-such-org/no-such-model")
    fails_cleanly(world, "capture", sc, "--store", "new.zarr", "-q", needles=("no-such-org/no-such-model",))
    assert not (world / "new.zarr").exists()


def test_capture_with_layers_out_of_range_creates_no_store(world: Path, tiny_folder: Path) -> None:
    sc = scenario_file(world, tiny_folder, layers=[0, 99])
    fails_cleanly(
        world, "capture", sc, "--store", "new.zarr", "-q", needles=("capture.layers[1]", "out of range")
    )
    assert not (world / "new.zarr").exists()


def test_capture_into_a_fresh_store_still_works(world: Path, tiny_folder: Path) -> None:
    """The reordering above must not stop a good capture from creating its store."""
    res = invoke("capture", scenario_file(world, tiny_folder), "--store", "new.zarr", "-q")
    assert res.exit_code == 0, res.output
    assert ActStore.open(world / "new.zarr").run_ids() == [res.stdout.split("\t")[0]]


# ---- read-only store, full disk ------------------------------------------------------------------
@pytest.fixture
def tmpfs(world: Path) -> Iterator[Path]:
    """A 2 MB tmpfs mounted inside the test's folder (root only)."""
    mnt = world / "mnt"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True)
    if done.returncode != 0:
        mnt.rmdir()
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)
        mnt.rmdir()


def test_capture_into_a_full_disk(tmpfs: Path, world: Path, tiny_folder: Path, synth_source: Path) -> None:
    """The run's logits alone (49,152 wide) overflow the 2 MB filesystem mid-capture."""
    store = tmpfs / "store.zarr"
    shutil.copytree(synth_source, store)
    sc = scenario_file(world, tiny_folder)
    before = listing(tmpfs)
    res = invoke("capture", sc, "--store", store, "-q")
    assert_one_line(res, f"--store {store}", "no space left on device", "nothing was committed")
    assert listing(tmpfs) == before
    assert len(ActStore.open(store).run_ids()) == 1  # the synthetic run, nothing else


def test_capture_into_a_new_store_on_a_full_disk_leaves_nothing(tmpfs: Path, world: Path, tiny_folder: Path) -> None:
    """The store the capture would have created is gone again: no empty store is left."""
    store = tmpfs / "new.zarr"
    sc = scenario_file(world, tiny_folder)
    before = listing(tmpfs)
    res = invoke("capture", sc, "--store", store, "-q")
    assert_one_line(res, f"--store {store}", "no space left on device", "nothing was committed")
    assert listing(tmpfs) == before and not store.exists()


def test_read_only_store(tmpfs: Path, world: Path, tiny_folder: Path, synth_source: Path) -> None:
    """A store on a read-only filesystem: captures and imports refuse it before any work,
    reads keep working."""
    store = tmpfs / "store.zarr"
    shutil.copytree(synth_source, store)
    exported = world / "exported"
    assert invoke("export", "npz", "--store", store, "--out", exported, "--layout", "readme", "-q").exit_code == 0
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    sc = scenario_file(world, tiny_folder)
    for args in (["capture", sc, "-q"], ["import", "npz", next(exported.iterdir()), "-q"]):
        fails_cleanly(world, *args, "--store", store, needles=(f"--store {store}", "read-only filesystem"))
    assert invoke("ls", "--store", store).exit_code == 0


def test_store_without_write_permission(world: Path, tiny_folder: Path) -> None:
    """A store another user owns (mode 0555 here): the capture runs in a subprocess
    without CAP_DAC_OVERRIDE, so the kernel applies the mode to root as to anyone."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to drop CAP_DAC_OVERRIDE")
    store = world / "store.zarr"
    for folder in (store, *[p for p in store.rglob("*") if p.is_dir()]):
        folder.chmod(0o555)
    sc = scenario_file(world, tiny_folder)
    before = listing(world)
    try:
        done = subprocess.run(
            ["setpriv", "--inh-caps=-dac_override,-dac_read_search", "--bounding-set=-dac_override,-dac_read_search",
             sys.executable, "-m", "actstore", "capture", str(sc), "--store", str(store), "-q"],
            capture_output=True, text=True, timeout=300,
            cwd=SRC.parent,  # paths are absolute; the checkout, where tools wrapping the source find their settings
        )  # fmt: skip
    finally:
        for folder in (store, *[p for p in store.rglob("*") if p.is_dir()]):
            folder.chmod(0o755)
    if "Operation not permitted" in done.stderr and "setpriv" in done.stderr:
        pytest.skip(f"setpriv cannot drop capabilities here: {done.stderr.strip()}")
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert f"--store {store}" in lines[0] and "permission denied" in lines[0]
    assert listing(world) == before


@pytest.mark.parametrize("args", [["report"], ["export", "npz", "--layout", "readme"], ["heatmap"]], ids=lambda a: a[0])
def test_outputs_onto_a_full_disk_leave_nothing(tmpfs: Path, world: Path, args: list[str]) -> None:
    with open(tmpfs / "filler", "wb") as f:  # fill the filesystem: the first output write fails
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    fails_cleanly(world, *args, "--store", "store.zarr", "--out", tmpfs / "out", "-q",
                  needles=("no space left on device",))  # fmt: skip


# ---- files the store writes follow the umask ------------------------------------------------
@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_catalog_entries_follow_the_umask(tmp_path: Path, umask: int) -> None:
    """mkstemp's 0600 used to survive the rename: other users could not list the runs."""
    from zarr.core.sync import sync

    from actstore.store.remote import SNAPSHOT_KEY, put_atomic

    old = os.umask(umask)
    try:
        store = ActStore.open(tmp_path / "store.zarr", create=True)
        run_id = write_synthetic_run(store, n_layers=1, prompt_len=4, n_steps=2, width=8)
        sync(put_atomic(store.zstore, SNAPSHOT_KEY, b"{}"))
    finally:
        os.umask(old)
    catalog = tmp_path / "store.zarr" / "catalog"
    for name in (f"{run_id}.json", Path(SNAPSHOT_KEY).name):
        assert (catalog / name).stat().st_mode & 0o777 == 0o666 & ~umask
    assert [p.name for p in catalog.iterdir() if p.name.startswith(".tmp-")] == []
