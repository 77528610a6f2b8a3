"""One error hierarchy for actstore.

Every error a user can cause (bad scenario, unknown run, unsupported model) derives from
``ActstoreError``. The CLI turns these into one line on stderr and exit code 2; anything
else is a bug and keeps its traceback. Each class also subclasses the builtin it
resembles, so callers that catch ``ValueError`` or ``FileNotFoundError`` keep working.
"""

from __future__ import annotations


class ActstoreError(Exception):
    """Base class of every error actstore raises on purpose."""


class ScenarioError(ActstoreError, ValueError):
    """A scenario file is missing, unparsable or fails validation.

    The message names the file, the field and the fix, on one line.
    """


class UnsupportedModelError(ActstoreError, LookupError):
    """A model's architecture lacks a module actstore needs to hook."""


class ModelLoadError(ActstoreError, OSError):
    """A model or tokenizer could not be loaded (not cached, bad path, bad GGUF)."""


class StoreError(ActstoreError, OSError):
    """The store is missing, unreadable or not an actstore store."""


class RunNotFoundError(StoreError, KeyError):
    """No committed run matches the given id or selector."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "run not found"


class SelectionError(ActstoreError, ValueError):
    """A query asks for something the store does not hold (layer, source, step)."""


class DamagedRunError(StoreError):
    """A run's stored data or metadata is damaged: a chunk fails its checksum, an object
    is missing, metadata does not parse. Names the run, so many-run readers can skip it."""

    def __init__(self, run_id: str, what: str):
        super().__init__(
            f"run {run_id} is damaged: {what} (`actstore check {run_id}` lists every damaged piece)"
        )
        self.run_id = run_id


class DamageWarning(UserWarning):
    """A damaged run or catalog entry was skipped; the message names it."""


class ScenarioWarning(UserWarning):
    """A scenario file loads, but with something ignored (an unknown key); the message
    names the file, the field and the fix, on one line."""


class BadNameError(ActstoreError, ValueError):
    """A name that becomes a path piece (scenario name, label, role, run id, file name)
    breaks the naming rule of :func:`actstore.naming.check_name`."""


class ResourceError(ActstoreError, MemoryError):
    """A request would need more memory than the machine has (``--force`` to try anyway)."""


class OutputError(ActstoreError, OSError):
    """An output folder or file (``--out``) cannot be created or written."""


class OptionError(ActstoreError, ValueError):
    """A command-line option value is out of its range (``--port``)."""
