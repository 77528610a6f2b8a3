"""Helpers for the cluster tests: scenarios on the saved tiny model, and the real CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from actstore.scenario import scenario_from_dict
from actstore.testing import SAMPLE_MESSAGES, SAMPLE_REFERENCES

HERE = Path(__file__).resolve().parent
MESSAGES = SAMPLE_MESSAGES
REFERENCES = SAMPLE_REFERENCES


def scenario_dict(
    model_folder: Path, name: str = "tiny", max_new_tokens: int = 4, **capture: Any
) -> dict[str, Any]:
    return {
        "name": name,
        "model": {"id": str(model_folder), "dtype": "float32", "device": "cpu"},
        "prompt": {"messages": MESSAGES},
        "generation": {"max_new_tokens": max_new_tokens},
        "capture": {"store_dtype": "float32", **capture},
        "reference_states": REFERENCES,
    }


def make_scenario(model_folder: Path, name: str = "tiny", max_new_tokens: int = 4, **capture: Any) -> Any:
    return scenario_from_dict(scenario_dict(model_folder, name, max_new_tokens, **capture))


def write_scenario(
    folder: Path, model_folder: Path, name: str, max_new_tokens: int = 4, **capture: Any
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(scenario_dict(model_folder, name, max_new_tokens, **capture)))
    return path


def cli_env(**extra: str) -> dict[str, str]:
    """Environment for an ``actstore`` subprocess: ours minus any endpoint/scheduler."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("AWS_ENDPOINT_URL", "ACTSTORE_SCHEDULER", "ACTSTORE_STORE")
    }
    return {**env, **extra}


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """``actstore ARGS`` in a fresh interpreter (the real entry point, its own S3 clients)."""
    return subprocess.run(
        [str(Path(sys.executable).parent / "actstore"), *args],
        capture_output=True, text=True, timeout=timeout, env=env or cli_env(),
    )  # fmt: skip
