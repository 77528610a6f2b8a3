"""The ``actstore`` command: ``python -m actstore ...`` and the installed script
(``python -m actstore.cli`` works too, through ``actstore/cli/__main__.py``)."""

import _signal  # not `signal`: it imports enum, long enough for a Ctrl-C to land in


def run() -> None:
    # Start-up (torch, transformers, Dask: seconds) writes nothing, so a Ctrl-C during it
    # ends the process at once, as a SIGTERM does, instead of printing the traceback of
    # whichever import it landed in. Each command installs its own handlers
    # (actstore.cli.common._interruptible).
    if _signal.getsignal(_signal.SIGINT) is _signal.default_int_handler:  # not if inherited ignored
        _signal.signal(_signal.SIGINT, _signal.SIG_DFL)
    from actstore.cli import main

    main(prog_name="actstore")


if __name__ == "__main__":
    run()
