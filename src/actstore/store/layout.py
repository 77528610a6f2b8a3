"""How a run's arrays are shaped, chunked, sharded and compressed.

This is the performance contract of the store. Every step source is one position-major
array: ``(L, T, W)`` for per-layer vectors, ``(L, heads, T, T)`` for attention weights,
``(T, W)`` for embeddings and logits. Arrays are Zarr v3 with sharding:

* a *shard* (one stored object) spans every captured layer, all of W and a block of
  positions sized so a shard stays near ``SHARD_BUDGET`` bytes. A capture writes whole
  shards only (no read-modify-write), so it makes few, large objects.
* an *inner chunk* holds every layer of a few positions (about ``INNER_CHUNK_BYTES``),
  so "this position's vector at every layer", the commonest question, decodes one small
  chunk from one object. Measured on the emotions run: reading two states over all 30
  layers took 17.9 ms with (1 layer x 32 positions) chunks and 2.75 ms with (30 x 8);
  scanning one layer over every position went the other way (5.7 ms -> 39.6 ms), which
  the heatmap and trajectory paths can afford.

Bytes are saved by not storing what can be derived: the residual stream is stored once
per layer *boundary* (hidden_in of layer l+1 is hidden_out of layer l, bit for bit), the
MLP's down_proj input is computed at read time (act * up for gated MLPs, act otherwise),
and attention tiles above the causal diagonal are never written.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from zarr.codecs import ZstdCodec

from actstore.store.integrity import checksummed

SHARD_BUDGET = 64 * 2**20  # bytes of raw data per shard, before compression
INNER_POSITIONS = 32  # positions per inner chunk of a (T, W) array
INNER_CHUNK_BYTES = 512 * 2**10  # target raw size of an all-layers inner chunk
LOGITS_INNER_POSITIONS = 4  # logits rows are wide (a vocabulary), keep one read small
ATTN_TILE = 64  # attention weights are stored in TILE x TILE tiles per (layer, all heads)
MIN_BLOCK, MAX_BLOCK = 64, 4096

# Float activations barely compress: pick the fastest codec of equal ratio, win bytes
# elsewhere. Measured on SmolLM2 float16 activations (603-token prefill, 1 layer x 32
# positions per chunk, one core): zstd-1 1.08x at 577 MB/s (residual) / 1.13x at
# 725 MB/s (MLP); blosc zstd-3 + byte shuffle 1.08x at 299 MB/s / 1.13x at 249 MB/s;
# bit shuffle 1.01x / 1.10x and slower; blosc lz4 1.00x.
COMPRESSOR = ZstdCodec(level=1)
# Every chunk ends in a crc32c of its compressed bytes, so damage is detected on read.
CHUNK_CODECS = checksummed(COMPRESSOR)

STORE_DTYPES = ("float16", "bfloat16", "float32")


def physical_dtype(store_dtype: str) -> np.dtype:
    """The dtype written to Zarr. bfloat16 has no NumPy dtype: it keeps its 16 bits as a
    uint16 view, and the array's ``actstore_dtype`` attribute records the truth."""
    if store_dtype not in STORE_DTYPES:
        raise ValueError(f"store dtype {store_dtype!r} not in {STORE_DTYPES}")
    return np.dtype("uint16") if store_dtype == "bfloat16" else np.dtype(store_dtype)


def bfloat16_to_float32(bits: np.ndarray) -> np.ndarray:
    """Widen bfloat16 bit patterns (uint16) to float32 exactly."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def round_to_bfloat16(x: np.ndarray) -> np.ndarray:
    """Round float32 values to the nearest bfloat16 (ties to even), kept as float32."""
    b = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = (b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000)
    return rounded.view(np.float32)


def derive_down_in(act: Any, up: Any, gated: bool, store_dtype: str) -> Any:
    """mlp_down_in from stored act and up (NumPy or Dask): act * up for gated MLPs, act
    otherwise, rounded once to the store dtype like a stored value would be."""
    if not gated:
        return act
    product = act * up
    if store_dtype == "bfloat16":  # served widened to float32; round as bfloat16 storage would
        if hasattr(product, "map_blocks"):
            return product.map_blocks(round_to_bfloat16, dtype=np.float32)
        return round_to_bfloat16(product)
    return product


def row_entropy(weights: np.ndarray, store_dtype: str) -> np.ndarray:
    """Shannon entropy in nats of every attention row: (heads, rows, keys) stored weights
    -> (rows, heads) float32, with 0 ln 0 = 0. float32 arithmetic (within 1e-6 nats of
    float64 for rows of a few thousand keys) at half float64's time."""
    p = bfloat16_to_float32(weights) if store_dtype == "bfloat16" else np.array(weights, dtype=np.float32)
    logp = np.zeros_like(p)
    np.log(p, out=logp, where=p > 0)
    p *= logp
    return np.ascontiguousarray(-p.sum(axis=-1).T)  # pairwise summation: float32 stays accurate


def _pow2_floor(x: float) -> int:
    p = 1
    while p * 2 <= x:
        p *= 2
    return p


def position_block(bytes_per_position: int, inner: int = INNER_POSITIONS) -> int:
    """Positions per shard so one shard holds about SHARD_BUDGET raw bytes."""
    block = _pow2_floor(max(1, SHARD_BUDGET // max(1, bytes_per_position)))
    return max(inner, MIN_BLOCK, min(MAX_BLOCK, block))


def attn_block(n_layers: int, n_heads: int, itemsize: int) -> int:
    """Rows (and columns) per attention shard: a shard is (L, heads, B, B)."""
    per_square = n_layers * n_heads * itemsize
    side = _pow2_floor(max(1.0, (SHARD_BUDGET / per_square) ** 0.5))
    return max(ATTN_TILE, min(MAX_BLOCK, side))


@dataclass(frozen=True)
class ArraySpec:
    """Shape and chunking of one stored array, with the position axis named."""

    name: str
    shape: tuple[int, ...]
    chunks: tuple[int, ...]  # inner chunk
    shards: tuple[int, ...]
    dtype: np.dtype
    position_axes: tuple[int, ...]  # axes indexed by token position (attention has two)

    @property
    def block(self) -> int:
        """Positions per shard along the (first) position axis."""
        return self.shards[self.position_axes[0]]


def vector_spec(name: str, n_layers: int | None, n_positions: int, width: int, dtype: np.dtype) -> ArraySpec:
    """Spec of a ``(L, T, W)`` array, or ``(T, W)`` when ``n_layers`` is None."""
    layers = n_layers or 1
    per_position = layers * width * dtype.itemsize
    if n_layers is None:
        inner = LOGITS_INNER_POSITIONS if width > 8192 else INNER_POSITIONS
    else:
        inner = max(1, min(INNER_POSITIONS, _pow2_floor(INNER_CHUNK_BYTES / per_position)))
    block = position_block(per_position, inner)
    block = min(block, _round_up(n_positions, inner))
    if n_layers is None:
        return ArraySpec(name, (n_positions, width), (inner, width), (block, width), dtype, (0,))
    return ArraySpec(
        name,
        (n_layers, n_positions, width),
        (n_layers, inner, width),
        (n_layers, block, width),
        dtype,
        (1,),
    )


def attn_spec(n_layers: int, n_heads: int, n_positions: int, dtype: np.dtype, cols: int | None = None) -> ArraySpec:
    """A run's square (L, heads, T, T) array, or with ``cols`` the (L, heads, rows, cols)
    array of the passes' own rows, whose columns are positions in each pass."""
    side = max(n_positions, cols or 0)
    block = min(attn_block(n_layers, n_heads, dtype.itemsize), _round_up(side, ATTN_TILE))
    return ArraySpec(
        "attn_weights",
        (n_layers, n_heads, n_positions, cols or n_positions),
        (1, n_heads, ATTN_TILE, ATTN_TILE),
        (n_layers, n_heads, block, block),
        dtype,
        (2, 3) if cols is None else (2,),
    )


def _round_up(x: int, m: int) -> int:
    return max(m, -(-x // m) * m)


def residual_boundaries(layers: list[int]) -> list[int]:
    """Residual boundaries to store for the captured layers.

    Boundary b is the stream entering layer b (= leaving layer b-1). hidden_in of layer l
    is boundary l and hidden_out is boundary l+1, so all N layers need N+1 boundaries,
    not 2N vectors.
    """
    return sorted({b for layer in layers for b in (layer, layer + 1)})
