"""Progress bars: on for a terminal or when asked, silent otherwise."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from actstore.report import progress as P
from actstore.report.heatmaps import write_heatmaps


def test_enabled_follows_the_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    class Tty:
        def isatty(self) -> bool:
            return True

    assert P.enabled(False) is False and P.enabled(True) is True
    monkeypatch.setattr("sys.stderr", Tty())
    assert P.enabled(None) is True


def test_bars_only_when_asked(two_run_store: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = two_run_store.run(two_run_store.run_ids()[0])
    write_heatmaps(run, "attn_out", [0], [0, 1], out=tmp_path, progress=None)  # stderr is no terminal here
    assert capsys.readouterr().err == ""
    write_heatmaps(run, "attn_out", [0], [0, 1], out=tmp_path, progress=True)
    assert "heatmaps attn_out" in capsys.readouterr().err


def test_report_quiet_when_not_a_terminal(
    two_run_store: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from actstore.report import build_report

    build_report(two_run_store, [two_run_store.run_ids()[0]], tmp_path, progress=None)
    assert capsys.readouterr().err == ""
    build_report(two_run_store, [two_run_store.run_ids()[0]], tmp_path / "b", progress=True)
    assert "report" in capsys.readouterr().err
