"""Interrupts end every command with one line and exit 128 + signal, never a traceback:
when the cleanup fails in turn (zipfile refuses to close an archive whose member an
interrupt left open: seen when a SIGTERM landed inside an NPZ export's write), when the
signal lands inside an import (seen: torch's C++ start-up aborting the process), during
start-up, and in commands that only read."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from actstore.cli import main

SCRIPT = textwrap.dedent("""
    import os, signal, sys, time, zipfile
    import click
    from actstore.cli.common import _interruptible

    @click.command()
    @click.argument("path")
    @_interruptible
    def cmd(path):
        z = zipfile.ZipFile(path, "w")
        try:
            f = z.open("a.npy", "w")
            f.write(b"x" * 100)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises KeyboardInterrupt here
        finally:
            z.close()  # ValueError: an open writing handle, chained to the interrupt
        print("finished")

    cmd()
""")


def test_a_cleanup_that_fails_after_an_interrupt_is_still_an_interrupt(tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "x.zip")],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert res.returncode == 128 + signal.SIGTERM, res.stderr
    assert res.stderr.strip().splitlines() == ["interrupted"] and "finished" not in res.stdout


IMPORT_SCRIPT = textwrap.dedent("""
    import sys, time
    from actstore.cli.common import _interruptible

    @_interruptible
    def work():
        sys.path.insert(0, sys.argv[1])
        import slow_module  # noqa: F401 - sends the signal to its own process half-way through
        end = time.monotonic() + 20
        while time.monotonic() < end:
            pass
        print("finished")

    work()
""")

SLOW_MODULE = textwrap.dedent("""
    import os, signal, time
    os.kill(os.getpid(), signal.SIGTERM)
    end = time.monotonic() + 0.5
    while time.monotonic() < end:
        pass
    print("the import ran to its end", flush=True)  # the signal lands after it, anywhere
""")


def test_a_signal_that_lands_inside_an_import_waits_for_the_import(tmp_path: Path) -> None:
    """Raised inside the import, the interrupt would leave the module half-run (and, in
    torch's C++ start-up, abort the process): it lands just after the import instead."""
    (tmp_path / "slow_module.py").write_text(SLOW_MODULE)
    res = subprocess.run([sys.executable, "-c", IMPORT_SCRIPT, str(tmp_path)],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert (res.returncode, res.stdout, res.stderr) == (
        128 + signal.SIGTERM,
        "the import ran to its end\n",
        "interrupted\n",
    )


START_SCRIPT = textwrap.dedent("""
    import builtins, os, signal, sys
    real_import = builtins.__import__

    def interrupt_the_cli_import(name, *args, **kwargs):
        if name == "actstore.cli":  # the seconds of start-up, in actstore.__main__.run
            os.kill(os.getpid(), signal.SIGINT)
        return real_import(name, *args, **kwargs)

    builtins.__import__ = interrupt_the_cli_import
    sys.argv = ["actstore", "--version"]
    from actstore.__main__ import run
    run()
""")


def test_ctrl_c_during_start_up_ends_the_process_quietly() -> None:
    """Nothing is written yet: the process ends by the signal, as a SIGTERM would end it,
    instead of printing the traceback of whichever import Ctrl-C landed in."""
    res = subprocess.run([sys.executable, "-c", START_SCRIPT], capture_output=True, text=True, timeout=60,
                         # as from a terminal: an xdist worker passes SIGINT on ignored, which the command keeps
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    assert (res.returncode, res.stdout, res.stderr) == (-signal.SIGINT, "", "")


def test_a_command_that_only_reads_is_interrupted_like_the_others(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """``ls`` interrupted: one ``interrupted`` line and 130, not click's ``Aborted!`` and 1."""
    from actstore.store.store import ActStore

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(ActStore, "open", interrupted)
    res = CliRunner().invoke(main, ["ls", "--store", str(tmp_path / "s.zarr")])
    assert (res.exit_code, res.output) == (128 + signal.SIGINT, "interrupted\n")
