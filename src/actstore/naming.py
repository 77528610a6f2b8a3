"""The one place that names activation sites, store paths and NPZ keys.

Nothing else in actstore formats ``layer_NN/...`` strings or array paths: every module
asks this one. A *source* is a kind of captured tensor (``hidden_out``, ``q``,
``logits``...). Per-layer sources live in arrays with a leading layer axis; global
sources have none.
"""

from __future__ import annotations

import re

from actstore.errors import BadNameError, SelectionError

# Per-layer sources in the order the seed documents them.
LAYER_SOURCES: tuple[str, ...] = (
    "hidden_in",
    "hidden_out",
    "q",
    "k",
    "v",
    "attn_out",
    "attn_weights",
    "mlp_gate",
    "mlp_up",
    "mlp_act",
    "mlp_down_in",
    "mlp_down_out",
)
GLOBAL_SOURCES: tuple[str, ...] = ("embeddings", "logits")
ALL_SOURCES: tuple[str, ...] = LAYER_SOURCES + GLOBAL_SOURCES

# The residual-stream sources kept for snapshots and references, and compared by reports.
RESIDUAL_SOURCES: tuple[str, ...] = ("hidden_in", "hidden_out", "attn_out", "mlp_down_out")

# Which capture flag switches which sources on (embeddings ride with hidden_states).
FLAG_SOURCES: dict[str, tuple[str, ...]] = {
    "hidden_states": ("hidden_in", "hidden_out", "embeddings"),
    "qkv": ("q", "k", "v", "attn_out"),
    "attention_weights": ("attn_weights",),
    "mlp": ("mlp_gate", "mlp_up", "mlp_act", "mlp_down_in", "mlp_down_out"),
    "logits": ("logits",),
}

# Run group layout (relative to the run group).
ACTS_GROUP = "acts"
SNAPSHOTS_GROUP = "snapshots"
REFERENCES_GROUP = "references"
PASSES_GROUP = "passes"  # own positions of full snapshot and reference passes, see store.passes
RESIDUAL_ARRAY = "residual"  # (boundaries, T, H): hidden_in/out stored once, see store.layout
TOKENS_ARRAY = "tokens"
# (L, T, heads) float32: entropy of every stored attention row, written beside the
# weights so depth views read kilobytes instead of every layer's (heads, T, T) weights.
ATTN_ENTROPY_ARRAY = "attn_entropy"
QKV_LAST_ARRAY = "qkv_last"  # Activation Lab's per-pass last-token q.k/sqrt(d) * v, see store.passes
POSITION_STEP_ARRAY = "position_step"
STEPS_ARRAY = "steps"  # per-step records (tokens, top-k) as one JSON document, read on demand

RUNS_PREFIX = "runs"
CATALOG_PREFIX = "catalog"

_NPZ_LAYER_KEY = re.compile(r"^layer_(\d+)/([a-z_]+)$")
# Names that become path pieces: one safe segment, addressable as reference:LABEL.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_NOT_NAME_CHAR = re.compile(r"[^A-Za-z0-9._-]")
MAX_NAME = 100
# A run id is <name>_<YYYYmmddTHHMMSS>_<6 hex>: 23 characters more than its name.
MAX_RUN_ID = MAX_NAME + 23


def act_path(source: str) -> str:
    """Array path of a step source inside a run group."""
    check_source(source)
    return f"{ACTS_GROUP}/{source}"


def snapshot_path(source: str) -> str:
    return f"{SNAPSHOTS_GROUP}/{source}"


def reference_path(source: str) -> str:
    return f"{REFERENCES_GROUP}/{source}"


def run_path(run_id: str) -> str:
    """Group path of a run inside the store."""
    check_run_id(run_id)
    return f"{RUNS_PREFIX}/{run_id}"


def catalog_key(run_id: str) -> str:
    """Key of a run's catalog entry: written last, it is the run's commit marker."""
    check_run_id(run_id)
    return f"{CATALOG_PREFIX}/{run_id}.json"


def npz_key(layer: int | None, source: str) -> str:
    """The seed's NPZ key: ``layer_NN/<source>`` or a bare global source name."""
    check_source(source)
    if source in GLOBAL_SOURCES:
        return source
    if layer is None:
        raise ValueError(f"source {source!r} needs a layer")
    return f"layer_{layer:02d}/{source}"


def parse_npz_key(key: str) -> tuple[int | None, str]:
    """Inverse of :func:`npz_key`."""
    if key in GLOBAL_SOURCES:
        return None, key
    m = _NPZ_LAYER_KEY.match(key)
    if not m or m.group(2) not in LAYER_SOURCES:
        raise ValueError(f"not an activation key: {key!r}")
    return int(m.group(1)), m.group(2)


def step_file(step: int) -> str:
    return f"tensors/step_{step:03d}.npz"


def snapshot_file(index: int, role: str) -> str:
    return f"conversation_snapshots/snapshot_{index:02d}_{role}.npz"


def reference_file(label: str) -> str:
    return f"references/ref_{label}.npz"


def check_source(source: str) -> str:
    # SelectionError (a ValueError): a mistyped --source is the user's to fix, so the
    # CLI prints one line and exits 2 instead of a traceback.
    if source not in ALL_SOURCES:
        from actstore import tl_names  # a TransformerLens name: say which source and layer it is

        if isinstance(source, str) and tl_names.looks_like_hook(source):
            raise SelectionError(tl_names.pointer(source))
        raise SelectionError(f"unknown source {source!r}; known: {', '.join(ALL_SOURCES)}")
    return source


def name_problem(value: object, max_len: int = MAX_NAME, example: str = "calm") -> tuple[str, str] | None:
    """(what is wrong, how to fix it) when ``value`` cannot be a path piece, else None.

    The rule: ASCII letters, digits, ``.``, ``_``, ``-``; a letter or digit first (so no
    ``..``, ``-flag`` or hidden file); no ``:`` (``--compare reference:LABEL`` splits on
    it); at most ``max_len`` characters (file names stay under the 255-byte limit).
    """
    if not isinstance(value, str):
        return "must be text", "write it as a quoted string"
    if not value:
        return "must not be empty", f"use e.g. {example}"
    fixed = _NOT_NAME_CHAR.sub("_", value).lstrip("._-")[:max_len] or example
    if len(value) > max_len:
        return f"is {len(value)} characters long", f"shorten it to {max_len} characters or fewer"
    if re.search(r"[\s/\\]", value):
        return "must contain no spaces or slashes", f"use e.g. {fixed}"
    if ":" in value:
        return "must not contain ':' (--compare reference:LABEL could not name it)", f"use e.g. {fixed}"
    if not value.isascii() or _NOT_NAME_CHAR.search(value):
        return "may hold only ASCII letters, digits, '.', '_' and '-'", f"use e.g. {fixed}"
    if not _NAME.fullmatch(value):
        return "must start with a letter or digit", f"use e.g. {fixed}"
    return None


def show_name(value: object) -> str:
    """A name as error messages quote it: ASCII, one line, short."""
    text = ascii(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_name(value: object, what: str, where: str = "", max_len: int = MAX_NAME) -> str:
    """``value`` if it may become a path piece, else BadNameError naming ``where`` and ``what``."""
    problem = name_problem(value, max_len)
    if problem is None:
        assert isinstance(value, str)
        return value
    prefix = f"{where}: " if where else ""
    raise BadNameError(f"{prefix}{what} {show_name(value)} {problem[0]} ({problem[1]})")


def check_run_id(run_id: str) -> str:
    return check_name(run_id, "run id", max_len=MAX_RUN_ID)


def sources_for_flags(flags: dict[str, bool]) -> tuple[str, ...]:
    """The sources a capture section switches on, in canonical order."""
    wanted = {s for flag, srcs in FLAG_SOURCES.items() if flags.get(flag) for s in srcs}
    return tuple(s for s in ALL_SOURCES if s in wanted)
