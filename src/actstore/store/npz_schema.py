"""Reading and checking a seed run directory before anything is written.

run.json and steps.json are read and validated; step 0's NPZ headers set the
:class:`Schema` (layers, sources, widths, store dtype) that every later step must match,
and the schema turns each step's members into writer tensors, refusing anything the
store could not give back bit for bit. Every error names the file, the key and what to fix.

A run directory may be hostile: every file is read through :func:`inside` (a relative
path of safe names that stays inside the directory once symlinks are resolved), and
every NPZ member's ``.npy`` header is read (:func:`npz_members`) and checked against the
shapes the run declares before any member is decompressed. Snapshot and reference files
are either the README layout's 1-D residual vectors or Activation Lab's full prefill
(:meth:`Schema.check_pass`: the step keys, v optional, at every position, and qkv_last).
"""

from __future__ import annotations

import json
import math
import os
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from actstore import naming
from actstore.errors import BadNameError, StoreError
from actstore.store import layout
from actstore.store.writer import ArrayPlan

Key = tuple[str, int | None]

MAX_JSON_BYTES = 256 << 20  # steps.json of a 10,000-step run with top-k 20 is ~20 MB
# Float activations deflate by 1-3x (attention's zero upper triangle included); a member
# that claims more than BOMB_RATIO times its compressed size is a zip bomb, not data.
BOMB_RATIO = 100
BOMB_MIN_BYTES = 16 << 20  # below this any ratio is harmless
NPZ_DTYPES = (np.dtype(np.float16), np.dtype(np.float32))
QKV_LAST = "qkv_last"  # Activation Lab's per-pass key beside the activations (see store.passes)


def memory_budget() -> int:
    """Bytes an import may hold at once: half the machine's physical memory."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def gib(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB"


def check_name(value: object, what: str, where: Path | str) -> str:
    """naming.check_name (the rule capture applies too), as an import StoreError."""
    try:
        return naming.check_name(value, what, str(where))
    except BadNameError as e:
        raise StoreError(str(e)) from None


def inside(d: Path, rel: object, where: Path | str, what: str) -> Path:
    """``d / rel`` when ``rel`` is a relative path of safe names that stays inside ``d``
    (symlinks resolved) and names a regular file; else a StoreError naming ``where``."""
    shown = naming.show_name(rel)
    if not isinstance(rel, str) or not rel:
        raise StoreError(f"{where}: {what} must be a relative path, got {shown}")
    if rel.startswith(("/", "\\")):  # other pieces (c:, ..) fail the name rule below
        raise StoreError(
            f"{where}: {what} {shown} is an absolute path (import reads only inside {d}; "
            "give a path relative to it)"
        )
    for part in rel.split("/"):
        problem = naming.name_problem(part)
        if problem is not None:
            raise StoreError(
                f"{where}: {what} {shown}: {naming.show_name(part)} {problem[0]} "
                f"(use a path inside the run directory, e.g. {naming.step_file(0)})"
            )
    path = d / rel
    try:
        real = path.resolve(strict=True)
    except FileNotFoundError:
        raise StoreError(f"{where}: {what} {shown} not found in {d}") from None
    except (OSError, RuntimeError) as e:  # a symlink loop, a permission error
        raise StoreError(f"{where}: {what} {shown} cannot be resolved ({' '.join(str(e).split())})") from None
    if not real.is_relative_to(d.resolve()):
        raise StoreError(
            f"{where}: {what} {shown} resolves to {real}, outside {d} "
            "(import reads only inside the run directory; copy the file in)"
        )
    if not real.is_file():
        raise StoreError(f"{where}: {what} {shown} is not a regular file")
    return path


def run_file(d: Path, rel: str) -> Path:
    """A file every run directory holds (run.json, steps.json), checked by :func:`inside`."""
    if not os.path.lexists(d / rel):
        raise StoreError(f"{d / rel}: missing (is {d} a run directory?)")
    return inside(d, rel, d / rel, "the file")


class Member(NamedTuple):
    """One NPZ member as its ``.npy`` header describes it."""

    shape: tuple[int, ...]
    dtype: np.dtype[Any]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def npz_members(path: Path) -> dict[str, Member]:
    """Every member's header, read without decompressing its data. Refused: members that
    are not plain ``.npy`` arrays, object dtypes (pickles), a zip size that differs from
    what the header describes, and zip bombs (see BOMB_RATIO)."""
    out: dict[str, Member] = {}
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                key = info.filename.removesuffix(".npy")
                if not info.filename.endswith(".npy") or info.is_dir():
                    raise StoreError(f"{path}: member {naming.show_name(info.filename)} is not a .npy array")
                try:
                    with zf.open(info) as f:
                        version = np.lib.format.read_magic(f)
                        if version == (1, 0):
                            shape, _, dtype = np.lib.format.read_array_header_1_0(f)
                        elif version == (2, 0):
                            shape, _, dtype = np.lib.format.read_array_header_2_0(f)
                        else:
                            raise ValueError(f".npy format {version} is not supported")
                        header_len = f.tell()
                except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
                    raise StoreError(
                        f"{path}: {key}: not a readable .npy array ({' '.join(str(e).split())}; re-export it)"
                    ) from None
                if dtype.hasobject or dtype.fields is not None or dtype.subdtype is not None:
                    raise StoreError(
                        f"{path}: {key}: dtype {dtype} holds Python objects or records; actstore "
                        "never unpickles (store float16 or float32 arrays)"
                    )
                if any(n < 0 for n in shape):
                    raise StoreError(f"{path}: {key}: negative shape {list(shape)}")
                member = Member(tuple(shape), dtype)
                if info.file_size != header_len + member.nbytes:
                    raise StoreError(
                        f"{path}: {key}: the zip entry declares {info.file_size} bytes, but its header "
                        f"describes {header_len + member.nbytes} (a damaged or forged NPZ; re-export it)"
                    )
                if member.nbytes > BOMB_MIN_BYTES and member.nbytes > BOMB_RATIO * max(info.compress_size, 1):
                    raise StoreError(
                        f"{path}: {key}: {info.compress_size} compressed bytes claim to expand to "
                        f"{gib(member.nbytes)} (more than {BOMB_RATIO}x: a zip bomb, not activations); refused"
                    )
                out[key] = member
    except StoreError:
        raise
    except FileNotFoundError:
        raise StoreError(f"{path}: missing") from None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise StoreError(f"{path}: not a readable NPZ file ({' '.join(str(e).split())})") from None
    return out


def read_json(path: Path) -> Any:
    try:
        if path.stat().st_size > MAX_JSON_BYTES:  # read whole: refuse what cannot be metadata
            raise StoreError(f"{path}: larger than {MAX_JSON_BYTES >> 20} MiB, too large for run metadata")
        return json.loads(path.read_text(encoding="utf-8"))
    except StoreError:
        raise
    except FileNotFoundError:
        raise StoreError(f"{path}: missing (is {path.parent} a run directory?)") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise StoreError(f"{path}: not valid JSON: {' '.join(str(e).split())}") from None


def read_steps(d: Path) -> list[dict[str, Any]]:
    path = run_file(d, "steps.json")
    data = read_json(path)
    steps = data.get("steps") if isinstance(data, dict) else None
    if not isinstance(steps, list) or not steps:
        raise StoreError(f'{path}: expected {{"steps": [...]}} with at least one step')
    for i, s in enumerate(steps):
        where = f"{path}: steps[{i}]"
        if not isinstance(s, dict):
            raise StoreError(f"{where}: expected an object")
        if s.get("step") != i:
            raise StoreError(
                f"{where}: 'step' is {s.get('step')!r}, expected {i} (steps must be 0..n-1 in order)"
            )
        ids = s.get("input_token_ids")
        if not isinstance(ids, list) or not ids or not all(isinstance(t, int) for t in ids):
            raise StoreError(f"{where}: 'input_token_ids' must be a non-empty list of integers")
        if i > 0 and len(ids) != 1:
            raise StoreError(f"{where}: a decode step feeds one token, not {len(ids)}")
        # actstore writes the tokens fed; Activation Lab the sequence length: the prompt at
        # step 0, and prompt + i + 1 at decode step i (it counts the token this step emits).
        fed = {len(ids)} if i == 0 else {1, len(steps[0]["input_token_ids"]) + i + 1}
        if "seq_len" in s and s["seq_len"] not in fed:
            raise StoreError(
                f"{where}: seq_len {s['seq_len']!r} must be {' or '.join(map(str, sorted(fed)))} "
                "(the tokens fed, or the prompt plus tokens so far as Activation Lab counts them)"
            )
        kind = "prefill" if i == 0 else "decode"
        if s.get("kind", kind) != kind:
            raise StoreError(f"{where}: kind {s.get('kind')!r}, expected {kind!r}")
        s.setdefault("tensors_file", naming.step_file(i))
        inside(d, s["tensors_file"], where, "tensors_file")
    return steps


def open_npz(path: Path) -> Any:
    if path.exists() and not zipfile.is_zipfile(path):  # np.load would take it for a pickle
        raise StoreError(f"{path}: not a readable NPZ file (not a zip archive)")
    try:
        return np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise StoreError(f"{path}: missing") from None
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise StoreError(f"{path}: not a readable NPZ file ({' '.join(str(e).split())})") from None


def load_member(path: Path, npz: Any, key: str) -> np.ndarray:
    try:
        return np.asarray(npz[key])
    except KeyError:
        # every key was checked before the import began: the file changed since
        raise StoreError(f"{path}: {key!r} is gone (the file changed during the import; import it again)") from None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise StoreError(f"{path}: cannot read {key!r} ({' '.join(str(e).split())})") from None


def declared_dtype(run_json: dict[str, Any], info: dict[str, Any]) -> str | None:
    cap = (run_json.get("scenario") or {}).get("capture") or {}
    return info.get("store_dtype") or cap.get("store_dtype")


def npz_store_dtype(dtype: np.dtype[Any], declared: str | None, where: str) -> str:
    """The store dtype of NPZ arrays: their own, except float32 that stands for bfloat16."""
    if dtype == np.float16:
        return "float16"
    if dtype == np.float32:
        return "bfloat16" if declared == "bfloat16" else "float32"
    raise StoreError(f"{where}: dtype {dtype} is not a store dtype (float16, float32, bfloat16 as float32)")


def to_store(arr: np.ndarray, store_dtype: str, where: str) -> np.ndarray:
    """NPZ values -> the physical store array (bfloat16 as uint16 bits), refusing any loss."""
    want = np.float32 if store_dtype == "bfloat16" else np.dtype(store_dtype)
    if arr.dtype != want:
        raise StoreError(f"{where}: dtype {arr.dtype}, but this run's tensors are {np.dtype(want)}")
    if store_dtype != "bfloat16":
        return arr
    bits = np.ascontiguousarray(arr).view(np.uint32)
    if np.any(bits & 0xFFFF):
        raise StoreError(f"{where}: float32 values are not bfloat16 values; the import would lose bits")
    return (bits >> 16).astype(np.uint16)


def writer_array(arr: np.ndarray) -> np.ndarray:
    """What RunWriter.submit takes: the physical store values (bfloat16 as uint16 bits), as
    NumPy, so an import never loads torch."""
    return np.ascontiguousarray(arr)


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


class Schema:
    """What step 0 says about every step: layers, sources, widths, dtype, positions."""

    def __init__(self, layers: list[int], widths: dict[str, int], store_dtype: str, prompt_len: int,
                 n_steps: int):  # fmt: skip
        self.layers, self.widths, self.store_dtype = layers, widths, store_dtype
        self.sources = [s for s in naming.ALL_SOURCES if s in widths]
        self.prompt_len, self.n_positions = prompt_len, prompt_len + n_steps - 1
        self.gated = "mlp_gate" in widths
        self.bounds = layout.residual_boundaries(layers) if "hidden_in" in widths else []

    @classmethod
    def from_step0(cls, d: Path, steps: list[dict[str, Any]], declared: str | None) -> Schema:
        """The schema step 0's headers describe; nothing is decompressed. Every member's
        shape must be what steps.json declares (step 0's input tokens), so a steps.json
        claiming a longer prompt than the NPZ holds is refused before any allocation."""
        step0, n_steps = steps[0], len(steps)
        path = d / step0["tensors_file"]
        members = npz_members(path)
        per_source: dict[str, set[int | None]] = {}
        widths: dict[str, int] = {}
        dtype: str | None = None
        for key, m in members.items():
            try:
                layer, source = naming.parse_npz_key(key)
            except ValueError:
                raise StoreError(
                    f"{path}: unexpected key {key!r} (not layer_NN/<source> or a global source)"
                ) from None
            if len(m.shape) != (4 if source == "attn_weights" else 3):
                raise StoreError(f"{path}: {key} has shape {list(m.shape)}, expected (1, tokens, width)")
            per_source.setdefault(source, set()).add(layer)
            widths[source] = m.shape[1] if source == "attn_weights" else m.shape[-1]
            dtype = dtype or npz_store_dtype(m.dtype, declared, f"{path}: {key}")
        if not widths:
            raise StoreError(f"{path}: holds no tensors")
        layers = sorted({la for ls in per_source.values() for la in ls if la is not None})
        for source, got in per_source.items():
            if source in naming.LAYER_SOURCES and got != set(layers):
                missing = sorted(set(layers) - got)
                raise StoreError(
                    f"{path}: {source} is missing for layer(s) {missing} (every source needs every layer)"
                )
        if ("hidden_in" in widths) != ("hidden_out" in widths):
            raise StoreError(
                f"{path}: has only one of hidden_in / hidden_out; the residual stream needs both"
            )
        assert dtype is not None
        schema = cls(layers, widths, dtype, len(step0["input_token_ids"]), n_steps)
        schema.check_members(path, members, 0)
        return schema

    @property
    def npz_dtype(self) -> np.dtype[Any]:
        return np.dtype(np.float16 if self.store_dtype == "float16" else np.float32)

    @property
    def hidden(self) -> int | None:
        """The residual width snapshot and reference vectors must have."""
        return next(
            (self.widths[s] for s in (*naming.RESIDUAL_SOURCES, "embeddings") if s in self.widths), None
        )

    def check_members(self, path: Path, members: dict[str, Member], step: int) -> None:
        """Headers of one step's NPZ against this schema: same keys, shapes, dtype."""
        extra = sorted(set(members) - set(self.keys()))
        if extra:  # anything we would not write back would be lost
            raise StoreError(f"{path}: keys {extra} are not in step 0 (every step must hold the same keys)")
        for key in self.keys():
            m = members.get(key)
            if m is None:
                raise StoreError(f"{path}: missing key {key!r} (every step must hold the keys of step 0)")
            want = self.expected_shape(naming.parse_npz_key(key)[1], step)
            if m.shape != want:
                n = len(self.positions(step))
                why = f" (steps.json: step {step} feeds {n} token{'' if n == 1 else 's'})"
                raise StoreError(f"{path}: {key} has shape {list(m.shape)}, expected {list(want)}{why}")
            if m.dtype != self.npz_dtype:
                raise StoreError(
                    f"{path}: {key}: dtype {m.dtype}, but this run's tensors are {self.npz_dtype}"
                )

    def check_pass(self, path: Path, members: dict[str, Member], seq_len: object = None,
                   num_layers: object = None) -> int | None:  # fmt: skip
        """Headers of a snapshot / reference NPZ. Activation Lab's files hold the full
        prefill: every step key but v as (1, T, ...) (attention (1, heads, T, T)) and
        ``qkv_last`` (num_layers, Dv) float32; returns T. The README layout's hold 1-D
        residual vectors; returns None. ``seq_len`` (its index's, when given) must be T;
        ``num_layers`` (run.json's, when given) is qkv_last's row count."""
        acts = {k: m for k, m in members.items() if _is_key(k)}
        if not any(len(m.shape) in (3, 4) for m in acts.values()):
            self._check_vectors(path, acts)
            return None
        extra = sorted(set(members) - set(acts) - {QKV_LAST})
        if extra:  # anything the import would not keep would be lost on export
            raise StoreError(f"{path}: keys {extra} are neither activations nor qkv_last (nothing else is kept)")
        want = set(self.keys())
        no_v = {k for k in want if naming.parse_npz_key(k)[1] != "v"}
        if set(acts) not in (want, no_v):
            missing, more = sorted(no_v - set(acts)), sorted(set(acts) - want)
            raise StoreError(
                f"{path}: a full pass holds the step tensors' keys (v optional); "
                + "; ".join(x for x in (missing and f"missing {missing}", more and f"not in the steps {more}") if x)
            )
        first = next(iter(acts.values())).shape
        length = first[2] if len(first) == 4 else first[1]
        for key, m in acts.items():
            shape = self.pass_shape(naming.parse_npz_key(key)[1], length)
            if m.shape != shape:
                raise StoreError(f"{path}: {key} has shape {list(m.shape)}, expected {list(shape)}")
            if m.dtype != self.npz_dtype:
                raise StoreError(f"{path}: {key}: dtype {m.dtype}, but this run's tensors are {self.npz_dtype}")
        if seq_len is not None and seq_len != length:
            raise StoreError(
                f"{path}: holds {length} tokens, but its index gives seq_len {seq_len!r} "
                "(fix seq_len in index.json or replace the file)"
            )
        q = members.get(QKV_LAST)
        if q is not None:
            rows = num_layers if isinstance(num_layers, int) else None
            ok = q.dtype == np.float32 and len(q.shape) == 2 and q.shape[0] > max(self.layers, default=-1)
            ok = ok and (rows is None or q.shape[0] == rows) and q.shape[1] == self.widths.get("v", q.shape[1])
            if not ok:
                raise StoreError(
                    f"{path}: qkv_last is {q.dtype} {list(q.shape)}; expected float32 "
                    f"[{rows or 'num_layers'}, {self.widths.get('v', 'v width')}]"
                )
        return length

    def _check_vectors(self, path: Path, acts: dict[str, Member]) -> None:
        """README-layout vectors: 1-D residual vectors of the run's width, each source for
        every layer of the steps (checked here so that nothing is written before a refusal)."""
        for key, m in acts.items():
            if m.shape != (self.hidden,) or m.dtype not in NPZ_DTYPES:
                raise StoreError(
                    f"{path}: {key} is {m.dtype} {list(m.shape)}; expected a float16/float32 vector "
                    f"of the run's hidden size [{self.hidden}] or a prefill [1, tokens, {self.hidden}]"
                )
        got = {naming.parse_npz_key(k) for k in acts}
        layers = sorted({la for la, _ in got if la is not None})
        if layers != self.layers:
            raise StoreError(f"{path}: layers {layers} differ from the step tensors' layers {self.layers}")
        for source in sorted({s for la, s in got if la is not None}):
            missing = [la for la in self.layers if (la, source) not in got]
            if missing:
                raise StoreError(f"{path}: {source} is missing for layer(s) {missing} (every source needs every layer)")

    def pass_shape(self, source: str, length: int) -> tuple[int, ...]:
        """A full pass's member shape: (1, T, W), attention (1, heads, T, T)."""
        if source == "attn_weights":
            return (1, self.widths[source], length, length)
        return (1, length, self.widths[source])

    def pass_bytes(self, length: int) -> int:
        """Bytes of one full pass of ``length`` tokens, as the NPZ holds it."""
        return sum(math.prod(self.pass_shape(naming.parse_npz_key(k)[1], length)) for k in self.keys()) * (
            self.npz_dtype.itemsize
        )

    def memory_needed(self, pass_lengths: Sequence[int] = ()) -> int:
        """Bytes the import holds at once: the largest step (step 0) plus the writer's
        position blocks (see writer._VectorBlocks / _AttentionBlocks); or, if more, while
        the full passes of ``pass_lengths`` tokens are written (store/passes.py): the first
        pass, the one being written and the passes writer's blocks."""
        step0 = (
            sum(math.prod(self.expected_shape(naming.parse_npz_key(k)[1], 0)) for k in self.keys())
            * self.npz_dtype.itemsize
        )
        plans = self.plans(self.n_positions)
        if "mlp_down_in" in self.widths:  # _DownIn may store it explicitly
            plans.append(self.plan("mlp_down_in", self.n_positions))
        need = step0 + _buffers(plans)
        if pass_lengths:
            rows, width = sum(pass_lengths), max(pass_lengths)
            plans = self.plans(rows, attn_cols=width)
            if "mlp_down_in" in self.widths:
                plans.append(self.plan("mlp_down_in", rows))
            need = max(need, 2 * self.pass_bytes(width) + _buffers(plans))
        return need

    def positions(self, step: int) -> range:
        start = 0 if step == 0 else self.prompt_len + step - 1
        return range(start, self.prompt_len if step == 0 else start + 1)

    def plans(self, n_max: int, attn_cols: int | None = None, skip: tuple[str, ...] = ()) -> list[ArrayPlan]:
        """Writer plans, as capture.runner._plans makes them (same keys, specs, attrs).
        With ``attn_cols``: the passes' arrays (store/passes.py), less the ``skip`` sources."""
        dt = layout.physical_dtype(self.store_dtype)
        attrs: dict[str, Any] = {"actstore_dtype": self.store_dtype}
        plans = []
        if self.bounds:
            keys = tuple(("residual", b) for b in self.bounds)
            spec = layout.vector_spec(
                naming.RESIDUAL_ARRAY, len(self.bounds), n_max, self.widths["hidden_in"], dt
            )
            plans.append(ArrayPlan(naming.RESIDUAL_ARRAY, spec, keys, {**attrs, "boundaries": self.bounds}))
        for source in naming.LAYER_SOURCES:
            if source not in self.widths or source in ("hidden_in", "hidden_out", "mlp_down_in", *skip):
                continue
            plans.append(self.plan(source, n_max, attn_cols))
        for source in naming.GLOBAL_SOURCES:
            if source in self.widths and source not in skip:
                spec = layout.vector_spec(source, None, n_max, self.widths[source], dt)
                plans.append(ArrayPlan(source, spec, ((source, None),), attrs))
        return plans

    def plan(self, source: str, n_max: int, attn_cols: int | None = None) -> ArrayPlan:
        dt = layout.physical_dtype(self.store_dtype)
        if source == "attn_weights":
            spec = layout.attn_spec(len(self.layers), self.widths[source], n_max, dt, cols=attn_cols)
        else:
            spec = layout.vector_spec(source, len(self.layers), n_max, self.widths[source], dt)
        keys = tuple((source, layer) for layer in self.layers)
        return ArrayPlan(source, spec, keys, {"actstore_dtype": self.store_dtype, "layers": self.layers})

    def expected_shape(self, source: str, step: int) -> tuple[int, ...]:
        pos = self.positions(step)
        if source == "attn_weights":
            return (1, self.widths[source], len(pos), pos.stop)  # kv_len = last position + 1
        return (1, len(pos), self.widths[source])

    def keys(self) -> list[str]:
        return [
            naming.npz_key(layer, source)
            for source in self.sources
            for layer in (self.layers if source in naming.LAYER_SOURCES else [None])
        ]

    def step_tensors(
        self, path: Path, npz: Any, step: int
    ) -> tuple[dict[Key, np.ndarray], dict[Key, np.ndarray]]:
        """Writer tensors of one step, and the raw NPZ arrays mlp_down_in is checked against."""
        extra = sorted(set(npz.files) - set(self.keys()))
        if extra:  # anything we would not write back would be lost
            raise StoreError(f"{path}: keys {extra} are not in step 0 (every step must hold the same keys)")
        return self.tensors(path, npz, lambda source: self.expected_shape(source, step), self.sources)

    def tensors(
        self, path: Path, npz: Any, shape: Any, sources: list[str]
    ) -> tuple[dict[Key, np.ndarray], dict[Key, np.ndarray]]:
        """Writer tensors of ``sources`` in one NPZ (``shape(source)`` each must have),
        residual sources folded into boundaries, and the raw act / up / down_in arrays;
        mlp_down_in is left to the caller (stored only when it cannot be derived)."""
        tensors: dict[Key, np.ndarray] = {}
        raw: dict[Key, np.ndarray] = {}
        residual: dict[int, tuple[str, np.ndarray]] = {}
        for source in sources:
            for layer in self.layers if source in naming.LAYER_SOURCES else [None]:
                key = naming.npz_key(layer, source)
                arr = load_member(path, npz, key)
                want = shape(source)
                if arr.shape != want:
                    raise StoreError(f"{path}: {key} has shape {list(arr.shape)}, expected {list(want)}")
                if source in ("mlp_act", "mlp_up", "mlp_down_in"):
                    raw[(source, layer)] = arr[0]
                if source == "mlp_down_in":
                    continue  # _DownIn decides whether (and converts only if) it is stored
                data = to_store(arr[0], self.store_dtype, f"{path}: {key}")
                if source in ("hidden_in", "hidden_out"):
                    assert layer is not None
                    b = layer if source == "hidden_in" else layer + 1
                    if b in residual and not same_bits(residual[b][1], data):
                        raise StoreError(
                            f"{path}: {key} differs from {residual[b][0]}; actstore stores the residual "
                            "stream once per layer boundary, so this run cannot be imported losslessly"
                        )
                    residual[b] = (key, data)
                    tensors[("residual", b)] = writer_array(data)
                else:
                    tensors[(source, layer)] = writer_array(data)
        return tensors, raw


def _buffers(plans: list[ArrayPlan]) -> int:
    """Bytes of the writer's position blocks for ``plans``."""
    total = 0
    for plan in plans:
        shape = list(plan.spec.shape)
        shape[plan.spec.position_axes[0]] = plan.spec.block
        total += math.prod(shape) * np.dtype(plan.spec.dtype).itemsize
    return total


def _is_key(key: str) -> bool:
    try:
        naming.parse_npz_key(key)
    except ValueError:
        return False
    return True
