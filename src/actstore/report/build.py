"""``build_report``: one self-contained HTML report plus the seed's four CSVs.

Data flow::

    store + run selectors --ActStore.runs--> RunReaders (lazy)
      --gather (query layer, one dask.compute)--> ReportData
      --narrative / overview_section / run_section--> view dicts + Figures (plotly specs)
      --Jinja2 (templates/report.html.j2), with static/report.css, static/report.js and
        plotly.min.js inlined--> DIR/report.html, DIR/report_<UTC timestamp>.html
      --csvs--> DIR/comparison_report.csv, comparison_cosines.csv,
                intra_run_report.csv, intra_run_cosines.csv

The HTML needs no network: every script, style and number is inside the file.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from datetime import UTC, datetime
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2

from actstore import __version__
from actstore.paths import check_folder, output_folder
from actstore.query import metrics as M
from actstore.query.damaged import skipping_damaged
from actstore.report import progress as P
from actstore.report.csvs import write_csvs
from actstore.report.figures import Figures, script_safe
from actstore.report.gather import ReportData, gather
from actstore.report.narrative import first_screen
from actstore.report.overview_section import inter_section, intra_overview
from actstore.report.run_section import run_card

REPORT_NAME = "report.html"
OPEN_CARDS_UP_TO = 3  # with more runs, run cards start collapsed


@cache
def _static(name: str) -> str:
    return (resources.files("actstore.report") / "static" / name).read_text(encoding="utf-8")


@cache
def plotly_js() -> str:
    """The bundled plotly.min.js of the installed plotly package (no CDN)."""
    from plotly.offline import get_plotlyjs

    return script_safe(get_plotlyjs())


@cache
def _env() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.PackageLoader("actstore.report", "templates"),
        autoescape=jinja2.select_autoescape(enabled_extensions=("html", "j2"), default_for_string=True),
        trim_blocks=False,
        lstrip_blocks=False,
        undefined=jinja2.StrictUndefined,
    )


def render_html(data: ReportData, store_location: str, progress: bool | None = None) -> str:
    """The report page for already gathered numbers."""
    figs = Figures()
    bar = P.bar(len(data.runs) + 3, "report: charts", progress, unit="section")
    first = first_screen(data)
    intra = intra_overview(data, figs)
    bar.update()
    cards = []
    for rr in data.runs:
        cards.append(run_card(rr, figs, open_=len(data.runs) <= OPEN_CARDS_UP_TO))
        bar.update()
    inter = inter_section(data, figs)
    bar.update()
    title = ", ".join(dict.fromkeys(str(r.run.scenario.get("name", r.run.id)) for r in data.runs))
    html = _env().get_template("report.html.j2").render(
        title=title if len(title) < 80 else f"{len(data.runs)} runs",
        runs=data.runs, first=first, intra=intra, cards=cards, inter=inter,
        generated_at=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), store=store_location,
        version=__version__, frac=data.frac, magnitude=data.magnitude,
        css=_static("report.css"), js=script_safe(_static("report.js")), plotly_js=plotly_js(),
        figures_json=figs.to_json(),
    )  # fmt: skip
    bar.update()
    bar.close()
    return html


def build_report(
    store: Any,
    run_ids: Sequence[str] | None,
    out_dir: str | Path,
    progress: bool | None = None,
    *,
    frac: float = M.DEFAULT_FRAC,
    magnitude: bool = True,
    skip_damaged: bool = True,
) -> Path:
    """Write ``out_dir/report.html`` (plus a timestamped copy) and the four CSVs.

    ``run_ids``: run ids or selectors (``latest``, a scenario name, ``all``); None means
    every run in the store. ``progress``: None shows bars only on a terminal. Jaccard
    overlap uses the top ``frac`` of dimensions, by magnitude as the seed's report does
    (``magnitude=False``: by value). A damaged run is left out with a DamageWarning
    naming it (``skip_damaged=False``: the report fails naming it). Returns the path of
    ``report.html``.
    """
    check_folder(out_dir)  # before the work: a bad --out fails at once, creating nothing
    runs = store.runs(list(run_ids) if run_ids else ["all"], skip_damaged=skip_damaged)
    bar = P.bar(3, "report", progress, unit="stage")
    bar.set_postfix_str("querying")
    data = skipping_damaged(lambda rs: gather(rs, frac=frac, magnitude=magnitude), runs, skip=skip_damaged)
    bar.update()
    bar.set_postfix_str("rendering")
    html = render_html(data, str(store.location), progress)
    bar.update()
    # a full disk or a lost permission: one line naming --out, and no new folder left
    with output_folder(out_dir) as out:
        path = out / REPORT_NAME
        path.write_text(html, encoding="utf-8")
        stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H-%M-%SZ")
        shutil.copyfile(path, out / f"report_{stamp}.html")
        write_csvs(data, out)
    bar.update()
    bar.close()
    return path
