"""The ``actstore`` command line: thin click commands over the library, one module per
command group.

- :mod:`~actstore.cli.common`: the ``main`` group and what every command shares (store
  options, output formats, one-line errors, interrupts)
- :mod:`~actstore.cli.capture`: ``capture``
- :mod:`~actstore.cli.dataset`: ``capture-dataset``, ``status``
- :mod:`~actstore.cli.validate`: ``validate``
- :mod:`~actstore.cli.store`: ``ls``, ``inspect``, ``check``, ``gc``
- :mod:`~actstore.cli.npz`: ``export npz``, ``import npz``
- :mod:`~actstore.cli.hf_dataset`: ``export hf-dataset``
- :mod:`~actstore.cli.query`: the ``query`` group
- :mod:`~actstore.cli.report`: ``report``, ``heatmap``, ``logit-lens``
- :mod:`~actstore.cli.view`: ``view``
- :mod:`~actstore.cli.train`: ``materialize``
- :mod:`~actstore.cli.models`: ``layers``

Each command parses options, calls one library function and prints its result. Importing
this package registers every command on :func:`main`.
"""

from __future__ import annotations

from actstore.cli import (
    capture,
    dataset,
    hf_dataset,
    models,
    npz,
    query,
    report,
    store,
    train,
    validate,
    view,
)
from actstore.cli.common import main

__all__ = ["main"]


def _register() -> None:
    for module in (capture, dataset, store, models, npz, hf_dataset, query, report, train, validate, view):
        module.register(main)
    from actstore.distributed import add_scheduler_option

    for name in ("query", "report"):  # their Dask graphs may run on a cluster
        add_scheduler_option(main.commands[name])


_register()
