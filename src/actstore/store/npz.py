"""NPZ export and import: Activation Lab's run directories, in and out of a store.

Two layouts. ``lab`` is what Activation Lab writes today (shared/fixtures/seed-runs hold
real ones; :mod:`actstore.store.npz_lab` documents it): one directory per scenario run
with scenario.json, references/ shared by every prompt and one prompt_N/ or
prompt_N_msgKofM/ per run, whose snapshot and reference NPZs hold the full prefill of
their prefix plus ``qkv_last``. ``readme`` is the older layout its README describes: one
run, snapshot and reference NPZs of last-token vectors. Export writes ``lab`` unless
asked; import reads both.

Export (store -> directory)::

    RunReader (lazy Dask arrays, derived sources served as if stored)
      --one forward pass at a time: slice positions step_positions(step)-->
    tensors/step_NNN.npz  (layer_NN/<source> (1, T, W), attn_weights (1, heads, T, kv),
                           embeddings / logits (1, T, W))
      --lab: one full pass at a time: run.pass_array(kind, key, source)-->
    snapshot_NN_<role>.npz, ref_<label>.npz  (every source but v, (1, T, ...), qkv_last)
    + scenario.json, run.json, steps.json, index files
    written into a temporary sibling directory, renamed into place at the end.

Import (directory -> store)::

    run.json + steps.json (validated) --> layers, sources, widths, dtype from step 0
    step_NNN.npz, one at a time --> residual boundaries (hidden_in of l+1 must equal
    hidden_out of l bit for bit), mlp_down_in dropped when it equals what the reader
    derives (else stored explicitly) --> RunWriter (the capture path's writer)
    full snapshot / reference NPZs, one at a time --> PassLog, whole passes (shared=0)
    + their qkv_last; README-layout vectors --> last-token stacks only
    tokens / metadata --> catalog entry (commit, written last)

Activation Lab's top-level directory becomes one run per prompt directory, in order, one
scenario run; its reference passes are stored once, in the first run.

Both directions hold at most one step's (or one full pass's) tensors in memory. Lab
directory -> store -> lab directory gives back every NPZ member byte for byte and the
same JSON (run.json gains an ``actstore`` block); store -> NPZ -> store keeps every
step array and every full pass's values bit for bit, except v of the passes, which
Activation Lab's files leave out. bfloat16 runs are exported as float32 (NumPy has no
bfloat16; the widening is exact and ``run.json["actstore"]["npz_dtype"]`` records it),
and imported back to bfloat16 bits.

The code lives in :mod:`actstore.store.npz_export`, :mod:`actstore.store.npz_lab` and
:mod:`actstore.store.npz_import`; this module is the public entry point.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from actstore.store.npz_export import LAYOUTS, default_export_dir, export_npz

if TYPE_CHECKING:
    from actstore.store.npz_import import SeedDir, import_npz, import_npz_dirs, read_seed_dir, read_seed_dirs

_IMPORT_SIDE = ("SeedDir", "import_npz", "import_npz_dirs", "read_seed_dir", "read_seed_dirs")


def __getattr__(name: str) -> Any:
    """The import side writes through capture's pass log, which loads torch (3 s of a
    command's start-up here): it is loaded when first asked for, so an export skips it."""
    if name in _IMPORT_SIDE:
        from actstore.store import npz_import

        return getattr(npz_import, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "LAYOUTS",
    "SeedDir",
    "default_export_dir",
    "export_npz",
    "import_npz",
    "import_npz_dirs",
    "read_seed_dir",
    "read_seed_dirs",
]
