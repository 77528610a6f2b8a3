"""Failures injected into a real capture: the writer thread and the model's forward.

Real parts throughout (a tiny model, a local Zarr store, the real writer thread, the
CLI); only the one failing call is replaced. Whatever fails, the error reaches the
caller, nothing is committed (empty catalog, ``actstore ls`` empty), no run group is
left behind (``ActStore.discard``), the writer thread is gone, and ``actstore check``
finds the store sound.

Planted bugs these tests caught (each failed, then reverted): ``RunWriter`` swallowing
its thread's errors (``_raise_if_failed`` a no-op); ``capture_run`` not discarding the
run group on failure; ``capture_run`` not aborting the writer (its thread left waiting);
``capture`` swallowing a run's error.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

from actstore.capture.runner import capture, capture_run
from actstore.cli import main
from actstore.store import layout
from actstore.store import writer as writer_mod
from actstore.store.store import ActStore

from .conftest import loaded_tiny, make_scenario

# Small shards (8 positions per vector shard), as in test_oracles.py: the ~60-position
# prompt fills several blocks, so the writer flushes mid-run, in its own thread.
SMALL_LAYOUT = {"SHARD_BUDGET": 1, "MIN_BLOCK": 8, "INNER_POSITIONS": 4, "LOGITS_INNER_POSITIONS": 4,
                "ATTN_TILE": 8}  # fmt: skip


class Injected(RuntimeError):
    """The failure a test plants (a distinct type, so nothing else can pass for it)."""


def _scenario() -> Any:
    return make_scenario(generation={"max_new_tokens": 6}, capture={"attention_weights": False})


def _writer_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name == "actstore-writer" and t.is_alive()}


@pytest.fixture(autouse=True)
def writers_before() -> set[threading.Thread]:
    """Writer threads alive before the test (another test's, if any, are not ours)."""
    return _writer_threads()


def _assert_nothing_left(location: Path, writers_before: set[threading.Thread]) -> None:
    store = ActStore.open(location)
    assert store.run_ids() == []
    assert store.orphans() == []
    runs = location / "runs"
    assert not runs.exists() or not [p for p in runs.iterdir() if p.is_dir()], list(runs.iterdir())
    cli = CliRunner()
    ls = cli.invoke(main, ["ls", "--store", str(location), "--format", "json"])
    assert ls.exit_code == 0, ls.output
    assert json.loads(ls.output) == [], ls.output
    check = cli.invoke(main, ["check", "--store", str(location), "-q"])
    assert check.exit_code == 0, check.output
    # The writer thread was stopped, not left blocked on its queue.
    assert not _writer_threads() - writers_before


def test_writer_failing_mid_run_reaches_caller(tmp_path: Path, monkeypatch: Any, writers_before: Any) -> None:
    """The writer's 2nd block write raises in the writer thread, during the prefill."""
    for name, value in SMALL_LAYOUT.items():
        monkeypatch.setattr(layout, name, value)
    real_flush = writer_mod._VectorBlocks._flush
    calls: list[str] = []

    def flaky_flush(self: Any, count: int) -> None:
        calls.append(threading.current_thread().name)
        if len(calls) == 2:
            raise Injected("disk said no")
        real_flush(self, count)

    monkeypatch.setattr(writer_mod._VectorBlocks, "_flush", flaky_flush)
    location = tmp_path / "store.zarr"
    store = ActStore.open(location, create=True)
    with pytest.raises(RuntimeError, match="activation writer failed") as info:
        capture_run(_scenario(), store, loaded_tiny("llama", eager=False), progress=False)
    assert isinstance(info.value.__cause__, Injected)
    # The failure was mid-run, in the writer thread (not in finish, on the caller's).
    assert calls[:2] == ["actstore-writer", "actstore-writer"]
    _assert_nothing_left(location, writers_before)


def test_wrong_shape_tensor_fails_the_capture(tmp_path: Path, monkeypatch: Any, writers_before: Any) -> None:
    """The 3rd forward pass hands the writer a residual one column short: the writer
    thread cannot place it, and the capture must say so rather than commit zeros."""
    real_submit = writer_mod.RunWriter.submit
    submits = 0

    def bad_submit(self: Any, position: int, tensors: dict[Any, torch.Tensor], kv_end: int | None = None) -> None:
        nonlocal submits
        submits += 1
        if submits == 3:
            tensors = {**tensors, ("residual", 0): tensors[("residual", 0)][..., :-1]}
        real_submit(self, position, tensors, kv_end=kv_end)

    monkeypatch.setattr(writer_mod.RunWriter, "submit", bad_submit)
    location = tmp_path / "store.zarr"
    store = ActStore.open(location, create=True)
    with pytest.raises(RuntimeError, match="activation writer failed") as info:
        capture_run(_scenario(), store, loaded_tiny("llama", eager=False), progress=False)
    assert isinstance(info.value.__cause__, ValueError)  # numpy's broadcast error
    assert submits >= 3
    _assert_nothing_left(location, writers_before)


@pytest.mark.parametrize("entry", ["capture_run", "capture"])
def test_forward_failing_mid_decode_reaches_caller(entry: str, tmp_path: Path, writers_before: Any) -> None:
    """A forward hook on a decoder layer raises on the 3rd decode pass (one new token)."""
    loaded = loaded_tiny("llama", eager=False)
    decode_calls = 0

    def explode(module: Any, args: Any, output: Any) -> None:
        nonlocal decode_calls
        if args[0].shape[1] == 1:  # decode passes feed one token; prefills feed more
            decode_calls += 1
            if decode_calls == 3:
                raise Injected("forward failed")

    handle = loaded.model.model.layers[1].register_forward_hook(explode)
    location = tmp_path / "store.zarr"
    store = ActStore.open(location, create=True)
    try:
        with pytest.raises(Injected, match="forward failed"):
            if entry == "capture_run":
                capture_run(_scenario(), store, loaded, progress=False)
            else:
                capture(_scenario(), str(location), loaded=loaded, progress=False)
    finally:
        handle.remove()
    assert decode_calls == 3
    _assert_nothing_left(location, writers_before)
    # The model is unharmed and the store still takes a capture afterwards.
    res = capture_run(_scenario(), ActStore.open(location), loaded, progress=False)
    assert ActStore.open(location).run_ids() == [res.run_id]


def test_failed_capture_into_new_location_leaves_no_store(tmp_path: Path) -> None:
    """``capture`` into a location it creates removes it again when nothing was committed."""
    loaded = loaded_tiny("llama", eager=False)
    calls = 0

    def explode(module: Any, args: Any, output: Any) -> None:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise Injected("forward failed")

    handle = loaded.model.model.layers[0].register_forward_hook(explode)
    location = tmp_path / "fresh.zarr"
    try:
        with pytest.raises(Injected):
            capture(_scenario(), str(location), loaded=loaded, progress=False)
    finally:
        handle.remove()
    assert not location.exists()


def test_failed_capture_keeps_a_new_store_another_writer_committed_into(tmp_path: Path) -> None:
    """The store ``capture`` created is removed only while it holds nothing: when another
    writer committed a run into it meanwhile, the failed capture leaves that run alone."""
    from query.synth import write_synthetic_run

    loaded = loaded_tiny("llama", eager=False)
    location = tmp_path / "fresh.zarr"
    calls = 0

    def commit_then_explode(module: Any, args: Any, output: Any) -> None:
        nonlocal calls
        calls += 1
        if calls == 3:
            write_synthetic_run(ActStore.open(location), n_layers=2, prompt_len=8, n_steps=3, width=16)
            raise Injected("forward failed")

    handle = loaded.model.model.layers[0].register_forward_hook(commit_then_explode)
    try:
        with pytest.raises(Injected):
            capture(_scenario(), str(location), loaded=loaded, progress=False)
    finally:
        handle.remove()
    others = ActStore.open(location).run_ids()
    assert len(others) == 1 and others[0].startswith("synth")  # the other writer's run, readable
    assert ActStore.open(location).run(others[0]).array("hidden_out").shape[0] > 0


def test_a_recorder_that_cannot_hook_every_site_removes_the_hooks_it_set() -> None:
    """Hooks are set layer by layer; when one cannot be (a layer the model does not
    have), the error is the one that happened and the model is left without any hook."""
    from actstore.capture.hooks import Recorder
    from actstore.models.architectures import resolve_sites

    loaded = loaded_tiny("llama", eager=False)
    sites = resolve_sites(loaded.model)
    n = len(sites.layers)

    def hooks() -> int:
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in loaded.model.modules())

    before = hooks()
    with pytest.raises(IndexError):
        with Recorder(sites, [0, 1, n + 5], {"hidden_in", "hidden_out", "q", "attn_out"}, torch.float32):
            pass
    assert hooks() == before
    with Recorder(sites, [0, 1], {"hidden_in", "hidden_out", "q", "attn_out"}, torch.float32):
        assert hooks() > before  # the same recorder on real layers does hook
    assert hooks() == before



def test_a_recorder_on_a_model_without_attention_weights_names_the_fix() -> None:
    """Capture switches a model to eager attention when weights are asked for; a recorder
    used on its own with an SDPA model (which returns no weights) fails on the first pass
    with the fix, instead of storing nothing."""
    from actstore.capture.hooks import Recorder
    from actstore.models.architectures import resolve_sites

    loaded = loaded_tiny("llama", eager=False)
    assert loaded.model.config._attn_implementation != "eager"
    ids = torch.tensor([[1, 2, 3]])
    with Recorder(resolve_sites(loaded.model), [0], {"attn_weights"}, torch.float32) as rec:
        rec.mode = "step"
        with pytest.raises(RuntimeError) as e:
            loaded.model(ids)
    assert str(e.value) == ("attention module returned no weights: load the model with "
                            "attn_implementation='eager' to capture attention_weights")  # fmt: skip
    loaded.model.set_attn_implementation("eager")
    with Recorder(resolve_sites(loaded.model), [0], {"attn_weights"}, torch.float32) as rec:
        rec.mode = "step"
        loaded.model(ids)
    assert rec.tensors[("attn_weights", 0)].shape[-2:] == (3, 3)


def test_abort_does_not_wait_forever_for_a_stuck_write(tmp_path: Path, monkeypatch: Any) -> None:
    """A write stuck in the writer thread (here: a tensor whose copy to the host blocks)
    holds ``abort`` for ABORT_WAIT_S at most; the thread finishes once the write does."""
    import time

    import numpy as np

    from actstore.store.writer import ArrayPlan, RunWriter

    monkeypatch.setattr(writer_mod, "ABORT_WAIT_S", 0.3)
    release = threading.Event()

    class Stuck:
        def detach(self) -> Any:
            release.wait(60)
            return torch.zeros((1, 4))

    store = ActStore.open(tmp_path / "s.zarr", create=True)
    group = store.create_run_group(store.new_run_id("stuck"))
    spec = layout.vector_spec("q", 1, 8, 4, np.dtype(np.float32))
    w = RunWriter(group, [ArrayPlan("q", spec, (("q", 0),), {"actstore_dtype": "float32"})])
    w.submit(0, {("q", 0): Stuck()})
    time.sleep(0.2)  # the thread has taken it and is stuck in it
    timer = threading.Timer(20, release.set)  # an abort that waited for the write would take 20 s
    timer.start()
    t0 = time.monotonic()
    w.abort()
    waited = time.monotonic() - t0
    release.set()
    timer.cancel()
    assert 0.25 <= waited < 10, waited
    w._thread.join(5)
    assert not w._thread.is_alive()


def test_a_pass_log_finished_before_it_started_refuses() -> None:
    """Finishing a log whose passes were never written (``start`` not called) would hand the
    run meta records of passes that are not in the store: it fails, naming the missing call."""
    from actstore.capture.pass_log import PassLog

    log = PassLog()
    log.add_stored("snapshot", 0, [1, 2, 3], lambda: {})
    with pytest.raises(AssertionError) as e:
        log.finish()
    assert str(e.value) == "start() first"
