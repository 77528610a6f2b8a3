"""mlp_down_in on a bfloat16 store: every read path serves act * up rounded to bfloat16,
checked against the stored bits read straight from Zarr and rounded with plain NumPy."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr

from actstore.capture.runner import capture_run
from actstore.query import states as S
from actstore.scenario import scenario_from_dict
from actstore.store.npz import export_npz
from actstore.store.store import ActStore
from actstore.testing import SAMPLE_MESSAGES, tiny_loaded


def _widen(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bits (uint16) -> float64: they are the top half of a float32."""
    return (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def _round_bf16(x: np.ndarray) -> np.ndarray:
    """Nearest bfloat16 (8 significant bits, ties to even) of normal float64 values."""
    m, e = np.frexp(x)  # x = m * 2**e, 0.5 <= |m| < 1
    return np.ldexp(np.round(m * 256) / 256, e)  # np.round: half to even


@pytest.mark.slow  # subprocesses, a browser or many captures: the full suite runs it
def test_down_in_is_rounded_alike_on_every_path(tmp_path: Path) -> None:
    store = ActStore.open(tmp_path / "store.zarr", create=True)
    sc = scenario_from_dict({
        "name": "bf16", "model": {"id": "tiny", "dtype": "float32", "device": "cpu"},
        "prompt": {"messages": SAMPLE_MESSAGES}, "generation": {"max_new_tokens": 3},
        "capture": {"store_dtype": "bfloat16", "attention_weights": False},
    })  # fmt: skip
    run = store.run(capture_run(sc, store, tiny_loaded("llama"), progress=False).run_id)
    g = zarr.open_group(store=run.group.store, path=run.group.path, mode="r")
    assert "acts/mlp_down_in" not in g  # derived at read time: the path under test
    act, up = (g[f"acts/{s}"] for s in ("mlp_act", "mlp_up"))
    assert act.dtype == up.dtype == np.uint16
    # bfloat16 x bfloat16 is exact in float64 (16 significant bits); round once.
    expected = _round_bf16(_widen(act[...]) * _widen(up[...]))
    assert (expected != _widen(act[...]) * _widen(up[...])).mean() > 0.5  # rounding matters here

    positions = list(range(run.n_positions))
    selected = S.select(run, "mlp_down_in", positions).compute()
    np.testing.assert_array_equal(selected.astype(np.float64), expected, err_msg="states.select")
    np.testing.assert_array_equal(
        run.array("mlp_down_in").compute().astype(np.float64), expected, err_msg="run.array"
    )
    last = S.select(run, "mlp_down_in", [run.final_position], run.layers[1:2]).compute()
    np.testing.assert_array_equal(last[0, 0].astype(np.float64), expected[1, -1])

    # NPZ: one file per forward pass; their rows, in step order, are every position.
    out = export_npz(run, tmp_path / "export", quiet=True) / "prompt_0"  # Activation Lab's layout
    steps = json.loads((out / "steps.json").read_text())["steps"]
    assert len(steps) == run.n_steps
    for i, layer in enumerate(run.layers):
        parts = []
        for step in steps:
            with np.load(out / step["tensors_file"]) as npz:
                parts.append(npz[f"layer_{layer:02d}/mlp_down_in"][0])
        got = np.concatenate(parts).astype(np.float64)
        np.testing.assert_array_equal(got, expected[i], err_msg=f"NPZ export, layer {layer}")


def test_rounding_to_bfloat16_is_torchs_ties_to_even() -> None:
    """float32 -> bfloat16 rounding, bit for bit as torch converts (round to nearest, ties
    to even): random values, and exact ties below both an even and an odd last bit."""
    import torch

    from actstore.store.layout import round_to_bfloat16

    rng = np.random.default_rng(0)
    x = rng.standard_normal(10_000).astype(np.float32) * 10.0 ** rng.integers(-6, 6, 10_000)
    ties = (np.arange(1, 2001, dtype=np.uint32) << np.uint32(16)) | np.uint32(0x8000)  # half way
    ties |= np.uint32(0x3F800000)
    x = np.concatenate([x, ties.view(np.float32), -ties.view(np.float32)])
    want = torch.from_numpy(x).to(torch.bfloat16).float().numpy()
    got = round_to_bfloat16(x)
    assert got.dtype == np.float32
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))
