"""NPZ export / import, checked against the store.

A tiny random llama is captured once per store dtype; its README-layout export
(``layout="readme"``) is checked file by file against the seed README's layout and value
by value against the Zarr arrays read directly (not through the reader), then both
layouts are imported and exported again, bit for bit. A hand-made README-layout seed
directory (built with NumPy) covers what our own capture never writes: an mlp_down_in
that is not act * up, and broken directories. Activation Lab's own layout (the default)
is checked against its real files in test_npz_layout.py and test_seed_fixtures.py.
"""

from __future__ import annotations

import itertools
import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner

from actstore import naming
from actstore.errors import SelectionError, StoreError
from actstore.store import npz_file
from actstore.store.npz import export_npz, import_npz
from actstore.store.store import ActStore

MESSAGES = [
    {"role": "system", "content": "You are a calm assistant."},
    {"role": "user", "content": "I am thrilled, the sun is out!"},
    {"role": "assistant", "content": "That sounds lovely."},
]
REFERENCES = [
    {"label": "joy", "messages": [{"role": "user", "content": "I am so happy!"}]},
    {"label": "fear", "messages": [{"role": "user", "content": "I am terrified."}]},
]
RUN_KEYS = ("scenario", "model", "tokenizer", "prompt_token_ids", "prompt_tokens", "env", "created_at")
STEP_KEYS = (
    "step", "kind", "seq_len", "input_token_ids", "input_tokens", "generated_token_id", "generated_token",
    "logit_argmax_id", "logit_argmax_logprob", "top_k", "tensors_file", "tensor_index",
)  # fmt: skip


# ---------------------------------------------------------------------- fixtures


def _capture(tmp: Path, store_dtype: str, layers: Any = "all") -> tuple[ActStore, str]:
    from actstore.capture.runner import capture_run
    from actstore.models.loading import LoadedModel
    from actstore.scenario import scenario_from_dict
    from actstore.testing import tiny_model

    model, tok = tiny_model("llama", attn_implementation="eager")
    loaded = LoadedModel(
        model=model, tokenizer=tok, device=torch.device("cpu"), dtype=torch.float32,
        source="tiny random model", model_id="tiny-llama",
    )  # fmt: skip
    scenario = scenario_from_dict({
        "name": "npz_tiny",
        "model": {"id": "tiny-llama", "dtype": "float32", "device": "cpu"},
        "prompt": {"messages": MESSAGES},
        "generation": {"max_new_tokens": 4},
        "capture": {"hidden_states": True, "attention_weights": True, "qkv": True, "mlp": True,
                    "logits": True, "top_k_probs": 5, "layers": layers, "store_dtype": store_dtype},
        "reference_states": REFERENCES,
    })  # fmt: skip
    store = ActStore.open(tmp / "store.zarr", create=True)
    result = capture_run(scenario, store, loaded, progress=False)
    return store, result.run_id


@pytest.fixture(scope="module")
def f16_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[ActStore, str]:
    return _capture(tmp_path_factory.mktemp("f16"), "float16")


@pytest.fixture(scope="module")
def f16_export(f16_run: tuple[ActStore, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    store, run_id = f16_run
    return export_npz(store.run(run_id), tmp_path_factory.mktemp("export") / run_id, layout="readme", quiet=True)


def _npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _json(path: Path) -> Any:
    return json.loads(path.read_text())


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def _all_files(root: Path) -> dict[str, Path]:
    return {str(p.relative_to(root)): p for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------- export


def test_export_layout_matches_seed(f16_run: tuple[ActStore, str], f16_export: Path) -> None:
    store, run_id = f16_run
    run = store.run(run_id)
    d = f16_export
    assert d.name == run_id and not list(d.parent.glob(".*partial*"))
    run_json = _json(d / "run.json")
    assert set(RUN_KEYS) <= set(run_json) and {"id", "arch"} <= set(run_json["model"])
    assert run_json["prompt_token_ids"] == run.meta["prompt_token_ids"]
    # what a re-import needs to store the run as it was: the scenario asked for float16,
    # and every layer of the tiny llama was captured (its config, read here afresh)
    from actstore.testing import tiny_model

    info = run_json["actstore"]
    n_layers = tiny_model("llama")[0].config.num_hidden_layers
    assert (info["run_id"], info["store_dtype"], info["npz_dtype"]) == (run_id, "float16", "float16")
    assert info["layers"] == list(range(n_layers)) and info["prompt_len"] == len(run_json["prompt_token_ids"])
    steps = _json(d / "steps.json")["steps"]
    assert [s["step"] for s in steps] == list(range(run.n_steps)) == list(range(4))
    L, layers = len(run.layers), run.layers
    arch = run.meta["model"]["arch"]
    H, V, heads = arch["hidden_size"], arch["vocab_size"], arch["num_attention_heads"]
    P = run.prompt_len
    for s in steps:
        assert set(STEP_KEYS) <= set(s)
        assert s["kind"] == ("prefill" if s["step"] == 0 else "decode")
        assert s["tensors_file"] == f"tensors/step_{s['step']:03d}.npz"
        assert len(s["top_k"]) == 5 and {"id", "token", "logprob"} <= set(s["top_k"][0])
        arrays = _npz(d / s["tensors_file"])
        T = P if s["step"] == 0 else 1
        kv = P + s["step"]  # last position of the step + 1
        assert s["seq_len"] == T
        want = {naming.npz_key(la, src) for la in layers for src in naming.LAYER_SOURCES} | {
            "embeddings",
            "logits",
        }
        assert set(arrays) == want == set(s["tensor_index"])
        for key, arr in arrays.items():
            assert s["tensor_index"][key] == {"shape": list(arr.shape), "dtype": "float16"}
            _, src = naming.parse_npz_key(key)
            if src == "attn_weights":
                assert arr.shape == (1, heads, T, kv)
            elif src in ("hidden_in", "hidden_out", "attn_out", "mlp_down_out", "embeddings"):
                assert arr.shape == (1, T, H)
            elif src == "logits":
                assert arr.shape == (1, T, V)
            else:
                assert arr.shape[:2] == (1, T)
    assert L >= 2
    snaps = _json(d / "conversation_snapshots" / "index.json")
    # One per message prefix, then the generated reply as an assistant turn (Activation Lab's flag).
    M = len(MESSAGES)
    assert [(e["index"], e["role"], e["generated"]) for e in snaps] == [
        (i, m["role"], False) for i, m in enumerate(MESSAGES)
    ] + [(M, "assistant", True)]
    assert snaps[1]["content_preview"] == MESSAGES[1]["content"]
    assert snaps[M]["content_preview"] == run.meta["generated_text"][:80]
    gen = _npz(d / f"conversation_snapshots/snapshot_{M:02d}_assistant.npz")
    assert _same_bits(gen[naming.npz_key(layers[0], "hidden_in")], run.snapshots("hidden_in").compute()[M, 0])
    snap = _npz(d / "conversation_snapshots" / "snapshot_01_user.npz")
    assert set(snap) == {naming.npz_key(la, s) for la in layers for s in naming.RESIDUAL_SOURCES}
    assert all(a.shape == (H,) for a in snap.values())
    assert _json(d / "references" / "index.json") == {"labels": ["joy", "fear"]}
    assert set(_npz(d / "references" / "ref_fear.npz")) == set(snap)


def test_export_values_match_zarr(f16_run: tuple[ActStore, str], f16_export: Path) -> None:
    """Compare against the Zarr arrays opened directly, not through the reader."""
    store, run_id = f16_run
    g = zarr.open_group(store.location, mode="r")[f"runs/{run_id}"]
    meta = g.attrs["run"]
    P, bounds = meta["prompt_len"], meta["residual_boundaries"]
    res = g["acts/residual"]
    step1 = _npz(f16_export / "tensors/step_001.npz")
    # step 1 computed position P; layer 1's output is residual boundary 2.
    assert _same_bits(step1["layer_01/hidden_out"][0, 0], res[bounds.index(2), P])
    assert _same_bits(step1["layer_01/hidden_in"][0, 0], res[bounds.index(1), P])
    assert _same_bits(step1["layer_00/q"][0], g["acts/q"][0, P : P + 1])
    assert _same_bits(step1["logits"][0], g["acts/logits"][P : P + 1])
    act, up = g["acts/mlp_act"][1, P : P + 1], g["acts/mlp_up"][1, P : P + 1]
    assert "mlp_down_in" not in g["acts"]  # derived on read, exported as if stored
    assert _same_bits(step1["layer_01/mlp_down_in"][0], act * up)
    assert _same_bits(step1["layer_00/attn_weights"][0], g["acts/attn_weights"][0, :, P : P + 1, : P + 1])
    step0 = _npz(f16_export / "tensors/step_000.npz")
    attn0 = step0["layer_01/attn_weights"][0]
    assert _same_bits(attn0, g["acts/attn_weights"][1, :, :P, :P])
    assert not np.triu(attn0.astype(np.float32), k=1).any()  # zeros above the diagonal
    assert _same_bits(step0["embeddings"][0], g["acts/embeddings"][:P])
    snap = _npz(f16_export / "conversation_snapshots/snapshot_02_assistant.npz")
    assert _same_bits(snap["layer_01/attn_out"], g["snapshots/attn_out"][2, 1])
    ref = _npz(f16_export / "references/ref_joy.npz")
    assert _same_bits(ref["layer_00/hidden_out"], g["references/hidden_out"][0, 0])


def _raw_step(g: Any, source: str, li: int, p0: int, p1: int) -> np.ndarray:
    """One layer's values of one step, sliced from the Zarr arrays opened directly."""
    meta = g.attrs["run"]
    layer, bounds = meta["layers"][li], meta["residual_boundaries"]
    if source in ("hidden_in", "hidden_out"):
        return np.asarray(g["acts/residual"][bounds.index(layer + (source == "hidden_out")), p0:p1])
    if source == "mlp_down_in":  # not stored: the product of its stored parts, in the store dtype
        return np.asarray(g["acts/mlp_act"][li, p0:p1] * g["acts/mlp_up"][li, p0:p1])
    if source == "attn_weights":
        return np.asarray(g["acts/attn_weights"][li, :, p0:p1, :p1])
    return np.asarray(g[f"acts/{source}"][li, p0:p1])


@pytest.mark.parametrize("window", ["default", "one step each", "decode steps in pairs"])
def test_every_step_file_is_the_zarr_slice_however_steps_are_read_together(
    f16_run: tuple[ActStore, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, window: str
) -> None:
    """The export reads consecutive steps together (up to WINDOW_BYTES); each step file
    still holds exactly its own positions: every member, every step, against Zarr."""
    from actstore.store import npz_export

    store, run_id = f16_run
    run = store.run(run_id)
    g = zarr.open_group(store.location, mode="r")[f"runs/{run_id}"]
    P, n = run.prompt_len, run.n_steps
    if window != "default":
        per_position = sum(
            (np.prod(a.shape[:-2]) * a.shape[-1] if a.ndim >= 3 else a.shape[-1]) * a.dtype.itemsize
            for a in (run.array(s) for s in run.sources)
        )  # fmt: skip
        budget = 1 if window == "one step each" else 2 * per_position
        monkeypatch.setattr(npz_export, "WINDOW_BYTES", budget)
        arrays = {s: run.array(s) for s in run.sources}
        want = [[i] for i in range(n)] if window == "one step each" else [[0], [1, 2], [3]]
        assert npz_export._windows(run, list(range(n)), arrays) == want
    d = export_npz(run, tmp_path / run_id, layout="readme", quiet=True)
    compared = 0
    for step in range(n):
        p0, p1 = (0, P) if step == 0 else (P + step - 1, P + step)
        got = _npz(d / f"tensors/step_{step:03d}.npz")
        for li, layer in enumerate(run.layers):
            for source in naming.LAYER_SOURCES:
                assert _same_bits(got[naming.npz_key(layer, source)][0], _raw_step(g, source, li, p0, p1)), (step, source)
                compared += 1
        assert _same_bits(got["embeddings"][0], np.asarray(g["acts/embeddings"][p0:p1]))
        assert _same_bits(got["logits"][0], np.asarray(g["acts/logits"][p0:p1]))
    assert compared == n * len(run.layers) * len(naming.LAYER_SOURCES)


def test_failed_export_leaves_nothing(
    f16_run: tuple[ActStore, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, run_id = f16_run
    real = npz_file.save_npz

    def flaky(file: Any, arrays: Any) -> None:
        if str(file).endswith("step_002.npz"):
            raise KeyboardInterrupt  # as if killed half-way
        real(file, arrays)

    monkeypatch.setattr(npz_file, "save_npz", flaky)
    with pytest.raises(KeyboardInterrupt):
        export_npz(store.run(run_id), tmp_path / "out" / run_id, quiet=True)
    assert not (tmp_path / "out").exists()  # the folder the export made goes too
    monkeypatch.undo()
    export_npz(store.run(run_id), tmp_path / "out" / run_id, quiet=True)
    with pytest.raises(StoreError, match="already exists"):
        export_npz(store.run(run_id), tmp_path / "out" / run_id, quiet=True)
    assert export_npz(store.run(run_id), tmp_path / "out" / run_id, quiet=True, overwrite=True).is_dir()
    assert [p.name for p in (tmp_path / "out").iterdir()] == [run_id]


def _round_trip(store: ActStore, run_id: str, tmp: Path, layout: str) -> tuple[Path, Path, str]:
    from actstore.store.npz import import_npz_dirs, read_seed_dirs

    first = export_npz(store.run(run_id), tmp / "a" / run_id, layout=layout, quiet=True)
    [new_id] = import_npz_dirs(store, read_seed_dirs(first), quiet=True)
    second = export_npz(store.run(new_id), tmp / "b" / new_id, layout=layout, quiet=True)
    return first, second, new_id


def _assert_dirs_equal(first: Path, second: Path) -> None:
    a, b = _all_files(first), _all_files(second)
    assert set(a) == set(b)
    for rel, path in a.items():
        if rel.endswith(".npz"):
            x, y = _npz(path), _npz(b[rel])
            assert list(x) == list(y), rel
            for k in x:
                assert _same_bits(x[k], y[k]), f"{rel}: {k}"
        elif rel.endswith("run.json"):
            x, y = _json(path), _json(b[rel])
            assert {k: x[k] for k in RUN_KEYS} == {k: y[k] for k in RUN_KEYS}
            assert x.get("generated_text") == y.get("generated_text")
            for info in (x["actstore"], y["actstore"]):  # the run ids; the import's own scenario run
                info.pop("run_id"), info.pop("scenario_run")
            assert x["actstore"] == y["actstore"]
        else:
            assert _json(path) == _json(b[rel]), rel


@pytest.mark.parametrize(
    "store_dtype,layers,layout",
    [("float16", "all", "lab"), pytest.param("bfloat16", [1], "lab", marks=pytest.mark.slow),  # its own capture
     ("float16", "all", "readme")],  # fmt: skip
)
def test_round_trip_is_lossless(
    tmp_path: Path, store_dtype: str, layers: Any, layout: str, request: pytest.FixtureRequest
) -> None:
    # float16 reuses the module's capture (imports only add runs); bfloat16 captures a subset.
    store, run_id = (
        request.getfixturevalue("f16_run") if layers == "all" else _capture(tmp_path, store_dtype, layers)
    )
    first, second, new_id = _round_trip(store, run_id, tmp_path, layout)
    _assert_dirs_equal(first, second)
    info = _json(next(first.rglob("run.json")))["actstore"]
    if store_dtype == "bfloat16":
        assert info["npz_dtype"] == "float32"
    # The imported run is stored like the captured one: same arrays, attrs, bits. Its full
    # passes are whole (shared=0: as the files hold them), the captured run's are views
    # over the run's positions (store/passes.py): the same values, stored differently.
    # The readme layout holds last-token vectors only: no passes come back.
    root = zarr.open_group(store.location, mode="r")
    ga, gb = root[f"runs/{run_id}"], root[f"runs/{new_id}"]
    arrays_a = sorted(p for p, _ in ga.members(max_depth=None) if isinstance(_, zarr.Array))
    arrays_b = sorted(p for p, _ in gb.members(max_depth=None) if isinstance(_, zarr.Array))

    def run_arrays(paths: list[str]) -> list[str]:
        return [p for p in paths if not p.startswith("passes/")]

    assert run_arrays(arrays_a) == run_arrays(arrays_b) and "acts/mlp_down_in" not in arrays_b
    for p in run_arrays(arrays_a):
        assert dict(ga[p].attrs) == dict(gb[p].attrs), p
        assert ga[p].chunks == gb[p].chunks and ga[p].shards == gb[p].shards, p
        assert _same_bits(ga[p][...], gb[p][...]), p
    a, b = store.run(run_id), store.run(new_id)
    ma, mb = dict(ga.attrs["run"]), dict(gb.attrs["run"])
    assert mb.pop("imported_from") == str((first if layout == "readme" else first / "prompt_0").absolute())
    # A capture already in this store: the import is a scenario run of its own.
    assert (ma.pop("scenario_run"), mb.pop("scenario_run")) == (run_id, new_id)
    if layout == "lab":  # the directory's name and scenario.json, for the next export
        assert mb.pop("scenario_dir") == {"name": first.name, "scenario": _json(first / "scenario.json")}
    pa, pb = ma.pop("passes"), mb.pop("passes")
    if layout == "readme":
        assert pb == [] and not any(p.startswith("passes/") for p in arrays_b)
        mb.pop("token_strings"), ma.pop("token_strings")  # spells the snapshot tokens, which it lacks
    else:
        assert [(p["kind"], p["key"], p["length"]) for p in pa] == [(p["kind"], p["key"], p["length"]) for p in pb]
        assert all(p["shared"] == 0 for p in pb) and any(p["shared"] > 0 for p in pa)
        for p in a.passes:
            assert _same_bits(a.pass_tokens(p.kind, p.key), b.pass_tokens(p.kind, p.key))
            # Activation Lab's files leave v out (its qkv_last, kept, came from it)
            with pytest.raises(SelectionError, match="full passes hold no 'v'"):
                b.pass_array(p.kind, p.key, "v")
            assert b.pass_qkv_last(p.kind, p.key) is not None and a.pass_qkv_last(p.kind, p.key) is None
            for source in (s for s in a.sources if s != "v"):
                want, got = a.pass_array(p.kind, p.key, source).compute(), b.pass_array(p.kind, p.key, source).compute()
                assert _same_bits(got, want), (p, source)
        assert "passes/acts/mlp_down_in" not in arrays_b  # it derives, as in the capture
    assert ma == mb
    ea = next(e for e in store.catalog_entries() if e["id"] == run_id)
    eb = next(e for e in store.catalog_entries() if e["id"] == new_id)
    assert {**ea, "id": None, "scenario_run": None} == {**eb, "id": None, "scenario_run": None}


# ---------------------------------------------------------------------- hand-made seed dirs


def make_seed_dir(
    root: Path,
    *,
    store_dtype: str = "float16",
    down_in: str = "differs_from_step_1",
    residual_mismatch: bool = False,
    layers: tuple[int, ...] = (0, 1),
    n_steps: int = 3,
) -> Path:
    """A run directory as the original tool writes it, built with NumPy."""
    rng = np.random.default_rng(0)
    P, H, W_MLP, heads, V = 5, 8, 12, 2, 16
    L, N = len(layers), P + n_steps - 1
    np_dtype = np.float16 if store_dtype == "float16" else np.float32

    def bf(x: np.ndarray) -> np.ndarray:
        if store_dtype == "bfloat16":  # bfloat16 values written as float32, as the seed does
            x = (x.view(np.uint32) & 0xFFFF0000).view(np.float32)
        return x

    def rand(*shape: int) -> np.ndarray:
        return bf(rng.standard_normal(shape).astype(np_dtype))

    resid = rand(L + 1, N, H)  # boundary b enters layer b
    src = {s: rand(L, N, w) for s, w in (("q", H), ("k", H // 2), ("v", H // 2), ("attn_out", H),
                                          ("mlp_gate", W_MLP), ("mlp_up", W_MLP), ("mlp_act", W_MLP), ("mlp_down_out", H))}  # fmt: skip
    src["mlp_down_in"] = src["mlp_act"] * src["mlp_up"]
    if down_in == "differs_from_step_1":  # e.g. captured in the model dtype, not the store dtype
        src["mlp_down_in"][:, P:] += np.asarray(0.5, np_dtype)
    if store_dtype == "bfloat16":  # rounded to the model's bfloat16: not the reader's float32 product
        src["mlp_down_in"] = bf(src["mlp_down_in"])
    attn = np.tril(rand(L, heads, N, N))
    emb, logits = rand(N, H), rand(N, V)
    ids = list(range(3, 3 + N))
    d = root / "seed_run"
    (d / "tensors").mkdir(parents=True)
    steps = []
    for s in range(n_steps):
        p0, p1 = (0, P) if s == 0 else (P + s - 1, P + s)
        arrays: dict[str, np.ndarray] = {}
        for i, la in enumerate(layers):
            arrays[naming.npz_key(la, "hidden_in")] = resid[i, p0:p1][None]
            out = resid[i + 1, p0:p1].copy()
            if residual_mismatch and i == 0:
                out[0, 0] += np.asarray(1, np_dtype)
            arrays[naming.npz_key(la, "hidden_out")] = out[None]
            for name, x in src.items():
                arrays[naming.npz_key(la, name)] = x[i, p0:p1][None]
            arrays[naming.npz_key(la, "attn_weights")] = attn[i, :, p0:p1, :p1][None]
        arrays["embeddings"], arrays["logits"] = emb[p0:p1][None], logits[p0:p1][None]
        rel = naming.step_file(s)
        np.savez_compressed(d / rel, **arrays)
        steps.append({
            "step": s, "kind": "prefill" if s == 0 else "decode", "seq_len": p1 - p0,
            "input_token_ids": ids[p0:p1], "input_tokens": [f"t{t}" for t in ids[p0:p1]],
            "generated_token_id": ids[p1] if p1 < N else 7, "generated_token": "\u0120x",
            "logit_argmax_id": 7, "logit_argmax_logprob": -0.25,
            "top_k": [{"id": 7, "token": "\u0120x", "logprob": -0.25}], "tensors_file": rel,
            "tensor_index": {k: {"shape": list(a.shape), "dtype": str(a.dtype)} for k, a in arrays.items()},
        })  # fmt: skip
    (d / "steps.json").write_text(json.dumps({"steps": steps}))
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"}]
    run_json = {
        "scenario": {"name": "seed_run", "model": {"id": "seed/tiny", "dtype": "float32"},
                     "prompt": {"messages": messages}, "capture": {"store_dtype": store_dtype}},
        "model": {"id": "seed/tiny", "arch": {"num_layers": 4, "hidden_size": H, "num_attention_heads": heads,
                                              "num_key_value_heads": 1, "layers_path": "model.layers"}},
        "tokenizer": {"vocab_size": V, "eos_token_id": 2, "has_chat_template": True},
        "prompt_token_ids": ids[:P], "prompt_tokens": [f"t{t}" for t in ids[:P]],
        "env": {"python": "3.11", "torch": "2.3", "device": "mps"}, "created_at": "2025-01-02T03:04:05+00:00",
    }  # fmt: skip
    (d / "run.json").write_text(json.dumps(run_json))
    (d / "conversation_snapshots").mkdir()
    index = [{"index": i, "role": m["role"], "content_preview": m["content"]} for i, m in enumerate(messages)]
    (d / "conversation_snapshots" / "index.json").write_text(json.dumps(index))
    for e in index:
        vecs = {naming.npz_key(la, s): rand(H) for la in layers for s in naming.RESIDUAL_SOURCES}
        np.savez_compressed(d / naming.snapshot_file(e["index"], e["role"]), **vecs)
    (d / "references").mkdir()
    (d / "references" / "index.json").write_text(json.dumps({"labels": ["calm"]}))
    np.savez_compressed(d / naming.reference_file("calm"),
                        **{naming.npz_key(la, s): rand(H) for la in layers for s in naming.RESIDUAL_SOURCES})  # fmt: skip
    return d


@pytest.fixture
def store(tmp_path: Path) -> ActStore:
    return ActStore.open(tmp_path / "store.zarr", create=True)


@pytest.mark.parametrize("store_dtype", ["float16", "bfloat16"])
def test_import_seed_dir_keeps_explicit_mlp_down_in(
    tmp_path: Path, store: ActStore, store_dtype: str
) -> None:
    d = make_seed_dir(tmp_path, store_dtype=store_dtype, layers=(0, 1))
    run_id = import_npz(store, d, quiet=True)
    run = store.run(run_id)
    g = zarr.open_group(store.location, mode="r")[f"runs/{run_id}"]
    assert "mlp_down_in" in g["acts"]  # float16: step 0 matched act*up, step 1 did not: back-filled
    assert run.meta["gated_mlp"] is True and run.meta["store_dtype"] == store_dtype
    assert run.meta["residual_boundaries"] == [0, 1, 2] and g["acts/residual"].shape[0] == 3
    assert run.meta["model"]["arch"]["layers_path"] == "model.layers"  # seed keys kept
    assert run.passes == []  # README-layout snapshots and references: last-token vectors only
    for s in range(3):
        arrays = _npz(d / naming.step_file(s))
        pos = run.step_positions(s)
        got = run.array("mlp_down_in")[:, pos.start : pos.stop].compute()
        for i, la in enumerate((0, 1)):
            assert _same_bits(got[i], arrays[naming.npz_key(la, "mlp_down_in")][0])
    again = export_npz(run, tmp_path / "again", layout="readme", quiet=True)
    for rel, path in _all_files(d).items():
        if rel.endswith(".npz"):
            x, y = _npz(path), _npz(again / rel)
            assert set(x) == set(y) and all(_same_bits(x[k], y[k]) for k in x), rel
    assert _json(again / "references/index.json") == {"labels": ["calm"]}


def test_import_seed_dir_drops_derivable_mlp_down_in(tmp_path: Path, store: ActStore) -> None:
    d = make_seed_dir(tmp_path, down_in="equal", layers=(0, 2))
    run = store.run(import_npz(store, d, quiet=True))
    assert "mlp_down_in" not in run.group["acts"]
    assert run.layers == [0, 2] and run.meta["residual_boundaries"] == [0, 1, 2, 3]
    pos = run.step_positions(2)
    last = _npz(d / naming.step_file(2))
    assert _same_bits(run.array("mlp_down_in")[1, pos.start].compute(), last["layer_02/mlp_down_in"][0, 0])
    assert _same_bits(run.array("hidden_out")[0, pos.start].compute(), last["layer_00/hidden_out"][0, 0])


def test_import_refuses_residual_mismatch(tmp_path: Path, store: ActStore) -> None:
    d = make_seed_dir(tmp_path, residual_mismatch=True)
    with pytest.raises(StoreError, match=r"layer_0\d/hidden_(in|out) differs from layer_0\d/hidden_(in|out)"):
        import_npz(store, d, quiet=True)
    assert store.run_ids() == [] and store.orphans() == []


def _corrupt(d: Path, how: str) -> str:
    if how == "no_run_json":
        (d / "run.json").unlink()
        return "run.json: missing"
    if how == "bad_json":
        (d / "steps.json").write_text("{not json")
        return "steps.json: not valid JSON"
    if how == "no_steps":
        (d / "steps.json").write_text(json.dumps({"steps": []}))
        return "steps.json: expected"
    if how == "step_order":
        steps = _json(d / "steps.json")
        steps["steps"][1]["step"] = 5
        (d / "steps.json").write_text(json.dumps(steps))
        return r"steps.json: steps\[1\]: 'step' is 5"
    if how == "missing_npz":
        (d / "tensors/step_002.npz").unlink()
        return r"steps\[2\]: tensors_file 'tensors/step_002.npz' not found"
    if how == "bad_npz":
        (d / "tensors/step_001.npz").write_bytes(b"not a zip")
        return "step_001.npz: not a readable NPZ"
    if how == "bad_shape":
        arrays = _npz(d / "tensors/step_001.npz")
        arrays["layer_00/q"] = arrays["layer_00/q"][:, :, :3]
        np.savez_compressed(d / "tensors/step_001.npz", **arrays)
        return r"step_001.npz: layer_00/q has shape \[1, 1, 3\], expected \[1, 1, 8\]"
    if how == "extra_key":
        arrays = _npz(d / "tensors/step_001.npz")
        arrays["layer_05/q"] = arrays["layer_00/q"]
        np.savez_compressed(d / "tensors/step_001.npz", **arrays)
        return r"step_001.npz: keys \['layer_05/q'\] are not in step 0"
    raise AssertionError(how)


@pytest.mark.parametrize(
    "how",
    ["no_run_json", "bad_json", "no_steps", "step_order", "missing_npz", "bad_npz", "bad_shape", "extra_key"],
)
def test_import_corrupt_dir_raises_store_error(tmp_path: Path, store: ActStore, how: str) -> None:
    d = make_seed_dir(tmp_path)
    pattern = _corrupt(d, how)
    with pytest.raises(StoreError, match=pattern) as info:
        import_npz(store, d, quiet=True)
    assert "\n" not in str(info.value)
    assert store.run_ids() == [] and store.orphans() == []


def test_corrupt_zip_member_is_store_error(tmp_path: Path, store: ActStore) -> None:
    d = make_seed_dir(tmp_path)
    path = d / "tensors/step_000.npz"
    with zipfile.ZipFile(path, "a") as z:
        z.writestr("extra.npy", b"junk")
    with pytest.raises(StoreError, match="step_000.npz: extra: not a readable .npy array"):
        import_npz(store, d, quiet=True)


# ---------------------------------------------------------------------- CLI


def test_cli_round_trip(tmp_path: Path) -> None:
    from actstore.cli import main

    location = str(tmp_path / "cli.zarr")
    seed = make_seed_dir(tmp_path)
    cli = CliRunner()
    r = cli.invoke(main, ["import", "npz", str(seed), "--store", location, "-q"])
    assert r.exit_code == 0, r.output
    run_id = r.output.strip()
    r = cli.invoke(main, ["export", "npz", run_id, "--store", location, "--out", str(tmp_path / "out"), "-q"])
    # Activation Lab's layout needs full passes; this README-layout import has vectors only.
    assert r.exit_code == 2 and "export it with --layout readme" in r.stderr, r.output
    r = cli.invoke(main, ["export", "npz", run_id, "--store", location, "--out", str(tmp_path / "out"), "-q",
                          "--layout", "readme"])  # fmt: skip
    assert r.exit_code == 0, r.output
    out = Path(r.output.strip())
    assert out == tmp_path / "out" / run_id and (out / "steps.json").is_file()
    r = cli.invoke(main, ["import", "npz", str(out), "--store", location, "-q"])
    assert r.exit_code == 0, r.output
    assert len(ActStore.open(location).run_ids()) == 2


def test_cli_bad_dir_is_one_line_exit_2(tmp_path: Path) -> None:
    from actstore.cli import main

    r = CliRunner().invoke(
        main, ["import", "npz", str(tmp_path / "nope"), "--store", str(tmp_path / "s.zarr")]
    )
    assert r.exit_code == 2
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "nope" in lines[0]


def test_the_export_bar_names_the_run_and_counts_its_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a terminal, exporting a run shows one bar named after it that ends at the number
    of NPZ files written (counted on disk)."""
    import io
    import re

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    store = ActStore.open(str(tmp_path / "s.zarr"), create=True)
    run = store.run(import_npz(store, make_seed_dir(tmp_path), quiet=True))
    err = Terminal()
    monkeypatch.setattr("sys.stderr", err)
    out = export_npz(run, tmp_path / "out", layout="readme", quiet=False)
    n = len(list(Path(out).rglob("*.npz")))
    last = err.getvalue().replace("\r", "\n").strip().splitlines()[-1]
    assert n > 0 and re.match(rf"export {re.escape(run.id)}: 100%.* {n}/{n} ", last), last


def cli_loads(args: list[str], modules: tuple[str, ...] = ("torch", "transformers")) -> list[str]:
    """Run ``actstore ARGS`` in a fresh interpreter: its exit code, then for each of
    ``modules`` whether the command loaded it ("True"/"False")."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from actstore.cli import main\n"
        "try:\n"
        f"    main({args!r})\n"
        "except SystemExit as e:\n"
        f"    print(e.code, *(m in sys.modules for m in {modules!r}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    words = out.stdout.split()[-1 - len(modules):]
    assert len(words) == 1 + len(modules), out.stdout + out.stderr
    return words


def test_an_export_does_not_load_torch(f16_run: tuple[ActStore, str], tmp_path: Path) -> None:
    """Only capture needs torch: ``actstore export npz`` in a fresh interpreter writes the
    files without loading it (3 s of start-up here; the import's twin is in
    test_seed_fixtures.py)."""
    store, run_id = f16_run
    args = ["export", "npz", run_id, "--store", str(store.location), "--out", str(tmp_path), "--layout", "readme", "-q"]
    assert cli_loads(args, ("torch",)) == ["0", "False"]
    assert (tmp_path / run_id / "steps.json").exists()


def test_steps_read_together_stay_within_the_window_budget(
    f16_run: tuple[ActStore, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each group of steps the export reads at once holds at most WINDOW_BYTES of values
    (a step bigger than that alone), counted here from the slices themselves: every
    source's values at the step's positions, attention with all its keys."""
    from actstore.store import npz_export

    store, run_id = f16_run
    run = store.run(run_id)
    arrays = {s: run.array(s) for s in run.sources}

    def step_bytes(step: int) -> int:
        r = run.step_positions(step)
        pos = slice(r[0], r[-1] + 1)
        total = 0
        for a in arrays.values():
            part = a[:, :, pos] if a.ndim == 4 else a[:, pos] if a.ndim == 3 else a[pos]
            total += part.nbytes
        return total

    steps = list(range(run.n_steps))
    for budget in (step_bytes(1) * 2, step_bytes(1) * 3 - 1, step_bytes(0)):
        monkeypatch.setattr(npz_export, "WINDOW_BYTES", budget)
        groups = npz_export._windows(run, steps, arrays)
        assert [s for g in groups for s in g] == steps
        for g in groups:
            assert g == list(range(g[0], g[-1] + 1))
            assert len(g) == 1 or sum(step_bytes(s) for s in g) <= budget, (budget, g)
        # as many steps as fit: no group could take its next neighbour
        for g, nxt in itertools.pairwise(groups):
            assert sum(step_bytes(s) for s in g) + step_bytes(nxt[0]) > budget, (budget, g)
