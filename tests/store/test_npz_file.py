"""The NPZ writer: ``numpy.load`` (and zipfile, read here directly) gets back every array bit
for bit, in order; a member that deflates is deflated, one that does not is stored."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from actstore.store.npz_file import SAMPLE_BYTES, save_npz
from actstore.store.npz_schema import npz_members


def test_members_round_trip_and_only_what_deflates_is_deflated(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    arrays = {
        "layer_00/hidden_in": rng.standard_normal((1, 80, 576)).astype(np.float16),  # noise: stored
        "layer_00/attn_weights": np.tril(np.ones((1, 9, 40, 40), np.float16)),  # deflates well
        "logits": rng.standard_normal((1, 3, 8000)).astype(np.float32),
        "embeddings": rng.standard_normal((1, 2, 8)).astype(np.float32),  # small: deflated anyway
        "qkv_last": np.zeros((30, 64), np.float32),
        "scalar": np.asarray(np.float32(3.5)),
        "empty": np.zeros((0, 4), np.float16),
        "tokens": np.arange(17, dtype=np.int64),
    }
    path = tmp_path / "x.npz"
    save_npz(path, arrays)
    with np.load(path, allow_pickle=False) as got:
        assert list(got.files) == list(arrays)
        for k, want in arrays.items():
            assert got[k].dtype == want.dtype and got[k].shape == want.shape, k
            assert got[k].tobytes() == want.tobytes(), k
    with zipfile.ZipFile(path) as zf:
        assert zf.testzip() is None  # every member's crc holds
        kinds = {i.filename: i.compress_type for i in zf.infolist()}
    assert arrays["layer_00/hidden_in"].nbytes > SAMPLE_BYTES and arrays["logits"].nbytes > SAMPLE_BYTES
    assert kinds == {
        "layer_00/hidden_in.npy": zipfile.ZIP_STORED,
        "layer_00/attn_weights.npy": zipfile.ZIP_DEFLATED,
        "logits.npy": zipfile.ZIP_STORED,
        "embeddings.npy": zipfile.ZIP_DEFLATED,
        "qkv_last.npy": zipfile.ZIP_DEFLATED,
        "scalar.npy": zipfile.ZIP_DEFLATED,
        "empty.npy": zipfile.ZIP_DEFLATED,
        "tokens.npy": zipfile.ZIP_DEFLATED,
    }
    # the import's own checks (headers, sizes, zip-bomb ratio) accept what the export writes
    assert {k: (m.shape, m.dtype) for k, m in npz_members(path).items()} == {
        k: (a.shape, a.dtype) for k, a in arrays.items()
    }


def test_the_same_arrays_as_numpys_own_writer(tmp_path: Path) -> None:
    """Same members, same bytes once loaded, and a file no more than a tenth bigger than
    numpy's all-deflated one (a stored member is one that deflate shrinks by under 10%)."""
    rng = np.random.default_rng(1)
    arrays = {f"layer_{i:02d}/mlp_act": (rng.standard_normal((1, 30, 1536)) * 10**-i).astype(np.float16)
              for i in range(4)}  # fmt: skip
    save_npz(tmp_path / "ours.npz", arrays)
    np.savez_compressed(tmp_path / "numpy.npz", **arrays)  # type: ignore[arg-type]
    with np.load(tmp_path / "ours.npz") as ours, np.load(tmp_path / "numpy.npz") as theirs:
        assert ours.files == theirs.files
        assert all(ours[k].tobytes() == theirs[k].tobytes() for k in ours.files)
    assert (tmp_path / "ours.npz").stat().st_size <= 1.1 * (tmp_path / "numpy.npz").stat().st_size
