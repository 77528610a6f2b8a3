"""Reports people look at: the HTML comparison report, its CSVs, and activation heatmaps.

>>> from actstore.store.store import ActStore                        # doctest: +SKIP
>>> from actstore.report import build_report, write_heatmaps          # doctest: +SKIP
>>> store = ActStore.open("stores/actstore.zarr")                     # doctest: +SKIP
>>> build_report(store, ["latest"], "results")                        # doctest: +SKIP
PosixPath('results/report.html')

Every number comes from the query layer (``actstore.query``); this package lays the
numbers out (``gather`` -> view dicts -> Jinja2 templates with plotly charts) and
renders PNG heatmaps from lazily read slices.
"""

from __future__ import annotations

from typing import Any

__all__ = ["build_report", "write_heatmaps"]


def __getattr__(name: str) -> Any:
    # Imported on first use: `import actstore.report.progress` stays light.
    if name == "build_report":
        from actstore.report.build import build_report

        return build_report
    if name == "write_heatmaps":
        from actstore.report.heatmaps import write_heatmaps

        return write_heatmaps
    raise AttributeError(name)
