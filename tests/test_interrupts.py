"""An interrupt whose cleanup fails in turn is still an interruption: one line, exit
128 + signal, no traceback (zipfile refuses to close an archive whose member an
interrupt left open: seen when a SIGTERM landed inside an NPZ export's write)."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

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
