"""Batched capture equals one-by-one capture: each sequence's stored activations from a
left-padded batch match its batch-size-1 capture within what plain HF itself differs
between the same two batchings (measured here), plus one rounding of the store dtype.
No pad position is stored; token ids, positions and sequence indices are the
tokenizer's own. Arrays are read with zarr directly, not through actstore's reader."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr

from actstore.testing import topic_texts

from .conftest import hf_residuals, write_jsonl

N_SEQ, UNIT, BATCH = 10, 8, 4


def _stored(store: Path, name: str) -> dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per sequence: (residual boundaries (L + 1, n, H) float32, token ids, positions)."""
    root = zarr.open_group(str(store), mode="r")
    out: dict[int, list[Any]] = {}
    for run_id in sorted(root["runs"].group_keys()):
        g = root["runs"][run_id]
        assert g.attrs["run"]["dataset"]["name"] == name
        res = np.asarray(g["acts/residual"][...]).astype(np.float32)
        seq = np.asarray(g["rows/sequence_index"][...])
        tok = np.asarray(g["rows/token_ids"][...])
        pos = np.asarray(g["rows/position"][...])
        assert res.shape[1] == len(seq) == len(tok) == len(pos)
        for s in np.unique(seq):
            assert int(s) not in out, "a sequence stored twice"
            rows = seq == s
            out[int(s)] = [res[:, rows], tok[rows], pos[rows]]
    return {k: (v[0], v[1], v[2]) for k, v in out.items()}


def _ulp16(x: np.ndarray) -> np.ndarray:
    return np.spacing(np.abs(x).astype(np.float16)).astype(np.float32)


def _model(kind: str, tiny_folder: Path, tiny_model_loaded: Any) -> tuple[str, Any]:
    if kind == "tiny":
        return str(tiny_folder), tiny_model_loaded
    if kind == "gpt2":  # absolute position embeddings: wrong position ids would show
        from actstore.testing import tiny_model

        folder = tiny_folder.parent / "tiny-gpt2"
        if not folder.exists():
            m, t = tiny_model("gpt2", seed=5)
            m.save_pretrained(folder)
            t.save_pretrained(folder)
    else:
        from actstore.models.gguf_cache import ensure_embedded_cache

        folder = ensure_embedded_cache()
    from actstore.models.loading import load_model
    from actstore.scenario import ModelConfig

    return str(folder), load_model(ModelConfig(id=str(folder), dtype="float32", device="cpu"))


@pytest.mark.parametrize("kind", ["tiny", "gpt2", pytest.param("smollm2", marks=pytest.mark.slow)])
def test_batched_equals_one_by_one(kind: str, tmp_path: Path, tiny_folder: Path, tiny_model_loaded: Any) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from actstore import capture_dataset

    folder, loaded = _model(kind, tiny_folder, tiny_model_loaded)
    texts = topic_texts(N_SEQ)
    corpus = write_jsonl(tmp_path / "topics.jsonl", [{"text": t, "topic": k} for k, t in texts])
    for bs in (BATCH, 1):
        capture_dataset(str(corpus), str(tmp_path / f"b{bs}"), name="topics", model=folder, loaded=loaded,
                        batch_size=bs, unit_size=UNIT, store_dtype="float16", progress=False)  # fmt: skip
    batched, single = _stored(tmp_path / f"b{BATCH}", "topics"), _stored(tmp_path / "b1", "topics")

    tok = AutoTokenizer.from_pretrained(folder)
    ids = [list(tok(t)["input_ids"]) for _, t in texts]
    assert len({len(s) for s in ids}) > 3, "the corpus must pad: sequences of different lengths"
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype="float32").eval()
    # the batches capture makes: BATCH consecutive sequences within each unit of UNIT
    groups = [list(range(u + b, min(u + b + BATCH, u + UNIT, N_SEQ))) for u in range(0, N_SEQ, UNIT)
              for b in range(0, min(UNIT, N_SEQ - u), BATCH)]  # fmt: skip
    hf_batched: dict[int, np.ndarray] = {}
    for g in groups:
        hf_batched.update(zip(g, hf_residuals(hf, [ids[i] for i in g]), strict=True))
    hf_single = {i: hf_residuals(hf, [ids[i]])[0] for i in range(N_SEQ)}
    # what plain HF itself differs between the two batchings, per boundary
    bound = np.max([np.abs(hf_batched[i] - hf_single[i]).max(axis=(1, 2)) for i in range(N_SEQ)], axis=0)

    assert sorted(batched) == sorted(single) == list(range(N_SEQ))
    for i in range(N_SEQ):
        res_b, tok_b, pos_b = batched[i]
        res_1, tok_1, pos_1 = single[i]
        # every position of the sequence once, no pad: the tokenizer's ids at 0..n-1
        np.testing.assert_array_equal(tok_b, ids[i])
        np.testing.assert_array_equal(pos_b, np.arange(len(ids[i])))
        np.testing.assert_array_equal(tok_1, tok_b)
        np.testing.assert_array_equal(pos_1, pos_b)
        # each capture is plain HF's same batching, rounded once to float16
        for res, ref in ((res_b, hf_batched[i]), (res_1, hf_single[i])):
            assert np.all(np.abs(res - ref) <= _ulp16(ref) * 0.5 + 1e-7), f"sequence {i} differs from HF"
        tol = bound[:, None, None] + _ulp16(np.maximum(np.abs(res_b), np.abs(res_1)))
        assert np.all(np.abs(res_b - res_1) <= tol), f"sequence {i}: batched and one-by-one differ"
