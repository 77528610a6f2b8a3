"""``actstore query``: the query layer on the command line.

    actstore query cosine --layers 29-33                 # latest run, initial vs final
    actstore query mae --runs all --compare runs --format csv
    actstore query jaccard --compare snapshot:3:reference:joy --source hidden_in
    actstore query cross-layer --matrix
    actstore query trajectory --layer 20 --neuron 7
    actstore query tables --run emotions
    actstore query pair snapshot:3 <run id>@reference:joy --what passes   # any states of any runs
    actstore query group final --runs all --what linkage
    actstore query depth step:0 --what convergence

Each command parses its options, calls one function of ``actstore.query`` and prints
the DataFrame it returns as a table, CSV or JSON (``common.render_frame``). Library errors
become one line and exit code 2 (``common._fail_cleanly``).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from typing import Any

import click

from actstore.cli.common import (
    _fail_cleanly,
    accept_hook_names,
    fit_layers,
    open_store,
    parse_steps,
    render_frame,
    store_options,
)

COMPARE_HELP = (
    "initial-final (default: each run's last prompt token vs its last position), runs "
    "(every pair of runs, initial and final states), snapshots-references, or two states "
    "STATE:STATE with STATE one of initial, final, step:N, pos:N, snapshot:K, snapshot:generated, reference:LABEL "
    "(e.g. step:0:final, snapshot:3:reference:joy)"
)


def _opt(*decls: str, **kw: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return click.option(*decls, show_default=True, **kw)


def _common(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = _opt("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table")(fn)
    fn = _opt("--layers", default="all", help="real layer indices: all, 29-33, 0,5,10")(fn)
    return store_options(fn)


def _run_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return _opt("--run", "run_sel", default="latest", help="run id, id prefix, scenario-run id, scenario name or latest")(fn)


@click.group("query")
def query() -> None:
    """Query stored activations lazily (only the chunks an answer needs are read)."""


def _metric_command(metric: str) -> click.Command:
    @_opt("--runs", "runs", multiple=True, default=("latest",),
          help="run ids, id prefixes, scenario-run ids, scenario names, latest or all (repeatable)")  # fmt: skip
    @_opt(
        "--source",
        "sources",
        multiple=True,
        default=("hidden_out",),
        help="source(s) to compare (repeatable)",
    )
    @_opt("--compare", "compare", default="initial-final", help=COMPARE_HELP)
    @_opt("--frac", type=click.FloatRange(0, 1, min_open=True), default=0.01, help="top fraction for jaccard")
    @_opt("--magnitude", is_flag=True, help="jaccard ranks by |value|")
    @_opt("--summary", is_flag=True, help="the seed's per-group summary columns instead of per-layer rows")
    @_opt("--skip-damaged", is_flag=True,
          help="leave out a damaged run (a warning names it) instead of failing on it")  # fmt: skip
    @_common
    @_fail_cleanly
    @accept_hook_names
    def command(
        runs: tuple[str, ...], sources: tuple[str, ...], compare: str, frac: float, magnitude: bool,
        summary: bool, skip_damaged: bool, layers: str, fmt: str, store_location: str | None,
        storage_options: tuple[str, ...],
    ) -> None:  # fmt: skip
        from actstore import query as q

        store = open_store(store_location, storage_options)
        readers = store.runs(runs, skip_damaged=skip_damaged)
        kw: dict[str, Any] = {
            "sources": list(sources),
            "layers": fit_layers(layers, readers),
            "frac": frac,
            "magnitude": magnitude,
        }
        if compare == "initial-final":
            answer = functools.partial(q.intra_run, **kw)
        elif compare == "runs":
            answer = functools.partial(q.inter_run, **kw)
        elif compare == "snapshots-references":
            answer = functools.partial(q.snapshots_vs_references, **kw)
        else:
            a, b = q.parse_state_pair(compare)
            answer = functools.partial(q.compare_states, a=a, b=b, **kw)
        df = q.skipping_damaged(answer, readers, skip=skip_damaged)
        if summary:
            df = q.summarize(df)
        else:
            df = df.drop(columns=[m for m in ("cosine", "mae", "jaccard") if m != metric])
        click.echo(render_frame(df, fmt))

    command.__doc__ = {
        "cosine": "Cosine similarity between two states, per layer (1 = same direction).",
        "mae": "Mean absolute difference between two states, per layer.",
        "jaccard": "Overlap (Jaccard) of the top-fraction neurons of two states, per layer.",
    }[metric]
    return click.command(metric)(command)


for _m in ("cosine", "mae", "jaccard"):
    query.add_command(_metric_command(_m))


@query.command("cross-layer")
@_run_option
@_opt("--source", default="hidden_out")
@_opt("--state", default="final", help="initial, final, step:N, pos:N, snapshot:K, snapshot:generated or reference:LABEL")
@_opt("--matrix", is_flag=True, help="print the L x L matrix instead of long rows")
@_common
@_fail_cleanly
@accept_hook_names
def cross_layer_cmd(run_sel: str, source: str, state: str, matrix: bool, layers: str, fmt: str,
                    store_location: str | None, storage_options: tuple[str, ...]) -> None:  # fmt: skip
    """Cosine between every pair of layers' vectors at one state."""
    from actstore import query as q

    run = open_store(store_location, storage_options).run(run_sel)
    df = q.cross_layer(run, source=source, state=state, layers=fit_layers(layers, [run]))
    if matrix:
        df = df.pivot(index="layer_a", columns="layer_b", values="cosine").reset_index()
        df.columns = [str(c) for c in df.columns]
    click.echo(render_frame(df, fmt))


@query.command("trajectory")
@_run_option
@_opt("--layer", type=int, default=None, help="required unless --source is a TransformerLens hook name, which names it")
@_opt("--neuron", type=int, required=True)
@_opt("--source", default="hidden_out")
@_opt("--over", type=click.Choice(["steps", "positions"]), default="steps")
@_opt("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table")
@store_options
@_fail_cleanly
@accept_hook_names
def trajectory_cmd(run_sel: str, layer: int | None, neuron: int, source: str, over: str, fmt: str,
                   store_location: str | None, storage_options: tuple[str, ...]) -> None:  # fmt: skip
    """One neuron's value at the last position of every step (or at every position)."""
    from actstore import query as q

    if layer is None:
        from actstore.errors import SelectionError

        raise SelectionError("give --layer (or a TransformerLens --source such as blocks.3.hook_resid_post)")
    run = open_store(store_location, storage_options).run(run_sel)
    click.echo(render_frame(q.neuron_trajectory(run, layer, neuron, source=source, over=over), fmt))


@query.command("decomposition")
@_run_option
@_opt("--steps", default="all", help="all or a list like 0,5,-1")
@_common
@_fail_cleanly
def decomposition_cmd(run_sel: str, steps: str, layers: str, fmt: str,
                      store_location: str | None, storage_options: tuple[str, ...]) -> None:  # fmt: skip
    """Norms of hidden_in, attn_out, mlp_down_out, hidden_out and their alignment, per layer and step."""
    from actstore import query as q

    run = open_store(store_location, storage_options).run(run_sel)
    df = q.residual_decomposition(run, steps=parse_steps(steps), layers=fit_layers(layers, [run]))
    click.echo(render_frame(df, fmt))


@query.command("discrimination")
@_run_option
@_opt("--source", "sources", multiple=True, help="residual source(s) (default: all four)")
@_opt("--rank-by", type=click.Choice(["separation", "fisher"]), default="separation")
@_opt("--top", type=int, default=None, help="only the N best layers per source")
@_common
@_fail_cleanly
@accept_hook_names
def discrimination_cmd(run_sel: str, sources: tuple[str, ...], rank_by: str, top: int | None, layers: str,
                       fmt: str, store_location: str | None, storage_options: tuple[str, ...]) -> None:  # fmt: skip
    """Rank layers by how well they separate the run's reference states."""
    from actstore import query as q

    run = open_store(store_location, storage_options).run(run_sel)
    df = q.layer_discrimination(
        run, sources=list(sources) or None, layers=fit_layers(layers, [run]), rank_by=rank_by
    )
    if top is not None:
        df = df.groupby("source", sort=False).head(top)
    click.echo(render_frame(df, fmt))


TABLES = ("intra_run_drift", "message_reference", "reference_source", "role_gap")


@query.command("tables")
@_run_option
@_opt("--table", type=click.Choice(["all", *TABLES]), default="all")
@_common
@_fail_cleanly
def tables_cmd(run_sel: str, table: str, layers: str, fmt: str,
               store_location: str | None, storage_options: tuple[str, ...]) -> None:  # fmt: skip
    """The emotion experiment's four tables (drift, message x reference, reference x source, user vs assistant).

    With --table all, table and CSV output give one section per table headed '# NAME';
    JSON gives one object keyed by table name.
    """
    from actstore import query as q

    run = open_store(store_location, storage_options).run(run_sel)
    tables = q.paper_tables(run, layers=fit_layers(layers, [run]))
    chosen = {k: v for k, v in tables.items() if table in ("all", k)}
    if table != "all" and not chosen:
        raise click.ClickException(f"run {run.id} has no {table} table (it needs snapshots and references)")
    if fmt == "json":
        click.echo(
            json.dumps({k: json.loads(v.to_json(orient="records")) for k, v in chosen.items()}, indent=2)
        )
    elif len(chosen) == 1:
        click.echo(render_frame(next(iter(chosen.values())), fmt))
    else:
        click.echo("\n\n".join(f"# {k}\n{render_frame(v, fmt)}" for k, v in chosen.items()))


@query.command("logit-lens")
@_run_option
@_opt("--steps", default="all", help="all or a list like 0,5,-1")
@_opt("--position", type=int, default=-1, help="which of each step's positions (-1: its last)")
@_opt("--top-k", type=int, default=10)
@_opt("--device", default=None, help="override the scenario's device (e.g. cpu)")
@_opt(
    "--json-out",
    type=click.Path(dir_okay=False),
    default=None,
    help="also write the seed's logit_lens.json here",
)
@_common
@_fail_cleanly
def logit_lens_cmd(run_sel: str, steps: str, position: int, top_k: int, device: str | None, json_out: str | None,
                   layers: str, fmt: str, store_location: str | None, storage_options: tuple[str, ...]) -> None:  # fmt: skip
    """Each layer's hidden_out through the final norm and LM head: top tokens and KL(layer || last layer)."""
    from actstore import query as q
    from actstore.models.loading import load_model
    from actstore.query.logit_lens import check_request
    from actstore.scenario import ModelConfig

    run = open_store(store_location, storage_options).run(run_sel)
    picked, chosen = parse_steps(steps), fit_layers(layers, [run])
    check_request(run, picked, position, top_k, chosen)  # before the model loads
    cfg = dict(run.scenario["model"])
    if device is not None:
        cfg["device"] = device
    # ModelConfig satisfies load_model's protocol; mypy sees Literal vs str attributes
    loaded = load_model(ModelConfig(**cfg))  # type: ignore[arg-type]
    df = q.logit_lens(run, loaded, steps=picked, position=position, top_k=top_k, layers=chosen)
    if json_out:
        q.write_logit_lens_json(df, json_out)
    shown = df.assign(
        top=[" ".join(f"{t['token']!r}:{t['logprob']:.2f}" for t in tops[:5]) for tops in df["top"]]
    )
    click.echo(render_frame(shown if fmt != "json" else df, fmt))


# ---- the lab: any states of any runs ---------------------------------------------------
STATES_HELP = (
    "a bare STATE is that state of each run named here (ids, id prefixes, scenario-run ids, "
    "scenario names, latest or all; repeatable); RUN@STATE names its run itself"
)
# groups.ANALYSES, spelled out so the CLI loads without pandas (a test checks they agree)
GROUP_WHAT = ("centroid", "divergence", "pairwise", "linkage", "leaves", "pca", "pca-variance", "spectrum", "cka")
PAIR_WHAT = ("vectors", "summary", "passes", "attention", "scores", "qkv")
DEPTH_WHAT = ("convergence", "effective-depth", "entropy", "head-entropy", "scores", "qkv-last")


def _states_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return _opt("--runs", "runs", multiple=True, default=("latest",), help=STATES_HELP)(fn)


def _jaccard_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = _opt("--magnitude", is_flag=True, help="jaccard ranks by |value| (Activation Lab's ranking)")(fn)
    return _opt("--frac", type=click.FloatRange(0, 1, min_open=True), default=0.01, help="top fraction for jaccard")(fn)


def _resolve(store_location: str | None, storage_options: tuple[str, ...], items: tuple[str, ...],
             runs: tuple[str, ...]) -> list[Any]:  # fmt: skip
    from actstore.query.selection import parse_item, resolve

    for item in items:
        parse_item(item)  # a bad item is reported before the store is opened
    return resolve(open_store(store_location, storage_options), items, runs)


@query.command("pair")
@click.argument("state_a")
@click.argument("state_b")
@_states_option
@_opt("--what", type=click.Choice(PAIR_WHAT), default="vectors",
      help="vectors: per-layer metrics of the two states; summary: per source; passes: their full passes "
           "token by token; attention, scores, qkv: the two maps and their differences")  # fmt: skip
@_opt("--source", "sources", multiple=True,
      help="source(s) (repeatable; default: every residual-stream source both runs captured)")  # fmt: skip
@_opt("--layer", type=int, default=None, help="the layer of an attention or scores map")
@_opt("--head", type=int, default=None, help="one head of an attention or scores map (default: mean over heads)")
@_jaccard_options
@_common
@_fail_cleanly
@accept_hook_names
def pair_cmd(state_a: str, state_b: str, runs: tuple[str, ...], what: str, sources: tuple[str, ...],
             layer: int | None, head: int | None, frac: float, magnitude: bool, layers: str, fmt: str,
             store_location: str | None, storage_options: tuple[str, ...]) -> None:  # fmt: skip
    """Compare two states of any runs (STATE or RUN@STATE): metrics per layer, full passes, or maps."""
    from actstore.query import pairs
    from actstore.query.selection import expect

    a, b = expect(_resolve(store_location, storage_options, (state_a, state_b), runs), 2, "pair")
    chosen = fit_layers(layers, [a.run, b.run])
    srcs = list(sources) or None
    if what in ("vectors", "summary"):
        res = pairs.pair_metrics(a, b, srcs, chosen, frac, magnitude)
        df = res.per_layer if what == "vectors" else res.summary
    elif what == "passes":
        df = pairs.full_pair(a, b, srcs, chosen, frac, magnitude)
    else:
        df = pairs.pair_maps(a, b, what, layer, head, chosen)
    click.echo(render_frame(df, fmt))


@query.command("group")
@click.argument("states", nargs=-1)
@_states_option
@_opt("--what", type=click.Choice(GROUP_WHAT), default="centroid",
      help="centroid: cosine to the group mean; divergence: 1 - mean pair cosine; pairwise: cosine and "
           "jaccard matrices; linkage, leaves: average-linkage dendrogram; pca, pca-variance: one PCA over "
           "every state at every layer; spectrum: singular values per layer; cka: linear CKA of layer stacks")  # fmt: skip
@_opt("--source", "sources", multiple=True,
      help="source(s) (repeatable; default: every residual-stream source all runs captured)")  # fmt: skip
@_opt("--components", type=click.IntRange(1), default=2, help="PCA components")
@_jaccard_options
@_common
@_fail_cleanly
@accept_hook_names
def group_cmd(states: tuple[str, ...], runs: tuple[str, ...], what: str, sources: tuple[str, ...],
              components: int, frac: float, magnitude: bool, layers: str, fmt: str,
              store_location: str | None, storage_options: tuple[str, ...]) -> None:  # fmt: skip
    """Compare two or more states of any runs as a group (STATE or RUN@STATE each)."""
    from actstore.query import groups

    selected = _resolve(store_location, storage_options, states, runs)
    g = groups.group_vectors(selected, list(sources) or None, fit_layers(layers, [s.run for s in selected]))
    click.echo(render_frame(groups.group_table(g, what, frac, magnitude, components), fmt))


@query.command("depth")
@click.argument("state")
@_states_option
@_opt("--what", type=click.Choice(DEPTH_WHAT), default="convergence",
      help="convergence: adjacent-layer cosine and relative update; effective-depth: first layer after "
           "which it stays >= --threshold; entropy, head-entropy: attention entropy per layer (and head); "
           "scores: raw q.k/sqrt(d) of --layer; qkv-last: Activation Lab's (q.k/sqrt(m)) v per layer")  # fmt: skip
@_opt("--source", default="hidden_out", help="the stream convergence follows")
@_opt("--layer", type=int, default=None, help="the layer of a scores map")
@_opt("--head", type=int, default=None, help="one head of a scores map (default: mean over heads)")
@_opt("--threshold", type=float, default=0.99, help="adjacent cosine that counts as converged")
@_common
@_fail_cleanly
@accept_hook_names
def depth_cmd(state: str, runs: tuple[str, ...], what: str, source: str, layer: int | None, head: int | None,
              threshold: float, layers: str, fmt: str, store_location: str | None,
              storage_options: tuple[str, ...]) -> None:  # fmt: skip
    """One state's full pass through depth: convergence, attention entropy, q.k scores, qkv_last."""
    from actstore.query import depth
    from actstore.query.selection import expect

    (sel,) = expect(_resolve(store_location, storage_options, (state,), runs), 1, "depth")
    chosen = fit_layers(layers, [sel.run])
    if what == "convergence":
        df = depth.convergence(sel, source, chosen)
    elif what == "effective-depth":
        df = depth.effective_depth(depth.convergence(sel, source, chosen), threshold)
    elif what in ("entropy", "head-entropy"):
        df = depth.attention_entropy(sel, chosen, per_head=what == "head-entropy")
    elif what == "scores":
        if layer is None:
            from actstore.errors import SelectionError

            raise SelectionError("--what scores is a map of one layer: give --layer")
        df = depth.qk_scores(sel, layer, head)
    else:
        df = depth.qkv_last(sel, chosen)
    click.echo(render_frame(df, fmt))


@query.command("next-token")
@_opt("--runs", "runs", multiple=True, default=("latest",),
      help="run ids, id prefixes, scenario-run ids, scenario names, latest or all (repeatable)")  # fmt: skip
@_opt("--steps", default="all", help="all or a list like 0,5,-1")
@_opt("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table")
@store_options
@_fail_cleanly
def next_token_cmd(runs: tuple[str, ...], steps: str, fmt: str, store_location: str | None,
                   storage_options: tuple[str, ...]) -> None:  # fmt: skip
    """Next-token entropy, effective vocabulary exp(entropy) and top-1 probability per step, from stored logits."""
    from actstore.query.depth import next_token

    readers = open_store(store_location, storage_options).runs(runs)
    click.echo(render_frame(next_token(readers, parse_steps(steps)), fmt))


def register(main: click.Group) -> None:
    """Called by ``actstore.cli`` to add the ``query`` group."""
    main.add_command(query)
