"""NPZ export and import: the seed's run-directory layout, in and out of a store.

Export (store -> seed directory)::

    RunReader (lazy Dask arrays, derived sources served as if stored)
      --one forward pass at a time: slice positions step_positions(step)-->
    tensors/step_NNN.npz  (layer_NN/<source> (1, T, W), attn_weights (1, heads, T, kv),
                           embeddings / logits (1, T, W))
    + run.json, steps.json, conversation_snapshots/, references/
    written into a temporary sibling directory, renamed into place at the end.

Import (seed directory -> store)::

    run.json + steps.json (validated) --> layers, sources, widths, dtype from step 0
    step_NNN.npz, one at a time --> residual boundaries (hidden_in of l+1 must equal
    hidden_out of l bit for bit), mlp_down_in dropped when it equals what the reader
    derives (else stored explicitly) --> RunWriter (the capture path's writer)
    snapshots / references / tokens / metadata --> catalog entry (commit, written last)

Import also reads the layout Activation Lab writes today (its README describes an older
one): a top-level directory with scenario.json, references/ shared by every prompt and
one prompt_N/ or prompt_N_msgKofM/ per prompt becomes one run per prompt directory, in
order, each answering for the shared references; snapshot and reference NPZs holding
the full prefill (1, T, ...) give their last position (actstore keeps last-token rows).

Both directions hold at most one step's tensors in memory. Store -> NPZ -> store -> NPZ
is lossless: every array is equal bit for bit and the seed's metadata keys are equal.
bfloat16 runs are exported as float32 (NumPy has no bfloat16; the widening is exact and
``run.json["actstore"]["npz_dtype"]`` records it), and imported back to bfloat16 bits.

The code lives in :mod:`actstore.store.npz_export` and :mod:`actstore.store.npz_import`;
this module is the public entry point.
"""

from __future__ import annotations

from actstore.store.npz_export import default_export_dir, export_npz
from actstore.store.npz_import import SeedDir, import_npz, import_npz_dirs, read_seed_dir, read_seed_dirs

__all__ = [
    "SeedDir",
    "default_export_dir",
    "export_npz",
    "import_npz",
    "import_npz_dirs",
    "read_seed_dir",
    "read_seed_dirs",
]
