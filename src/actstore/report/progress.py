"""Progress bars for long report and heatmap jobs (tqdm on stderr).

``progress=None`` means "show a bar only when stderr is a terminal", so piped or logged
runs stay clean; ``True`` / ``False`` force it on or off (the CLI's ``--quiet`` passes
``False``).
"""

from __future__ import annotations

import sys
from typing import Any

from tqdm.auto import tqdm


def enabled(progress: bool | None) -> bool:
    """Whether to draw a bar: the explicit choice, else whether stderr is a terminal."""
    return sys.stderr.isatty() if progress is None else bool(progress)


def bar(total: int, desc: str, progress: bool | None, unit: str = "it") -> Any:
    """A tqdm bar on stderr, disabled (a no-op) when :func:`enabled` says so."""
    return tqdm(
        total=total, desc=desc, unit=unit, disable=not enabled(progress), file=sys.stderr, leave=False
    )
