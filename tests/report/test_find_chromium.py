"""Which Chromium the report's browser checks use: ``$CHROMIUM`` when it names a file,
else the first candidate on PATH."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from actstore.report.browser import CHROMIUM_CANDIDATES, find_chromium


def test_chromium_env_names_the_binary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    exe = tmp_path / "my-chromium"
    exe.write_text("#!/bin/sh\n")
    monkeypatch.setenv("CHROMIUM", str(exe))
    assert find_chromium() == str(exe)


def test_a_chromium_env_that_names_nothing_falls_back_to_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHROMIUM", str(tmp_path / "absent"))
    on_path = next((p for p in map(shutil.which, CHROMIUM_CANDIDATES) if p), None)
    assert find_chromium() == on_path
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing on PATH either
    assert find_chromium() is None
