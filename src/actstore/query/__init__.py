"""The lazy query layer: select states, reduce them with metrics, compute once.

>>> from actstore.store.store import ActStore                          # doctest: +SKIP
>>> from actstore import query                                         # doctest: +SKIP
>>> store = ActStore.open("stores/actstore.zarr")                      # doctest: +SKIP
>>> df = query.intra_run(store.runs(["latest"]), layers=[29, 30])      # doctest: +SKIP
>>> query.summarize(df, by=["run", "source"])                          # doctest: +SKIP

Modules, in data-flow order:

* ``metrics``: cosine, mae, jaccard (top-fraction overlap), once for NumPy and Dask;
* ``states``: which vectors (initial, final, step:N, pos:N, snapshot:K, snapshot:generated,
  reference:LABEL) as lazy Dask arrays, one Zarr read per stored array;
* ``plan``: lazy pieces + a finisher, many plans computed in one ``dask.compute``;
* ``compare``: intra-run, inter-run, snapshots vs references, role averages and the
  seed's summary columns, as long DataFrames;
* ``analyses``: cross-layer cosine, neuron trajectory, residual decomposition, layer
  discrimination; ``logit_lens``; ``tables``: the emotion experiment's four tables.

The lab (any states of any runs, Activation Lab's analyses; ``actstore query pair``,
``group``, ``depth`` and ``next-token`` print them):

* ``selection``: ``RUN@STATE`` items resolved to (run, state, label), and a state's
  full pass (a step's positions, a snapshot's or reference's full pass);
* ``pairs``: two states: per-layer metrics, full passes token by token, attention,
  score and qkv maps with their differences;
* ``groups``: two or more states: centroid, divergence, cosine/Jaccard matrices,
  dendrogram, PCA through depth, spectra, CKA;
* ``depth``: one full pass: residual convergence and effective depth, attention
  entropy, q.k scores, qkv_last; per run, the next-token distribution of each step.
"""

from __future__ import annotations

from actstore.query.analyses import (
    cross_layer,
    cross_layer_matrix,
    layer_discrimination,
    neuron_trajectory,
    residual_decomposition,
)
from actstore.query.compare import (
    compare_states,
    inter_run,
    intra_run,
    role_averages,
    snapshots_vs_references,
    summarize,
)
from actstore.query.damaged import skipping_damaged
from actstore.query.depth import (
    attention_entropy,
    convergence,
    effective_depth,
    next_token,
    qk_scores,
    qkv_last,
)
from actstore.query.groups import (
    centroid_cosine,
    cka,
    dendrogram,
    divergence,
    group_vectors,
    pairwise,
    pca,
    spectrum,
)
from actstore.query.logit_lens import logit_lens, write_logit_lens_json
from actstore.query.metrics import cosine, jaccard, mae, norm, top_mask
from actstore.query.pairs import full_pair, pair_maps, pair_metrics
from actstore.query.plan import Plan, compute_plans
from actstore.query.selection import Selected, full_pass, resolve
from actstore.query.states import (
    State,
    as_xarray,
    parse_state,
    parse_state_pair,
    reference_stack,
    select,
    snapshot_stack,
    state_vectors,
)
from actstore.query.tables import paper_tables

__all__ = [
    "skipping_damaged",
    "Plan", "State", "as_xarray", "compare_states", "compute_plans", "cosine", "cross_layer",
    "cross_layer_matrix", "inter_run", "intra_run", "jaccard", "layer_discrimination", "logit_lens",
    "mae", "neuron_trajectory", "norm", "paper_tables", "parse_state", "parse_state_pair",
    "reference_stack", "residual_decomposition", "role_averages", "select", "snapshot_stack",
    "snapshots_vs_references", "state_vectors", "summarize", "top_mask", "write_logit_lens_json",
    # the lab
    "Selected", "attention_entropy", "centroid_cosine", "cka", "convergence", "dendrogram", "divergence",
    "effective_depth", "full_pair", "full_pass", "group_vectors", "next_token", "pair_maps", "pair_metrics",
    "pairwise", "pca", "qk_scores", "qkv_last", "resolve", "spectrum",
]  # fmt: skip
