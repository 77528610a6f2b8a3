"""Every refusal of `import npz`, one case each, its whole message checked word for word.

The import's checks raise StoreError at some eighty places in ``npz_import`` and
``npz_schema``. Each case below breaks one thing in a valid run directory (the hand-made
README layout, or a copy of Activation Lab's real fixtures) and gives the one line the
researcher must see: the file, the field, what is wrong and, where there is one, the fix.
``test_every_refusal_has_a_case`` reads both modules and fails when a ``raise
StoreError`` has no case here (or no reason under ``NOT_FROM_A_DIRECTORY``), so a new check
arrives with the message it gives. Each case also checks that its error came from the
place it claims, so two checks with similar words cannot stand in for each other.
"""

from __future__ import annotations

import ast
import io
import os
import re
import shutil
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_hostile_import import _edit_json
from test_hostile_import import _npz as _arrays
from test_npz import make_seed_dir
from test_seed_fixtures import MULTI, SINGLE, _copy, _rewrite_npz

from actstore.errors import StoreError
from actstore.store import npz_import, npz_schema
from actstore.store.npz import import_npz_dirs, read_seed_dirs
from actstore.store.store import ActStore

MODULES = (npz_import, npz_schema)


# ---------------------------------------------------------------------- editing helpers


def _steps(fn: Callable[[list[dict[str, Any]]], Any]) -> Callable[[Path], None]:
    return lambda d: _edit_json(d / "steps.json", lambda x: fn(x["steps"]))


def _snaps(fn: Callable[[list[dict[str, Any]]], Any]) -> Callable[[Path], None]:
    return lambda d: _edit_json(d / "conversation_snapshots/index.json", fn)


def _npz(rel: str, fn: Callable[[dict[str, np.ndarray]], Any]) -> Callable[[Path], None]:
    return lambda d: _rewrite_npz(d / rel, fn)


def _write(rel: str, text: str) -> Callable[[Path], None]:
    return lambda d: (d / rel).write_text(text)


def _grow(rel: str, size: int) -> Callable[[Path], None]:
    """The file reports ``size`` bytes (sparse: nothing is written)."""
    return lambda d: os.truncate(d / rel, size)


def _zip(rel: str, members: dict[str, bytes]) -> Callable[[Path], None]:
    """Rewrite an NPZ keeping its arrays and adding (or replacing) raw members."""

    def breaks(d: Path) -> None:
        arrays = _arrays(d / rel)
        with zipfile.ZipFile(d / rel, "w", zipfile.ZIP_DEFLATED) as z:
            for key, arr in arrays.items():
                if key + ".npy" not in members:
                    with z.open(key + ".npy", "w") as f:
                        np.lib.format.write_array(f, arr)
            for name, data in members.items():
                z.writestr(name, data)

    return breaks


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, arr)
    return buf.getvalue()


def _forged(shape: tuple[int, ...]) -> bytes:
    """A float16 .npy member whose header declares ``shape`` over 16 bytes of data."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f2", "fortran_order": False, "shape": shape})
    return buf.getvalue() + bytes(16)


def _resolve_error(path: Path) -> str:
    """What this Python says when resolving ``path`` fails (its words differ by version)."""
    try:
        path.resolve(strict=True)
    except (OSError, RuntimeError) as e:
        return str(e)
    raise AssertionError(f"{path} resolves")


def _both(*fns: Callable[[Path], Any]) -> Callable[[Path], None]:
    def breaks(d: Path) -> None:
        for fn in fns:
            fn(d)

    return breaks


def _set(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda x: x.update({key: value})


def _drop(*keys: str) -> Callable[[dict[str, np.ndarray]], None]:
    def fn(a: dict[str, np.ndarray]) -> None:
        for k in keys:
            del a[k]

    return fn


def _layer_0_only(a: dict[str, np.ndarray]) -> None:
    for k in [k for k in a if k.startswith("layer_01/")]:
        del a[k]


def _corrupt_member(rel: str, key: str) -> Callable[[Path], None]:
    """Store the NPZ uncompressed and flip a byte of one member's data: its header still
    reads, its CRC no longer matches."""

    def breaks(d: Path) -> None:
        arrays = _arrays(d / rel)
        np.savez(d / rel, **arrays)
        with zipfile.ZipFile(d / rel) as z:
            info = z.getinfo(key + ".npy")
        raw = bytearray((d / rel).read_bytes())
        header = 30 + len(info.filename.encode()) + len(info.extra)
        raw[info.header_offset + header + info.file_size - 1] ^= 0xFF
        (d / rel).write_bytes(bytes(raw))

    return breaks


# ---------------------------------------------------------------------- the cases


@dataclass(frozen=True)
class Case:
    base: str  # "readme", "readme_bf16", "readme_resid", "single", "multi"
    site: str  # the function whose check refuses it
    breaks: Callable[[Path], Any]
    message: str  # the whole line; {d} is the directory, {ids} the runs already imported
    # "read": read_seed_dirs refuses; "write": refused while writing; "changed": broken
    # after read_seed_dirs checked it, as a directory still being written can be
    stage: str = "read"
    max_bytes: int | None = None
    fill: Callable[[Path], dict[str, str]] = lambda d: {}  # more {names}, read from the broken files


P0 = "{d}/prompt_0"  # the single fixture's one prompt directory
SNAP_INDEX = "conversation_snapshots/index.json"
STEP1 = "tensors/step_001.npz"
F16 = np.float16

CASES: dict[str, Case] = {
    # ---- Activation Lab's top-level directory (npz_import.read_seed_dirs)
    "scenario_too_large": Case(
        "multi", "read_seed_dirs", _grow("scenario.json", (1 << 20) + 1),
        "{d}/scenario.json: larger than 1 MiB, too large for a scenario",
    ),
    "scenario_not_object": Case(
        "multi", "read_seed_dirs", _write("scenario.json", "[]"),
        "{d}/scenario.json: expected a JSON object (the scenario)",
    ),
    "message_out_of_range": Case(
        "multi", "read_seed_dirs", lambda d: (d / "prompt_1_msg2of2").rename(d / "prompt_1_msg3of2"),
        "{d}/prompt_1_msg3of2: message 3 of 2 is out of range (rename it)",
    ),
    "prompt_dir_is_a_file": Case(
        "multi", "read_seed_dirs", _write("prompt_7", "x"),
        "{d}/prompt_7: not a directory (a prompt directory holds run.json, steps.json, ...)",
    ),
    "no_prompt_dirs": Case(
        "multi", "read_seed_dirs", lambda d: [shutil.rmtree(p) for p in d.glob("prompt_*")],
        "{d}: holds scenario.json but no prompt_N/ directory (pass an Activation Lab run directory, "
        "or a directory holding run.json and steps.json)",
    ),
    "same_prompt_twice": Case(
        "single", "read_seed_dirs", lambda d: shutil.copytree(d / "prompt_0", d / "prompt_00"),
        "{d}/prompt_0: another directory has the same prompt and message number (remove one)",
    ),
    # ---- one run directory (npz_import.read_seed_dir)
    "not_a_directory": Case(
        "readme", "read_seed_dir", lambda d: shutil.rmtree(d),
        "{d}: not a directory (pass a run directory holding run.json and steps.json)",
    ),
    "run_json_not_object": Case(
        "readme", "read_seed_dir", _write("run.json", "[1]"),
        "{d}/run.json: expected a JSON object with scenario, model, ...",
    ),
    "scenario_without_name": Case(
        "readme", "read_seed_dir", lambda d: _edit_json(d / "run.json", lambda x: x["scenario"].pop("name")),
        "{d}/run.json: 'scenario' must be an object with a 'name'",
    ),
    "actstore_info_not_object": Case(
        "readme", "read_seed_dir", lambda d: _edit_json(d / "run.json", _set("actstore", [1])),
        "{d}/run.json: 'actstore' must be an object",
    ),
    "memory_bound": Case(
        "readme", "read_seed_dir", lambda d: None,
        "{d}/tensors/step_000.npz: importing this run needs about 0.00 GiB of memory at once "
        "(5 prompt tokens, 2 layers), more than the 0.00 GiB allowed (half this machine's memory); "
        "import it on a larger machine",
        max_bytes=100,
    ),
    # ---- snapshots (npz_import._check_snapshots, _tokens, _spell, _same_form)
    "snapshot_index_not_list": Case(
        "readme", "_check_snapshots", _write(SNAP_INDEX, '{"x": 1}'),
        '{d}/conversation_snapshots/index.json: expected a list (or {"snapshots": [...]}) '
        "of {index, role, content_preview}",
    ),
    "snapshot_index_out_of_range": Case(
        "readme", "_check_snapshots", _snaps(lambda x: x[0].update(index=10**6)),
        "{d}/conversation_snapshots/index.json: [0].index 1000000 is out of range (0 to 999999)",
    ),
    "snapshot_index_twice": Case(
        "readme", "_check_snapshots", _snaps(lambda x: x[1].update(index=0)),
        "{d}/conversation_snapshots/index.json: [1].index 0 is listed twice (indices must be unique)",
    ),
    "snapshot_generated_not_bool": Case(
        "readme", "_check_snapshots", _snaps(lambda x: x[1].update(generated="yes")),
        "{d}/conversation_snapshots/index.json: [1].generated must be true or false, got 'yes'",
    ),
    "snapshot_tensors_file_not_str": Case(
        "readme", "_check_snapshots", _snaps(lambda x: x[0].update(tensors_file=5)),
        "{d}/conversation_snapshots/index.json: [0].tensors_file must be a file name",
    ),
    "snapshot_token_ids_short": Case(
        "single", "_tokens",
        lambda d: _edit_json(d / "prompt_0" / SNAP_INDEX,
                             lambda x: x["snapshots"][1].update(input_token_ids=x["snapshots"][1]["input_token_ids"][1:])),
        P0 + "/conversation_snapshots/index.json: [1].input_token_ids must be 22 token ids, "
        "one per position of its file",
    ),  # fmt: skip
    "snapshot_tokens_short": Case(
        "single", "_spell",
        lambda d: _edit_json(d / "prompt_0" / SNAP_INDEX,
                             lambda x: x["snapshots"][1].update(input_tokens=x["snapshots"][1]["input_tokens"][1:])),
        P0 + "/conversation_snapshots/index.json: [1].input_tokens must be 22 strings, one per input_token_ids",
    ),  # fmt: skip
    "snapshot_two_spellings": Case(
        "single", "_spell",
        lambda d: _edit_json(d / "prompt_0" / SNAP_INDEX,
                             lambda x: x["snapshots"][1]["input_tokens"].__setitem__(0, "<start>")),
        P0 + "/conversation_snapshots/index.json: [1].input_tokens spells token 1 '<start>', "
        "another snapshot '<|im_start|>' (one spelling per token id is kept)",
    ),  # fmt: skip
    "snapshots_full_and_vectors": Case(
        "readme", "_same_form",
        lambda d: shutil.copy(d / "tensors/step_000.npz", d / "conversation_snapshots/snapshot_01_assistant.npz"),
        "{d}/conversation_snapshots/index.json: some files hold a full prefill, others vectors (all must be alike)",
    ),
    "snapshot_vector_wrong_width": Case(
        "readme", "Schema._check_vectors",
        _npz("conversation_snapshots/snapshot_00_user.npz", lambda a: a.update({"layer_01/attn_out": np.zeros(9, F16)})),
        "{d}/conversation_snapshots/snapshot_00_user.npz: layer_01/attn_out is float16 [9]; expected a "
        "float16/float32 vector of the run's hidden size [8] or a prefill [1, tokens, 8]",
    ),
    # ---- references (npz_import._check_references)
    "labels_not_list": Case(
        "readme", "_check_references", _write("references/index.json", '{"labels": "calm"}'),
        '{d}/references/index.json: expected {"labels": [...]}',
    ),
    "label_twice": Case(
        "readme", "_check_references", _write("references/index.json", '{"labels": ["calm", "calm"]}'),
        "{d}/references/index.json: labels[1] 'calm' is listed twice (labels must be unique)",
    ),
    "references_without_index": Case(
        "readme", "_index", lambda d: (d / "references/index.json").unlink(),
        "{d}/references: 1 .npz file(s) (ref_calm.npz, ...) but no index.json to list them "
        "(the import would leave them out; add index.json)",
    ),
    "reference_token_ids_unmatched": Case(
        "readme", "_check_references",
        _write("references/index.json", '{"labels": ["calm"], "input_token_ids": {"joy": [1]}}'),
        "{d}/references/index.json: input_token_ids must map every label to its token ids",
    ),
    "label_with_colon": Case(
        "readme", "check_name", _write("references/index.json", '{"labels": ["a:b"]}'),
        "{d}/references/index.json: labels[0] 'a:b' must not contain ':' "
        "(--compare reference:LABEL could not name it) (use e.g. a_b)",
    ),
    # ---- paths (npz_schema.inside)
    "tensors_file_empty": Case(
        "readme", "inside", _steps(lambda s: s[1].update(tensors_file="")),
        "{d}/steps.json: steps[1]: tensors_file must be a relative path, got ''",
    ),
    "tensors_file_absolute": Case(
        "readme", "inside", _steps(lambda s: s[1].update(tensors_file="/etc/passwd")),
        "{d}/steps.json: steps[1]: tensors_file '/etc/passwd' is an absolute path "
        "(import reads only inside {d}; give a path relative to it)",
    ),
    "tensors_file_dotdot": Case(
        "readme", "inside", _steps(lambda s: s[1].update(tensors_file="../x.npz")),
        "{d}/steps.json: steps[1]: tensors_file '../x.npz': '..' must start with a letter or digit "
        "(use a path inside the run directory, e.g. tensors/step_000.npz)",
    ),
    "tensors_file_not_found": Case(
        "readme", "inside", _steps(lambda s: s[1].update(tensors_file="tensors/nope.npz")),
        "{d}/steps.json: steps[1]: tensors_file 'tensors/nope.npz' not found in {d}",
    ),
    "tensors_file_link_loop": Case(
        "readme", "inside",
        _both(_steps(lambda s: s[1].update(tensors_file="tensors/loop.npz")),
              lambda d: (d / "tensors/loop.npz").symlink_to("loop.npz")),
        "{d}/steps.json: steps[1]: tensors_file 'tensors/loop.npz' cannot be resolved "
        "({why})",
        fill=lambda d: {"why": _resolve_error(d / "tensors/loop.npz")},
    ),  # fmt: skip
    "tensors_file_outside": Case(
        "readme", "inside",
        _both(lambda d: shutil.move(d / STEP1, d.parent / "stolen.npz"),
              lambda d: (d / STEP1).symlink_to(d.parent / "stolen.npz")),
        "{d}/steps.json: steps[1]: tensors_file 'tensors/step_001.npz' resolves to {stolen}, "
        "outside {d} (import reads only inside the run directory; copy the file in)",
        fill=lambda d: {"stolen": str(d.parent / "stolen.npz")},
    ),  # fmt: skip
    "tensors_file_is_a_folder": Case(
        "readme", "inside", _steps(lambda s: s[1].update(tensors_file="tensors")),
        "{d}/steps.json: steps[1]: tensors_file 'tensors' is not a regular file",
    ),
    "run_json_missing": Case(
        "readme", "run_file", lambda d: (d / "run.json").unlink(),
        "{d}/run.json: missing (is {d} a run directory?)",
    ),
    # ---- NPZ files (npz_schema.npz_members, open_npz, load_member)
    "member_not_npy": Case(
        "readme", "npz_members", _zip(STEP1, {"notes.txt": b"hello"}),
        "{d}/tensors/step_001.npz: member 'notes.txt' is not a .npy array",
    ),
    "member_bad_magic": Case(
        "readme", "npz_members", _zip(STEP1, {"layer_00/q.npy": b"garbage header"}),
        "{d}/tensors/step_001.npz: layer_00/q: not a readable .npy array (the magic string is not correct; "
        "expected b'\\x93NUMPY', got b'garbag'; re-export it)",
    ),
    "member_pickled": Case(
        "readme", "npz_members", _zip(STEP1, {"layer_00/q.npy": _npy(np.array([{}], dtype=object))}),
        "{d}/tensors/step_001.npz: layer_00/q: dtype object holds Python objects or records; "
        "actstore never unpickles (store float16 or float32 arrays)",
    ),
    "member_negative_shape": Case(
        "readme", "npz_members",
        _zip(STEP1, {"layer_00/q.npy": _forged((1, -1, 8))}),
        "{d}/tensors/step_001.npz: layer_00/q: negative shape [1, -1, 8]",
    ),  # fmt: skip
    "member_header_lies": Case(
        "readme", "npz_members",
        _zip(STEP1, {"layer_00/q.npy": _forged((1, 1, 1000))}),
        "{d}/tensors/step_001.npz: layer_00/q: the zip entry declares 144 bytes, but its header "
        "describes 2128 (a damaged or forged NPZ; re-export it)",
    ),  # fmt: skip
    "member_zip_bomb": Case(
        "readme", "npz_members",
        _zip(STEP1, {"layer_00/q.npy": _npy(np.zeros((1, 1, (8 << 20) + 8), F16))}),
        "{d}/tensors/step_001.npz: layer_00/q: {compressed} compressed bytes claim to expand to 0.02 GiB "
        "(more than 100x: a zip bomb, not activations); refused",
        fill=lambda d: {"compressed": str(zipfile.ZipFile(d / STEP1).getinfo("layer_00/q.npy").compress_size)},
    ),  # fmt: skip
    "step_file_not_zip": Case(
        "readme", "npz_members", _write(STEP1, "not a zip"),
        "{d}/tensors/step_001.npz: not a readable NPZ file (File is not a zip file)",
    ),
    "member_header_corrupt": Case(
        "readme", "npz_members", _corrupt_member(STEP1, "layer_00/q"),
        "{d}/tensors/step_001.npz: layer_00/q: not a readable .npy array (Bad CRC-32 for file "
        "'layer_00/q.npy'; re-export it)",
    ),  # a small member: reading its header reads it all, CRC included
    "member_data_corrupt": Case(
        "single", "load_member", _corrupt_member("prompt_0/tensors/step_000.npz", "layer_29/mlp_up"),
        P0 + "/tensors/step_000.npz: cannot read 'layer_29/mlp_up' (Bad CRC-32 for file 'layer_29/mlp_up.npy')",
        stage="write",
    ),  # 34 x 1536 values: the header is read long before the end, where the CRC is checked
    # ---- JSON files (npz_schema.read_json)
    "steps_json_too_large": Case(
        "readme", "read_json", _grow("steps.json", (256 << 20) + 1),
        "{d}/steps.json: larger than 256 MiB, too large for run metadata",
    ),
    "steps_json_missing": Case(
        "readme", "run_file", lambda d: (d / "steps.json").unlink(),
        "{d}/steps.json: missing (is {d} a run directory?)",
    ),
    "steps_json_invalid": Case(
        "readme", "read_json", _write("steps.json", "{"),
        "{d}/steps.json: not valid JSON: Expecting property name enclosed in double quotes: line 1 column 2 (char 1)",
    ),
    # ---- steps.json (npz_schema.read_steps)
    "steps_empty": Case(
        "readme", "read_steps", _write("steps.json", '{"steps": []}'),
        '{d}/steps.json: expected {"steps": [...]} with at least one step',
    ),
    "step_not_object": Case(
        "readme", "read_steps", _steps(lambda s: s.__setitem__(1, 5)),
        "{d}/steps.json: steps[1]: expected an object",
    ),
    "step_number_wrong": Case(
        "readme", "read_steps", _steps(lambda s: s[1].update(step=5)),
        "{d}/steps.json: steps[1]: 'step' is 5, expected 1 (steps must be 0..n-1 in order)",
    ),
    "step_without_tokens": Case(
        "readme", "read_steps", _steps(lambda s: s[1].update(input_token_ids=[])),
        "{d}/steps.json: steps[1]: 'input_token_ids' must be a non-empty list of integers",
    ),
    "decode_step_two_tokens": Case(
        "readme", "read_steps", _steps(lambda s: s[1].update(input_token_ids=[1, 2])),
        "{d}/steps.json: steps[1]: a decode step feeds one token, not 2",
    ),
    "decode_seq_len": Case(
        "readme", "read_steps", _steps(lambda s: s[1].update(seq_len=4)),
        "{d}/steps.json: steps[1]: seq_len 4 must be 1 or 7 (the tokens fed, or the prompt plus "
        "tokens so far as Activation Lab counts them)",
    ),
    "step_kind": Case(
        "readme", "read_steps", _steps(lambda s: s[0].update(kind="decode")),
        "{d}/steps.json: steps[0]: kind 'decode', expected 'prefill'",
    ),
    # ---- dtypes (npz_schema.npz_store_dtype, to_store)
    "integer_tensors": Case(
        "readme", "npz_store_dtype",
        _npz("tensors/step_000.npz", lambda a: a.update({k: v.astype(np.int32) for k, v in a.items()})),
        "{d}/tensors/step_000.npz: layer_00/hidden_in: dtype int32 is not a store dtype "
        "(float16, float32, bfloat16 as float32)",
    ),
    "snapshot_vectors_of_two_dtypes": Case(
        "readme", "to_store",
        _npz("conversation_snapshots/snapshot_01_assistant.npz",
             lambda a: a.update({k: v.astype(np.float32) for k, v in a.items()})),
        "{d}/conversation_snapshots/snapshot_01_assistant.npz: hidden_in: dtype float32, "
        "but this run's tensors are float16",
        stage="write",
    ),  # fmt: skip
    "bfloat16_with_low_bits": Case(
        "readme_bf16", "to_store",
        _npz(STEP1, lambda a: a["layer_00/q"].view(np.uint32).__setitem__((0, 0, 0), 0x3F800001)),
        "{d}/tensors/step_001.npz: layer_00/q: float32 values are not bfloat16 values; the import would lose bits",
        stage="write",
    ),
    # ---- step 0 fixes the schema (npz_schema.Schema.from_step0)
    "unexpected_key": Case(
        "readme", "Schema.from_step0", _npz("tensors/step_000.npz", lambda a: a.update(notes=np.zeros(3, F16))),
        "{d}/tensors/step_000.npz: unexpected key 'notes' (not layer_NN/<source> or a global source)",
    ),
    "member_two_dims": Case(
        "readme", "Schema.from_step0",
        _npz("tensors/step_000.npz", lambda a: a.update({"layer_00/q": a["layer_00/q"][0]})),
        "{d}/tensors/step_000.npz: layer_00/q has shape [5, 8], expected (1, tokens, width)",
    ),
    "step0_empty": Case(
        "readme", "Schema.from_step0", lambda d: np.savez(d / "tensors/step_000.npz"),
        "{d}/tensors/step_000.npz: holds no tensors",
    ),
    "source_missing_a_layer": Case(
        "readme", "Schema.from_step0", _npz("tensors/step_000.npz", _drop("layer_01/q")),
        "{d}/tensors/step_000.npz: q is missing for layer(s) [1] (every source needs every layer)",
    ),
    "only_hidden_in": Case(
        "readme", "Schema.from_step0", _npz("tensors/step_000.npz", _drop("layer_00/hidden_out", "layer_01/hidden_out")),
        "{d}/tensors/step_000.npz: has only one of hidden_in / hidden_out; the residual stream needs both",
    ),
    # ---- later steps against step 0 (npz_schema.Schema.check_members)
    "step_extra_key": Case(
        "readme", "Schema.check_members", _npz(STEP1, lambda a: a.update(logits2=a["logits"])),
        "{d}/tensors/step_001.npz: keys ['logits2'] are not in step 0 (every step must hold the same keys)",
    ),
    "step_missing_key": Case(
        "readme", "Schema.check_members", _npz(STEP1, _drop("layer_01/mlp_up")),
        "{d}/tensors/step_001.npz: missing key 'layer_01/mlp_up' (every step must hold the keys of step 0)",
    ),
    "step_member_wrong_shape": Case(
        "readme", "Schema.check_members", _npz(STEP1, lambda a: a.update({"layer_00/k": a["layer_00/k"][..., :3]})),
        "{d}/tensors/step_001.npz: layer_00/k has shape [1, 1, 3], expected [1, 1, 4] "
        "(steps.json: step 1 feeds 1 token)",
    ),
    "step_member_wrong_dtype": Case(
        "readme", "Schema.check_members",
        _npz(STEP1, lambda a: a.update({"logits": a["logits"].astype(np.float32)})),
        "{d}/tensors/step_001.npz: logits: dtype float32, but this run's tensors are float16",
    ),
    # ---- full snapshot and reference passes (npz_schema.Schema.check_pass)
    "pass_extra_key": Case(
        "single", "Schema.check_pass",
        _npz("prompt_0/conversation_snapshots/snapshot_01_user.npz", lambda a: a.update(notes=np.zeros(3, np.float32))),
        P0 + "/conversation_snapshots/snapshot_01_user.npz: keys ['notes'] are neither activations nor "
        "qkv_last (nothing else is kept)",
    ),
    "pass_missing_and_foreign_keys": Case(
        "single", "Schema.check_pass",
        _npz("prompt_0/conversation_snapshots/snapshot_01_user.npz",
             lambda a: a.update({"layer_05/hidden_in": a.pop("layer_29/hidden_in")})),
        P0 + "/conversation_snapshots/snapshot_01_user.npz: a full pass holds the step tensors' keys "
        "(v optional); missing ['layer_29/hidden_in']; not in the steps ['layer_05/hidden_in']",
    ),  # fmt: skip
    "pass_member_short": Case(
        "single", "Schema.check_pass",
        _npz("references/ref_joy.npz", lambda a: a.update({"layer_29/q": a["layer_29/q"][:, :-1]})),
        "{d}/references/ref_joy.npz: layer_29/q has shape [1, 32, 576], expected [1, 33, 576]",
    ),
    "pass_member_float32": Case(
        "single", "Schema.check_pass",
        _npz("references/ref_joy.npz", lambda a: a.update({"layer_29/q": a["layer_29/q"].astype(np.float32)})),
        "{d}/references/ref_joy.npz: layer_29/q: dtype float32, but this run's tensors are float16",
    ),
    "pass_seq_len": Case(
        "single", "Schema.check_pass",
        lambda d: _edit_json(d / "prompt_0" / SNAP_INDEX, lambda x: x["snapshots"][1].update(seq_len=7)),
        P0 + "/conversation_snapshots/snapshot_01_user.npz: holds 22 tokens, but its index gives seq_len 7 "
        "(fix seq_len in index.json or replace the file)",
    ),
    "pass_qkv_last_rows": Case(
        "single", "Schema.check_pass",
        _npz("prompt_0/conversation_snapshots/snapshot_01_user.npz", lambda a: a.update(qkv_last=a["qkv_last"][:29])),
        P0 + "/conversation_snapshots/snapshot_01_user.npz: qkv_last is float32 [29, 192]; expected float32 [30, 192]",
    ),
    # ---- found only while writing (npz_import._write_passes, _read_stacked, Schema.tensors)
    "qkv_last_in_some_passes": Case(
        "single", "_write_passes",
        _npz("prompt_0/conversation_snapshots/snapshot_01_user.npz", _drop("qkv_last")),
        P0 + "/conversation_snapshots: qkv_last is in some files but not all",
        stage="write",
    ),
    "snapshot_vectors_other_layers": Case(
        "readme", "Schema._check_vectors", _npz("conversation_snapshots/snapshot_00_user.npz", _layer_0_only),
        "{d}/conversation_snapshots/snapshot_00_user.npz: layers [0] differ from the step tensors' layers [0, 1]",
    ),
    "snapshot_vector_missing_a_layer": Case(
        "readme", "Schema._check_vectors", _npz("references/ref_calm.npz", _drop("layer_01/attn_out")),
        "{d}/references/ref_calm.npz: attn_out is missing for layer(s) [1] (every source needs every layer)",
    ),
    # ---- changed after the check (the write reads again what it writes)
    "snapshot_changed_to_other_layers": Case(
        "readme", "_read_stacked", _npz("conversation_snapshots/snapshot_00_user.npz", _layer_0_only),
        "{d}/conversation_snapshots/snapshot_00_user.npz: layers [0] differ from the step tensors' layers [0, 1]",
        stage="changed",
    ),
    "snapshot_changed_to_rows": Case(
        "readme", "_read_stacked",
        _npz("conversation_snapshots/snapshot_00_user.npz", lambda a: a.update({k: v[None] for k, v in a.items()})),
        "{d}/conversation_snapshots/snapshot_00_user.npz: hidden_in vectors must be (hidden_size,) or "
        "(1, tokens, hidden_size)",
        stage="changed",
    ),
    "reference_changed_missing_a_layer": Case(
        "readme", "load_member", _npz("references/ref_calm.npz", _drop("layer_01/attn_out")),
        "{d}/references/ref_calm.npz: 'layer_01/attn_out' is gone (the file changed during the import; "
        "import it again)",
        stage="changed",
    ),
    "step_changed_extra_key": Case(
        "readme", "Schema.step_tensors", _npz(STEP1, lambda a: a.update(logits2=a["logits"])),
        "{d}/tensors/step_001.npz: keys ['logits2'] are not in step 0 (every step must hold the same keys)",
        stage="changed",
    ),
    "step_changed_shape": Case(
        "readme", "Schema.tensors", _npz(STEP1, lambda a: a.update({"layer_00/k": a["layer_00/k"][..., :3]})),
        "{d}/tensors/step_001.npz: layer_00/k has shape [1, 1, 3], expected [1, 1, 4]",
        stage="changed",
    ),
    "step_changed_gone": Case(
        "readme", "open_npz", lambda d: (d / STEP1).unlink(),
        "{d}/tensors/step_001.npz: missing",
        stage="changed",
    ),
    "step_changed_directory_broken": Case(
        "readme", "open_npz",
        lambda d: (d / STEP1).write_bytes((d / STEP1).read_bytes().replace(b"PK\x01\x02", b"XX\x01\x02")),
        "{d}/tensors/step_001.npz: not a readable NPZ file (Bad magic number for central directory)",
        stage="changed",
    ),
    "step_changed_not_zip": Case(
        "readme", "open_npz", _write(STEP1, "not a zip"),
        "{d}/tensors/step_001.npz: not a readable NPZ file (not a zip archive)",
        stage="changed",
    ),
    "snapshot_source_in_one_file": Case(
        "readme", "_read_stacked",
        _npz("conversation_snapshots/snapshot_01_assistant.npz", _drop("layer_00/attn_out", "layer_01/attn_out")),
        "{d}/conversation_snapshots: attn_out is in some files but not all",
        stage="write",
    ),
    "residual_mismatch": Case(
        "readme_resid", "Schema.tensors", lambda d: None,
        "{d}/tensors/step_000.npz: layer_00/hidden_out differs from layer_01/hidden_in; actstore stores the "
        "residual stream once per layer boundary, so this run cannot be imported losslessly",
        stage="write",
    ),
    "second_prompt_refused_mid_import": Case(
        "multi", "import_npz_dirs",
        _npz("prompt_1_msg2of2/conversation_snapshots/snapshot_01_user.npz", _drop("qkv_last")),
        "{d}/prompt_1_msg2of2/conversation_snapshots: qkv_last is in some files but not all "
        "(runs already imported from {d}: {ids})",
        stage="write",
    ),
}

# Checks a run directory cannot reach, each with the reason; the test below keeps this
# list honest (an entry must name a real check that no case reaches).
NOT_FROM_A_DIRECTORY: dict[tuple[str, str], str] = {
    ("npz_members", "{}: missing"): "every NPZ path is found by inside() just before; only a "
    "file removed between the two calls gets here",
    ("read_json", "{}: missing (is {} a run directory?)"): "every JSON path is found by inside() or "
    "run_file() just before, as above",
}


# ---------------------------------------------------------------------- running a case


def _base(kind: str, tmp_path: Path) -> Path:
    if kind.startswith("readme"):
        opts: dict[str, Any] = {"readme_bf16": {"store_dtype": "bfloat16"},
                                "readme_resid": {"residual_mismatch": True}}.get(kind, {})  # fmt: skip
        return make_seed_dir(tmp_path / "in", **opts)
    src = {"single": SINGLE, "multi": MULTI}[kind]
    if src is None:
        pytest.skip("Activation Lab's fixtures are not beside the project")
    return _copy(tmp_path / "in", src)


def _raised_at(err: BaseException) -> tuple[str, int]:
    """(module, line) of the innermost frame of npz_import/npz_schema the error passed."""
    files = {Path(m.__file__).resolve(): m.__name__.rsplit(".", 1)[1] for m in MODULES if m.__file__}
    found = ("", 0)
    tb = err.__traceback__
    while tb is not None:
        mod = files.get(Path(tb.tb_frame.f_code.co_filename).resolve())
        if mod is not None:
            found = (mod, tb.tb_lineno)
        tb = tb.tb_next
    return found


@pytest.mark.parametrize("name", list(CASES))
def test_each_refusal_reads_as_written(tmp_path: Path, name: str) -> None:
    case = CASES[name]
    d = _base(case.base, tmp_path)
    if case.stage != "changed":
        case.breaks(d)
    store = ActStore.open(tmp_path / "store.zarr", create=True)
    with pytest.raises(StoreError) as info:
        seeds = read_seed_dirs(d, max_bytes=case.max_bytes)
        assert case.stage != "read", "read_seed_dirs let it through"
        if case.stage == "changed":
            case.breaks(d)
        import_npz_dirs(store, seeds, quiet=True)
    assert case.stage == "write" or not store.run_ids()
    kept = sorted(store.run_ids(), key=lambda r: store.run(r).meta["imported_from"])
    want = case.message.replace("{d}", str(d)).replace("{ids}", ", ".join(kept))
    for key, value in case.fill(d).items():
        want = want.replace("{" + key + "}", value)
    assert str(info.value) == want, f"\n got: {info.value}\nwant: {want}"
    assert store.orphans() == []  # a refused import leaves no half-written group
    module, line = _raised_at(info.value)
    site = SITES.get((module, line))
    assert site is not None and site[0] == case.site, f"raised at {module}.py:{line} ({site}), not in {case.site}"


# ---------------------------------------------------------------------- every check has a case


# Under mutation testing (mutmut) each function is kept as x_NAME__mutmut_orig (methods
# xǁClassǁNAME__mutmut_orig) beside its numbered mutants: they count as NAME.
_MUTMUT_COPY = re.compile(r"x(?:ǁ[^ǁ]+ǁ|_)(.+)__mutmut_(orig|\d+)")


def _sites(module: Any) -> dict[tuple[str, int], tuple[str, str, bool]]:
    """Every ``raise StoreError(...)`` of a module: (module, line) -> (function, template,
    whether it is a mutant's copy), the template being the message with ``{}`` for what
    is filled in."""
    name = module.__name__.rsplit(".", 1)[1]
    out: dict[tuple[str, int], tuple[str, str, bool]] = {}

    def visit(node: ast.AST, scope: list[str], mutant: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.ClassDef)):
                copy = _MUTMUT_COPY.fullmatch(child.name)
                own = copy.group(1) if copy else child.name
                visit(child, [*scope, own], mutant or bool(copy and copy.group(2) != "orig"))
                continue
            if isinstance(child, ast.Raise) and isinstance(child.exc, ast.Call):
                if getattr(child.exc.func, "id", None) == "StoreError" and child.exc.args:
                    arg = child.exc.args[0]
                    parts = arg.values if isinstance(arg, ast.JoinedStr) else [arg]
                    tpl = "".join(p.value if isinstance(p, ast.Constant) and isinstance(p.value, str) else "{}"
                                  for p in parts)  # fmt: skip
                    for line in range(child.lineno, (child.end_lineno or child.lineno) + 1):
                        out[(name, line)] = (".".join(scope), tpl, mutant)
            visit(child, scope, mutant)

    visit(ast.parse(Path(module.__file__).read_text(encoding="utf-8")), [], False)
    return out


SITES = {k: v for m in MODULES for k, v in _sites(m).items()}
CHECKS = {(f, t) for f, t, mutant in SITES.values() if not mutant}


def _template_regex(tpl: str) -> re.Pattern[str]:
    return re.compile("".join(".+" if p == "{}" else re.escape(p) for p in re.split(r"(\{\})", tpl)), re.S)


def _claimed() -> set[tuple[str, str]]:
    """The checks the cases claim: in the case's function, the template its message fits
    (the most specific one, when a short template such as ``{}`` fits too)."""
    checks = CHECKS
    out = set()
    for case in CASES.values():
        msg = re.sub(r"\{\w+\}", "x", case.message)
        fits = [c for c in checks if c[0] == case.site and _template_regex(c[1]).fullmatch(msg)]
        if fits:
            out.add(max(fits, key=lambda c: len(c[1].replace("{}", ""))))
    return out


def test_every_refusal_has_a_case() -> None:
    checks = CHECKS
    missing = checks - _claimed() - set(NOT_FROM_A_DIRECTORY)
    assert not missing, "checks without a case: " + "; ".join(f"{f}: {t!r}" for f, t in sorted(missing))
    stale = set(NOT_FROM_A_DIRECTORY) - checks
    assert not stale, f"listed as unreachable but not a check any more: {sorted(stale)}"
    assert len(checks) > 70  # the scan found the modules' checks
