"""Write committed runs as run directories (see :mod:`actstore.store.npz`).

Two layouts. ``lab`` (the default) is what Activation Lab writes today: one directory per
scenario run with scenario.json, references/ and one prompt directory per run, whose
snapshot and reference files hold full passes (:mod:`actstore.store.npz_lab`). ``readme``
is the older layout Activation Lab's README describes: one run, snapshots and
references as last-token vectors (this module).

Every source the run serves is exported, derived ones (hidden_in / hidden_out from the
residual boundaries, mlp_down_in from act * up) included, exactly as the reader serves
them. Tensors are read one forward pass at a time through the reader's lazy arrays, so
memory is bounded by one step (or one full pass), and the directory appears only once
it is complete: it is written into a temporary sibling and renamed into place.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import dask
import numpy as np
from tqdm.auto import tqdm

from actstore import __version__, naming
from actstore.errors import BadNameError, StoreError
from actstore.paths import output_folder
from actstore.store import npz_file
from actstore.store.reader import RunReader

# run.json keys the seed defines, in its order.
SEED_RUN_KEYS = ("scenario", "model", "tokenizer", "prompt_token_ids", "prompt_tokens", "env", "created_at")
# steps.json keys the seed defines per step (tensors_file / tensor_index are added per export).
SEED_STEP_KEYS = (
    "step", "kind", "seq_len", "input_token_ids", "input_tokens", "generated_token_id",
    "generated_token", "logit_argmax_id", "logit_argmax_logprob", "top_k",
)  # fmt: skip
# run.json key holding what only actstore knows (run id, dtypes, layer list...).
INFO_KEY = "actstore"


LAYOUTS = ("lab", "readme")


def default_export_dir(
    out: str | os.PathLike[str], runs: RunReader | Sequence[RunReader], layout: str = "lab"
) -> Path:
    """Where ``actstore export npz RUN --out OUT`` writes: ``<out>/<scenario name>_<time>``
    (``lab``: Activation Lab's name for a scenario run's directory), or ``<out>/<run_id>``
    (``readme``)."""
    runs = _as_list(runs)
    if layout == "readme":
        return _dest(Path(out), naming.check_run_id(runs[0].id))
    from actstore.store import npz_lab

    return _dest(Path(out), npz_lab.dir_name(runs))


def _as_list(runs: RunReader | Sequence[RunReader]) -> list[RunReader]:
    return [runs] if isinstance(runs, RunReader) else list(runs)


def _dest(root: Path, rel: str) -> Path:
    """``root / rel``, refused unless it resolves inside ``root``: names come from run
    metadata, which an imported or hand-edited run may have filled with path pieces."""
    path = root / rel
    if not path.resolve().is_relative_to(root.resolve()):
        raise StoreError(f"{path}: resolves outside {root}; refusing to write there (check the run's names)")
    return path


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def export_npz(
    runs: RunReader | Sequence[RunReader],
    out_dir: str | os.PathLike[str],
    *,
    layout: str = "lab",
    quiet: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write runs as a run directory at ``out_dir`` (created; returned).

    ``lab``: the runs of one scenario run (see :func:`actstore.store.npz_lab.scenario_runs`;
    a single run is a scenario run of its own) as Activation Lab's directory. ``readme``:
    one run as the README's run directory.

    The files go to a temporary sibling first and are renamed into place at the end, so
    an export killed half-way leaves no directory that looks complete.
    """
    runs = _as_list(runs)
    if layout not in LAYOUTS:
        raise StoreError(f"unknown layout {layout!r}; use one of {', '.join(LAYOUTS)}")
    if not runs or (layout == "readme" and len(runs) != 1):
        raise StoreError(f"the {layout} layout exports {'one run' if layout == 'readme' else 'at least one run'}, "
                         f"not {len(runs)}")  # fmt: skip
    target = Path(out_dir)
    if target.exists() and not overwrite:
        raise StoreError(f"{target}: already exists (remove it, choose another --out, or overwrite)")
    for run in runs:
        _check_names(run)  # before anything is created
    if layout == "lab":
        from actstore.store import npz_lab

        npz_lab.check(runs)
        write = functools.partial(npz_lab.write_dir, runs, quiet=quiet)
    else:
        write = functools.partial(_write_run_dir, runs[0], quiet=quiet)
    with output_folder(target.parent) as parent:  # a full disk: one line naming --out
        _write_via_temp(write, target, parent)
    return target


def _write_via_temp(write: Callable[[Path], None], target: Path, parent: Path) -> None:
    tmp: Path | None = None
    old: Path | None = None
    try:
        tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{target.name}.partial-"))
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it 0700; the rename would keep that
        write(tmp)
        if target.exists():  # overwrite: move the old one aside first, drop it after
            old = Path(tempfile.mkdtemp(dir=parent, prefix=f".{target.name}.old-"))
            os.replace(target, old / target.name)
        os.replace(tmp, target)
    except BaseException:  # an interrupt (SIGTERM included, see cli/common.py) lands here too
        if old is not None and not target.exists() and (old / target.name).exists():
            os.replace(old / target.name, target)  # interrupted between the renames: undo
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _check_names(run: RunReader) -> None:
    """Roles and labels become file names: the naming rule capture and import apply."""
    try:
        for i, snap in enumerate(run.snapshot_index):
            index = snap.get("index")
            if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < 10**6:
                raise StoreError(f"run {run.id}: snapshots[{i}].index {index!r} is not a number 0 to 999999")
            naming.check_name(snap.get("role"), f"snapshots[{i}].role", f"run {run.id}")
        for i, label in enumerate(run.reference_labels):
            naming.check_name(label, f"references[{i}]", f"run {run.id}")
    except BadNameError as e:
        raise StoreError(f"{e}; this run cannot be exported as files") from None


# Consecutive steps are read in one compute, up to this many bytes of values: a decode
# step is one position, so read alone each re-decoded the inner chunks its neighbours
# share and paid for a graph and a compute of its own.
WINDOW_BYTES = 64 * 2**20


def _windows(run: RunReader, steps: list[int], arrays: dict[str, Any]) -> list[list[int]]:
    """``steps`` in groups of consecutive steps, each group's values within WINDOW_BYTES
    (a step bigger than that is a group alone)."""
    per_position = 0
    for x in arrays.values():
        row = math.prod(x.shape[:-2]) * x.shape[-1] if x.ndim >= 3 else x.shape[-1]  # attention: every key
        per_position += row * x.dtype.itemsize
    groups: list[list[int]] = []
    size = 0
    for step in steps:
        cost = len(run.step_positions(step)) * per_position
        if not groups or step != groups[-1][-1] + 1 or size + cost > WINDOW_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(step)
        size += cost
    return groups


def step_tensors(run: RunReader, steps: list[int]) -> Iterator[dict[str, np.ndarray]]:
    """The seed's NPZ arrays of each forward pass of ``steps``, in order, keyed
    ``layer_NN/<source>`` / global name."""
    arrays = {source: run.array(source, dense=True) for source in run.sources}
    for group in _windows(run, steps, arrays):
        a, b = run.step_positions(group[0]).start, run.step_positions(group[-1]).stop
        lazy: dict[str, Any] = {}
        for source, x in arrays.items():
            if source == "attn_weights":
                lazy[source] = x[:, :, a:b, :b]
            elif source in naming.GLOBAL_SOURCES:
                lazy[source] = x[a:b]
            else:
                lazy[source] = x[:, a:b]
        # One compute: hidden_in / hidden_out / mlp_down_in share chunks, read them once.
        window = dict(zip(lazy, dask.compute(*lazy.values()), strict=True))
        for step in group:
            pos = run.step_positions(step)
            p0, p1 = pos.start - a, pos.stop - a
            out: dict[str, np.ndarray] = {}
            for i, layer in enumerate(run.layers):
                for source in naming.LAYER_SOURCES:
                    if source == "attn_weights" and source in window:  # kv_len = last position + 1, as the seed
                        out[naming.npz_key(layer, source)] = np.ascontiguousarray(
                            window[source][i, :, p0:p1, : pos.stop]
                        )[None]
                    elif source in window:
                        out[naming.npz_key(layer, source)] = np.ascontiguousarray(window[source][i, p0:p1])[None]
            for source in naming.GLOBAL_SOURCES:
                if source in window:
                    out[naming.npz_key(None, source)] = np.ascontiguousarray(window[source][p0:p1])[None]
            yield out


def _write_run_dir(run: RunReader, root: Path, *, quiet: bool) -> None:
    """The README layout: one run's directory."""
    meta = run.meta
    snapshots = run.snapshot_index
    labels = run.reference_labels
    bar = tqdm(
        total=run.n_steps + len(snapshots) + len(labels),
        desc=f"export {run.id}",
        unit="file",
        disable=quiet or not sys.stderr.isatty(),
        file=sys.stderr,
    )
    try:
        (root / "tensors").mkdir()
        steps_out = []
        npz_dtype = None
        numbers = [int(s["step"]) for s in run.steps]
        for step_meta, step, arrays in zip(run.steps, numbers, step_tensors(run, numbers), strict=True):
            rel = naming.step_file(step)
            npz_file.save_npz(_dest(root, rel), arrays)
            entry = {k: step_meta.get(k) for k in SEED_STEP_KEYS}
            entry["top_k"] = entry["top_k"] or []
            # Extra keys (e.g. positions) ride along: the seed's readers ignore them.
            entry.update({k: v for k, v in step_meta.items() if k not in entry})
            entry["tensors_file"] = rel
            entry["tensor_index"] = {
                k: {"shape": list(a.shape), "dtype": str(a.dtype)} for k, a in arrays.items()
            }
            npz_dtype = npz_dtype or next((str(a.dtype) for a in arrays.values()), None)
            steps_out.append(entry)
            bar.update()
        _write_json(root / "steps.json", {"steps": steps_out})
        _write_stacked(run, root, "snapshots", [(s["index"], s["role"]) for s in snapshots], bar)
        if snapshots:
            # generated (Activation Lab's flag for the reply appended as an assistant turn)
            # only where the run records it: runs from before it, or README-layout imports, have none.
            index = [
                {k: s.get(k) for k in ("index", "role", "content_preview")}
                | ({"generated": s["generated"]} if "generated" in s else {})
                for s in snapshots
            ]
            _write_json(root / "conversation_snapshots" / "index.json", index)
        _write_stacked(run, root, "references", [(label, None) for label in labels], bar)
        if labels:
            _write_json(root / "references" / "index.json", {"labels": labels})
        _write_json(root / "run.json", _run_json(run, meta, npz_dtype))
    finally:
        bar.close()


def _write_stacked(
    run: RunReader, root: Path, what: str, rows: list[tuple[Any, str | None]], bar: Any
) -> None:
    """One NPZ per snapshot / reference row: ``layer_NN/<source>`` (H,) per residual source."""
    if not rows:
        return
    stacked = {}
    for source in naming.RESIDUAL_SOURCES:
        path = (naming.snapshot_path if what == "snapshots" else naming.reference_path)(source)
        if path in run.group:  # a run captured without a source simply has no file key
            x = run.snapshots(source) if what == "snapshots" else run.references(source)
            stacked[source] = np.asarray(x.compute())  # (rows, L, H): small
    if not stacked:
        return
    for r, (name, role) in enumerate(rows):
        rel = (
            naming.snapshot_file(int(name), str(role)) if what == "snapshots" else naming.reference_file(name)
        )
        arrays = {
            naming.npz_key(layer, source): np.ascontiguousarray(data[r, i])
            for i, layer in enumerate(run.layers)
            for source, data in stacked.items()
        }
        dest = _dest(root, rel)
        dest.parent.mkdir(exist_ok=True)
        npz_file.save_npz(dest, arrays)
        bar.update()


def _run_json(run: RunReader, meta: dict[str, Any], npz_dtype: str | None) -> dict[str, Any]:
    out: dict[str, Any] = {k: meta.get(k) for k in SEED_RUN_KEYS}
    out["generated_text"] = meta.get("generated_text", "")
    store_dtype = meta.get("store_dtype")
    out[INFO_KEY] = {
        "run_id": run.id,
        "exported_by": f"actstore {__version__}",
        "store_dtype": store_dtype,
        # bfloat16 has no NumPy dtype: its values are widened to float32 exactly.
        "npz_dtype": npz_dtype or ("float32" if store_dtype == "bfloat16" else store_dtype),
        "layers": run.layers,
        "sources": list(run.sources),
        "gated_mlp": meta.get("gated_mlp"),
        "prompt_len": run.prompt_len,
        "n_positions": run.n_positions,
        # which capture of a scenario file the run came from, so an import keeps it
        "scenario_run": meta.get("scenario_run"),
        "prompt_index": meta.get("prompt_index"),
        "message_prefix": meta.get("message_prefix"),
    }
    return out


def _write_json(path: Path, data: Any) -> None:
    # The paths are fixed names under the export folder (steps.json, */index.json).
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
