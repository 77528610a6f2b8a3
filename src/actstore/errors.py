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


class OutputError(ActstoreError, OSError):
    """An output folder or file (``--out``) cannot be created or written."""


class OptionError(ActstoreError, ValueError):
    """A command-line option value is out of its range (``--port``)."""
