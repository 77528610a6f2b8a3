"""Local folders the user names (``--store``, ``--out``): checked before any work, and
the OS errors of writing them turned into one-line errors that name the path and the fix.

Only errors that are the user's to fix are mapped (a file where a folder should be, no
write permission, a read-only or full filesystem); anything else keeps its traceback.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from actstore.errors import ActstoreError, OutputError

_REASONS = {
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EROFS: "read-only filesystem",
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.ENOTDIR: "a file where a folder should be",
    errno.EEXIST: "a file where a folder should be",
    errno.EISDIR: "a folder where a file should be",
}
_FIXES = {
    errno.ENOSPC: "free some space",
    errno.EDQUOT: "free some space",
    errno.ENOTDIR: "remove the file or choose another path",
    errno.EEXIST: "remove the file or choose another path",
    errno.EISDIR: "choose a file path",
}


def is_user_error(e: BaseException) -> bool:
    """An OS error the user fixes by choosing another path or freeing space."""
    return isinstance(e, OSError) and not isinstance(e, ActstoreError) and e.errno in _REASONS


def user_error_in(e: BaseException) -> OSError | None:
    """The user's OS error that caused ``e`` (itself, or one it was raised from, e.g. by
    a writer thread), else None."""
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, OSError) and is_user_error(cur):
            return cur
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return None


def describe(e: OSError, what: str, path: str | os.PathLike[str]) -> str:
    """``WHAT PATH: REASON (FIX)`` for a user's OS error (see :func:`is_user_error`)."""
    fix = _FIXES.get(e.errno or 0, "choose a folder you can write")
    return f"{what} {os.fspath(path)}: {_REASONS.get(e.errno or 0, e.strerror)} ({fix})"


def _unwritable(folder: Path) -> int | None:
    """The errno a write into the existing ``folder`` would fail with, else None."""
    if os.access(folder, os.W_OK | os.X_OK):
        return None
    try:
        if os.statvfs(folder).f_flag & os.ST_RDONLY:
            return errno.EROFS
    except OSError:
        pass
    return errno.EACCES


def check_folder(
    path: str | os.PathLike[str],
    what: str = "--out",
    error: type[ActstoreError] = OutputError,
    *,
    named: str | os.PathLike[str] | None = None,
) -> None:
    """Raise ``error`` unless ``path`` is, or could be created as, a folder this process
    can write. Creates nothing, so a command can check its output before the work.
    ``named``: the path the message names (default ``path``)."""
    target = Path(path)
    shown = Path(named) if named is not None else target
    probe = target
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        if probe == shown:
            raise error(f"{what} {shown}: not a folder; remove the file or choose another path")
        raise error(f"{what} {shown}: {probe} is a file, not a folder; remove it or choose another path")
    code = _unwritable(probe)
    if code is not None:
        raise error(describe(OSError(code, os.strerror(code)), what, shown))


@contextmanager
def writing(
    path: str | os.PathLike[str], what: str = "--out", error: type[ActstoreError] = OutputError
) -> Iterator[None]:
    """Turn a user's OS error inside the block (full disk, no permission...) into
    ``error`` naming ``path``."""
    try:
        yield
    except OSError as e:
        if not is_user_error(e):
            raise
        raise error(describe(e, what, path)) from e


def check_file(
    path: str | os.PathLike[str], what: str = "--out", error: type[ActstoreError] = OutputError
) -> None:
    """Like :func:`check_folder`, for a file to be written at ``path``."""
    p = Path(path)
    if p.is_dir():
        raise error(f"{what} {p}: a folder, not a file; choose a file path")
    check_folder(p.parent, what, error, named=p)


@contextmanager
def output_folder(
    path: str | os.PathLike[str], what: str = "--out", error: type[ActstoreError] = OutputError
) -> Iterator[Path]:
    """``mkdir -p path`` for the block's output. If the block fails, the folders this made
    are removed with what was written into them, so a failed command leaves nothing new
    (files written into a folder that existed before stay); a user's OS error becomes
    ``error`` naming ``path``."""
    p = Path(path)
    check_folder(p, what, error)
    made = None  # the topmost folder this call creates
    probe = p
    while not probe.exists():
        made, probe = probe, probe.parent
    try:
        with writing(p, what, error):
            p.mkdir(parents=True, exist_ok=True)
            yield p
    except BaseException:
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)
        raise
