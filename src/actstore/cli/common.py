"""What every ``actstore`` command shares: the ``main`` group, the store options, the
output formats, and the error and interrupt handling.

Library errors (``ActstoreError``) become one line on stderr and exit code 2, here
(``_fail_cleanly``) and nowhere else, and so does running out of memory, with exit code 1;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

import click

from actstore.errors import ActstoreError, SelectionError

STORE_ENV = "ACTSTORE_STORE"


def _fail_cleanly(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ActstoreError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except MemoryError as e:  # not the input's fault: exit 1, but one line all the same
            click.echo(f"error: out of memory{f': {e}' if str(e) else ''} (fix: read fewer layers or "
                       "positions at once, or run where more memory is free)", err=True)  # fmt: skip
            sys.exit(1)

    return wrapper


_stopping: list[int] = []  # the signal that is stopping this process, once one came


def stop_on_signals() -> dict[int, Any]:
    """Ctrl-C and SIGTERM both raise KeyboardInterrupt in the main thread, so every
    ``except BaseException`` cleanup runs (a default SIGTERM kills without any). SIGINT is
    re-armed because a process started in the background by a shell inherits it ignored.
    A repeated signal is ignored: the cleanup the first one started must finish.
    Returns the handlers it replaced."""

    def stop(signum: int, frame: Any) -> None:
        if _stopping or _held_back(signum, frame):
            return
        _stopping.append(signum)
        raise KeyboardInterrupt

    return {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}


def _held_back(signum: int, frame: Any) -> bool:
    """An exception raised inside an ``import`` can be swallowed by it (the command then
    runs to the end), leave a module that can never load again ("cannot load module more
    than once per process") or, inside torch's C++ start-up, abort the process. So a
    signal that lands in one is sent again a moment later, until the import is over."""
    while frame is not None:
        if "importlib._bootstrap" in frame.f_code.co_filename.replace("/", "."):
            _send_again(signum, 0.02)
            return True
        frame = frame.f_back
    return False


def _send_again(signum: int, delay: float) -> None:
    """The signal to this process again after ``delay`` seconds, from a thread (it lands
    in the main thread, past the place that could not take it)."""
    threading.Timer(delay, os.kill, (os.getpid(), signum)).start()


def _redeliver(hook: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """An unraisable-exception hook: an interrupt that landed in a ``__del__`` or a
    callback, where Python prints and drops exceptions, is sent again (from a thread, so
    it lands after this hook), instead of being lost while the command carries on."""

    def on_unraisable(unraisable: Any) -> None:
        if isinstance(unraisable.exc_value, KeyboardInterrupt) and _stopping:
            signum = _stopping.pop()  # the handler raises again on the next one
            _send_again(signum, 0.01)
            return
        hook(unraisable)

    return on_unraisable


def _ignore_signals() -> None:
    """At exit the work is done: an interrupt now would only print a traceback from
    some library's atexit callback (torch's, seen in the kill tests)."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)


def _interruptible(fn: Callable[..., Any]) -> Callable[..., Any]:
    """An interrupt cleans up, prints one line and exits 128 + the signal (130 for
    Ctrl-C, 143 for SIGTERM), the shell's convention. Every command runs in it (``_Main``)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if threading.current_thread() is not threading.main_thread():
            return fn(*args, **kwargs)  # signals reach the main thread only
        _stopping.clear()
        previous = stop_on_signals()
        hook, sys.unraisablehook = sys.unraisablehook, _redeliver(sys.unraisablehook)
        try:
            try:
                return fn(*args, **kwargs)
            except Exception as e:
                if _stopping and _raised_by_interrupt(e):
                    # cleanup the interrupt set off failed in turn (zipfile refuses to close
                    # a member half-written): still an interruption, not a crash
                    raise KeyboardInterrupt from e
                raise
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            if not _stopping:  # raised by other means than our handler
                sys.exit(128 + signal.SIGINT)
            # os._exit: under `python -m`, an interrupt that landed inside exec()'d code
            # (dataclasses, namedtuple) makes CPython die by SIGINT whatever sys.exit says.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(128 + _stopping[0])
        finally:
            sys.unraisablehook = hook
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            atexit.unregister(_ignore_signals)  # (re-)registered last, so it runs first at exit
            atexit.register(_ignore_signals)

    return wrapper


def _raised_by_interrupt(e: BaseException) -> bool:
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, KeyboardInterrupt):
            return True
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return False


def parse_storage_options(values: tuple[str, ...]) -> dict[str, Any]:
    """``key=value`` pairs; values that parse as JSON (numbers, true) are typed."""
    opts: dict[str, Any] = {}
    for item in values:
        if "=" not in item:
            raise click.BadParameter(f"{item!r} is not key=value", param_hint="--storage-option")
        key, value = item.split("=", 1)
        try:
            opts[key] = json.loads(value)
        except ValueError:
            opts[key] = value
    return opts


def store_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--store and --storage-option, shared by every command that opens a store."""
    fn = click.option(
        "--storage-option",
        "storage_options",
        multiple=True,
        metavar="KEY=VALUE",
        help="fsspec option for object storage (repeatable), e.g. endpoint_url=http://127.0.0.1:9000",
    )(fn)
    fn = click.option(
        "--store",
        "store_location",
        envvar=STORE_ENV,
        default=None,
        metavar="PATH|URL",
        help=f"store location (default: ${STORE_ENV}, else stores/actstore.zarr)",
    )(fn)
    return fn


def open_store(location: str | None, storage_options: tuple[str, ...], create: bool = False) -> Any:
    from actstore.scenario import DEFAULT_STORE
    from actstore.store.store import ActStore

    return ActStore.open(
        location or DEFAULT_STORE, create=create, storage_options=parse_storage_options(storage_options)
    )


def accept_hook_names(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Let ``--source`` be a TransformerLens hook name (``blocks.16.hook_resid_post``): it
    becomes its actstore source and fixes ``--layers``/``--layer`` (see actstore.tl_names).
    Goes below ``_fail_cleanly``, so a bad name is one line and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from actstore.tl_names import translate_options

        translate_options(kwargs, lambda: _hook_facts(kwargs))
        return fn(*args, **kwargs)

    return wrapper


def _hook_facts(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The model facts of the runs a command names, for hook names that depend on them."""
    from actstore.tl_names import run_facts

    store = open_store(kwargs.get("store_location"), kwargs.get("storage_options") or ())
    if kwargs.get("runs"):
        readers = store.runs(kwargs["runs"])
    else:
        readers = [store.run(kwargs.get("run_sel") or kwargs.get("run") or "latest")]
    seen = {tuple(sorted(run_facts(r).items())) for r in readers}
    if len(seen) != 1:
        raise SelectionError("the runs named come from models whose MLPs or families differ: "
                             "a TransformerLens name means different sources in them; name runs of one model")  # fmt: skip
    return dict(next(iter(seen)))


def _quiet_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--quiet", "-q", is_flag=True, help="no progress bars")(fn)


class _Main(click.Group):
    """The ``actstore`` group: every command runs :func:`_interruptible`, so Ctrl-C or
    SIGTERM anywhere cleans up and ends with one ``interrupted`` line (click's own answer
    is ``Aborted!`` and exit code 1, and SIGTERM would kill without any cleanup)."""

    def invoke(self, ctx: click.Context) -> Any:
        return _interruptible(super().invoke)(ctx)


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="actstore")
def main() -> None:
    """Capture every activation of a causal LM into a Zarr store, and query it."""
    _one_line_warnings()


def _one_line_warnings() -> None:
    """Damage warnings (a run skipped, a catalog entry unreadable) and scenario warnings
    (an unknown key ignored) print as one ``warning:`` line on stderr, like errors,
    instead of Python's file:line format."""
    import warnings

    from actstore.errors import DamageWarning, ScenarioWarning

    shown = warnings.showwarning

    def show(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
        if issubclass(category, DamageWarning | ScenarioWarning):
            click.echo(f"warning: {message}", err=True)
        else:
            shown(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    warnings.simplefilter("always", DamageWarning)
    warnings.simplefilter("always", ScenarioWarning)


def render_frame(df: Any, fmt: str) -> str:
    """A DataFrame as an aligned table, CSV or JSON records."""
    if fmt == "csv":
        return str(df.to_csv(index=False)).rstrip("\n")
    if fmt == "json":
        return str(df.to_json(orient="records", indent=2))
    if df.empty:
        return "(no rows)"
    import pandas as pd

    with pd.option_context("display.max_rows", None, "display.max_columns", None, "display.width", 200):
        return str(df.to_string(index=False))


def fit_layers(text: str, readers: list[Any]) -> list[int] | None:
    """Layers for a query over ``readers`` (see ``actstore.query.layers``: a range is
    clipped to the layers every run captured, with a note; a listed layer must exist)."""
    from actstore.query.layers import choose_layers, common_layers

    choice = choose_layers(text, common_layers(readers))
    if choice.note:
        click.echo(f"note: {choice.note}", err=True)
    return choice.layers


def parse_steps(text: str | None) -> list[int] | None:
    if text is None or text.strip().lower() == "all":
        return None
    try:
        return [int(s) for s in text.split(",")]
    except ValueError:
        raise SelectionError(f"--steps {text!r}: use all or a list of steps like 0,5,-1") from None
