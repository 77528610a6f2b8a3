"""``actstore report``, ``actstore heatmap`` and ``actstore logit-lens``.

Thin commands over :mod:`actstore.report` and :mod:`actstore.query.logit_lens`;
``actstore.cli`` calls :func:`register`. Progress bars show on a terminal only, never with
``--quiet``.
"""

from __future__ import annotations

from pathlib import Path

import click

from actstore.cli.common import (
    _fail_cleanly,
    _quiet_option,
    accept_hook_names,
    fit_layers,
    open_store,
    parse_steps,
    store_options,
)
from actstore.paths import check_file


def _split(values: tuple[str, ...]) -> list[str]:
    """``--runs a --runs b,c`` -> [a, b, c]."""
    return [v.strip() for item in values for v in item.split(",") if v.strip()]


def register(main: click.Group) -> None:
    """Add the report commands to the ``actstore`` group."""

    @main.command("report")
    @store_options
    @click.option("--runs", "runs", multiple=True, metavar="RUN",
                  help="run ids, id prefixes, scenario-run ids, scenario names, latest or all (repeatable or comma-separated; default: all)")  # fmt: skip
    @click.option("--out", "out", default="results", show_default=True, metavar="DIR",
                  help="folder for report.html, its timestamped copy and the four CSVs")  # fmt: skip
    @click.option("--overlap-by", type=click.Choice(["magnitude", "value"]), default="magnitude", show_default=True,
                  help="rank dimensions for the top-1%% overlap by |x| (as the seed) or by x")  # fmt: skip
    @click.option("--skip-damaged/--no-skip-damaged", default=True, show_default=True,
                  help="leave out damaged runs (a warning names each) or fail on the first")  # fmt: skip
    @_quiet_option
    @_fail_cleanly
    def report_cmd(
        runs: tuple[str, ...], out: str, overlap_by: str, skip_damaged: bool, store_location: str | None,
        storage_options: tuple[str, ...], quiet: bool,
    ) -> None:  # fmt: skip
        """Write one self-contained HTML report (no network needed) and the seed's CSVs."""
        from actstore.report.build import build_report

        store = open_store(store_location, storage_options)
        path = build_report(store, _split(runs) or None, out, None if not quiet else False,
                            magnitude=overlap_by == "magnitude", skip_damaged=skip_damaged)  # fmt: skip
        click.echo(str(path))

    @main.command("heatmap")
    @click.argument("run", default="latest")
    @click.option("--source", default="hidden_out", show_default=True,
                  help="hidden_in, hidden_out, q, k, v, attn_out, attn_weights, mlp_*, embeddings, logits")  # fmt: skip
    @click.option(
        "--layers", default="all", show_default=True, help="all, a range like 29-33, or a list like 0,10,20"
    )
    @click.option("--steps", default="all", show_default=True, help="all or a list like 0,1,5,-1")
    @click.option(
        "--per-head", is_flag=True, help="attn_weights: one image per head instead of the head mean"
    )
    @click.option("--normalize", type=click.Choice(["none", "per_image", "signed", "global"]), default="per_image",
                  show_default=True, help="colour scale per image, symmetric around 0, or shared by all images")  # fmt: skip
    @click.option("--reduce", type=click.Choice(["signed", "abs"]), default="signed", show_default=True,
                  help="keep the sign, or draw magnitudes")  # fmt: skip
    @click.option("--cmap", default=None,
                  help="any Matplotlib colormap name (default: RdBu_r with --normalize signed, else viridis)")  # fmt: skip
    @click.option("--out", "out", default="heatmaps", show_default=True, metavar="DIR",
                  help="images go to DIR/<run_id>/<source>/")  # fmt: skip
    @store_options
    @_quiet_option
    @_fail_cleanly
    @accept_hook_names
    def heatmap_cmd(
        run: str, source: str, layers: str, steps: str, per_head: bool, normalize: str, reduce: str,
        cmap: str | None, out: str, store_location: str | None, storage_options: tuple[str, ...], quiet: bool,
    ) -> None:  # fmt: skip
        """Render activation heatmaps of RUN: one PNG per layer x step (only those slices are read)."""
        from actstore.report.heatmaps import write_heatmaps

        reader = open_store(store_location, storage_options).run(run)
        paths = write_heatmaps(
            reader, source, fit_layers(layers, [reader]), parse_steps(steps), per_head=per_head, normalize=normalize,
            reduce=reduce, cmap=cmap, out=out, progress=None if not quiet else False,
        )  # fmt: skip
        folder = Path(out) / reader.id / source
        click.echo(f"{len(paths)} image(s) in {folder}")

    @main.command("logit-lens")
    @click.argument("run", default="latest")
    @click.option("--steps", default="all", show_default=True, help="all or a list like 0,1")
    @click.option(
        "--position", type=int, default=-1, show_default=True, help="position within each step (-1: last)"
    )
    @click.option("--top-k", type=int, default=10, show_default=True, help="top tokens recorded per layer")
    @click.option("--device", default=None, help="override the scenario's device (e.g. cpu)")
    @click.option("--out", "out", default="logit_lens.json", show_default=True, metavar="FILE")
    @store_options
    @_fail_cleanly
    def logit_lens_cmd(
        run: str, steps: str, position: int, top_k: int, device: str | None, out: str,
        store_location: str | None, storage_options: tuple[str, ...],
    ) -> None:  # fmt: skip
        """Project each layer's hidden_out through the final norm and LM head; write logit_lens.json.

        Each entry's kl_from_final is KL(layer || last captured layer), as Activation Lab defines it.
        """
        from actstore.models.loading import load_model
        from actstore.query.logit_lens import check_request, logit_lens, write_logit_lens_json
        from actstore.scenario import ModelConfig

        check_file(out)  # before the model loads
        reader = open_store(store_location, storage_options).run(run)
        picked = parse_steps(steps)
        check_request(reader, picked, position, top_k)  # before the model loads
        cfg = dict(reader.scenario["model"])
        if device is not None:
            cfg["device"] = device
        loaded = load_model(ModelConfig(**cfg))
        df = logit_lens(reader, loaded, steps=picked, position=position, top_k=top_k)
        click.echo(str(write_logit_lens_json(df, out)))
