"""Full snapshot and reference passes against separate plain-HF prefills.

Every pass of a capture (each conversation snapshot, the generated-reply one included,
and each reference) is read back whole with ``run.pass_array`` and compared, source by
source and position by position, attention rows included, with a prefill of that
pass's own token ids computed here: ``model(ids, output_hidden_states=True,
output_attentions=True)`` plus forward hooks this file attaches itself, on module paths
it names itself from HF's modeling code (not actstore's architecture table, not its
Recorder). The token ids come from rendering the messages with the chat template
(``render_ids``), never from the store, so the same comparison checks the stored
tokens and which positions a pass borrows from its base.

What the store does and the oracle does not: a pass's leading positions are the run's
(or an earlier reference's) rows, computed in the main prefill, or in decode steps for
the generated-reply snapshot; its own rows come from a short forward pass over a slice
of that KV cache. Causal attention makes both equal to a separate prefill up to float32
summation order (different matmul shapes), which the float32 tolerances below bound.
gemma2's sliding-window cache is never sliced: its passes are full prefills (shared 0).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from actstore import naming
from actstore.capture.prompts import render_ids
from actstore.capture.runner import capture_run
from actstore.query.states import state_vectors
from actstore.store.store import ActStore
from actstore.testing import FAMILIES, counting_store

from .conftest import MESSAGES, REFERENCES, loaded_tiny, make_scenario

NEW_TOKENS = 5

# ---- tolerances -------------------------------------------------------------------------
# float32 store on a float32 model: the stored values are the model's own numbers, so a
# pass differs from a separate prefill only by float32 summation order (a cached pass of
# a few rows, or the main prefill of a longer prompt, against one prefill of the pass).
# Absolute, rtol 0, about 10x the worst difference measured over every family, its
# snapshots, generated-reply snapshot and references (in brackets). A value read from a
# wrong row, layer or pass moves by 1e-2 or more, far outside these.
F32_ATOL = {
    # residual stream, O(1) (gemma/gemma2 scale embeddings by sqrt(hidden) = 8) [8.9e-8, gemma]
    "residual": 1e-6,
    # q/k/v, attention and MLP outputs, O(0.1-1) [3.0e-7, llama mlp_gate]
    "sublayer": 3e-6,
    # attention weights lie in [0, 1], ~1/T here [3.0e-8]
    "attn_weights": 3e-7,
    # logits, O(1) [4.2e-7, gpt_neox]
    "logits": 5e-6,
    # embeddings are a table lookup [0.0]
    "embeddings": 0.0,
}
# float16 store: each stored value is the float32 value rounded once to float16, so it
# is off by at most half an ulp, 2**-11 relative (unit roundoff u) for normal numbers and
# 2**-25 absolute for subnormals, on top of the float32 difference above.
# mlp_down_in of a gated MLP is not stored but derived as act * up from the two stored
# float16 values and rounded again: (1 + u)**3 - 1 < 3.01 u relative.
F16_U = 2.0**-11
F16_SUBNORMAL_HALF_SPACING = 2.0**-25


def _kind(source: str) -> str:
    if source in ("hidden_in", "hidden_out"):
        return "residual"
    if source in ("attn_weights", "logits", "embeddings"):
        return source
    return "sublayer"


def f32_tolerance(source: str) -> dict[str, float]:
    return {"rtol": 0.0, "atol": F32_ATOL[_kind(source)]}


def f16_tolerance(source: str, gated: bool) -> dict[str, float]:
    derived = source == "mlp_down_in" and gated
    roundings = 3.01 if derived else 1.0
    # the float32 difference carried through the rounding; act * up carries both factors'
    # (|act|, |up| < 1 on these models)
    atol = F32_ATOL[_kind(source)] * (2 if derived else 1) * (1 + F16_U)
    return {"rtol": roundings * F16_U, "atol": atol + roundings * F16_SUBNORMAL_HALF_SPACING}


# ---- the oracle: a plain HF prefill with this file's own hooks -------------------------
# Per family: the decoder-layer list and, inside one layer, the module whose output (or
# for "down", input and output) is each source. Paths read off transformers' modeling
# code; "qkv" and "gate_up" are fused projections split below.
_LLAMA_LIKE = (
    "model.layers",
    {
        "q": "self_attn.q_proj",
        "k": "self_attn.k_proj",
        "v": "self_attn.v_proj",
        "attn_out": "self_attn.o_proj",
        "mlp_gate": "mlp.gate_proj",
        "mlp_up": "mlp.up_proj",
        "mlp_act": "mlp.act_fn",
        "down": "mlp.down_proj",
    },
)
SITES: dict[str, tuple[str, dict[str, str]]] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "phi3": (
        "model.layers",
        {
            "qkv": "self_attn.qkv_proj",
            "attn_out": "self_attn.o_proj",
            "gate_up": "mlp.gate_up_proj",
            "mlp_act": "mlp.activation_fn",
            "down": "mlp.down_proj",
        },
    ),
    "gpt2": (
        "transformer.h",
        {
            "qkv": "attn.c_attn",
            "attn_out": "attn.c_proj",
            "mlp_up": "mlp.c_fc",
            "mlp_act": "mlp.act",
            "down": "mlp.c_proj",
        },
    ),
    "gpt_neox": (
        "gpt_neox.layers",
        {
            "qkv": "attention.query_key_value",
            "attn_out": "attention.dense",
            "mlp_up": "mlp.dense_h_to_4h",
            "mlp_act": "mlp.act",
            "down": "mlp.dense_4h_to_h",
        },
    ),
}


def _split_qkv(family: str, fused: torch.Tensor, cfg: Any) -> tuple[torch.Tensor, ...]:
    """q, k, v of a fused projection, split the way the HF attention module splits it."""
    heads = cfg.num_attention_heads
    head_dim = cfg.hidden_size // heads
    if family == "gpt2":  # c_attn(x).split(embed_dim, dim=2)
        return tuple(fused.split(cfg.hidden_size, dim=-1))
    if family == "gpt_neox":  # view(..., heads, 3 * head_dim), then chunk(3) per head
        per_head = fused.reshape(fused.shape[0], heads, 3 * head_dim)
        return tuple(p.reshape(fused.shape[0], heads * head_dim) for p in per_head.chunk(3, dim=-1))
    if family == "phi3":  # q | k | v by width, k and v over the KV heads only
        kv = cfg.num_key_value_heads * head_dim
        return tuple(fused.split([heads * head_dim, kv, kv], dim=-1))
    raise AssertionError(family)


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple | list) else output


@torch.inference_mode()
def hf_prefill(model: Any, family: str, ids: list[int]) -> dict[str, np.ndarray]:
    """Every source at every position of one plain prefill of ``ids``, float32, shaped like
    the store's arrays over all layers: (L, T, W), (L, heads, T, T), (T, W)."""
    container, paths = SITES[family]
    blocks = model.get_submodule(container)
    got: dict[tuple[str, int], torch.Tensor] = {}
    handles = []

    def output_of(name: str, i: int) -> Any:
        def hook(_m: Any, _args: Any, out: Any) -> None:
            got[(name, i)] = _first(out)[0].clone()

        return hook

    def input_of(name: str, i: int) -> Any:
        def hook(_m: Any, args: Any) -> None:
            got[(name, i)] = args[0][0].clone()

        return hook

    try:
        handles.append(model.get_input_embeddings().register_forward_hook(output_of("embeddings", 0)))
        for i, block in enumerate(blocks):
            handles.append(block.register_forward_hook(output_of("hidden_out", i)))
            for name, path in paths.items():
                module = block.get_submodule(path)
                if name == "down":
                    handles.append(module.register_forward_pre_hook(input_of("mlp_down_in", i)))
                    handles.append(module.register_forward_hook(output_of("mlp_down_out", i)))
                else:
                    handles.append(module.register_forward_hook(output_of(name, i)))
        out = model(input_ids=torch.tensor([ids]), output_hidden_states=True, output_attentions=True,
                    use_cache=False)  # fmt: skip
    finally:
        for h in handles:
            h.remove()
    n = len(blocks)
    hs = [h[0] for h in out.hidden_states]  # n + 1 entries, the last after the final norm
    for i in range(n - 1):  # this file's block hooks agree with HF's own hidden states
        torch.testing.assert_close(got[("hidden_out", i)], hs[i + 1], rtol=0, atol=0)
    per_layer: dict[str, list[torch.Tensor]] = {}
    for i in range(n):
        per_layer.setdefault("hidden_in", []).append(hs[i])
        per_layer.setdefault("hidden_out", []).append(hs[i + 1] if i < n - 1 else got[("hidden_out", i)])
        parts = {k: v for (k, j), v in got.items() if j == i and k not in ("hidden_out", "embeddings")}
        if "qkv" in parts:
            parts.update(
                zip(("q", "k", "v"), _split_qkv(family, parts.pop("qkv"), model.config), strict=True)
            )
        if "gate_up" in parts:  # phi3: gate, up = gate_up_proj(x).chunk(2, dim=-1)
            parts.update(zip(("mlp_gate", "mlp_up"), parts.pop("gate_up").chunk(2, dim=-1), strict=True))
        for k, v in parts.items():
            per_layer.setdefault(k, []).append(v)
        per_layer.setdefault("attn_weights", []).append(out.attentions[i][0])
    result = {k: torch.stack(v).float().numpy() for k, v in per_layer.items()}
    result["embeddings"] = got[("embeddings", 0)].float().numpy()
    result["logits"] = out.logits[0].float().numpy()
    return result


# ---- captures, shared per module ---------------------------------------------------------
@dataclass
class Captured:
    family: str
    run: Any
    loaded: Any
    location: str
    # (kind, key) -> the pass's messages and their rendered ids; oracles computed on demand
    passes: dict[tuple[str, int | str], tuple[list[dict[str, str]], list[int]]] = field(default_factory=dict)
    _oracles: dict[tuple[str, int | str], dict[str, np.ndarray]] = field(default_factory=dict)

    def oracle(self, kind: str, key: int | str) -> dict[str, np.ndarray]:
        if (kind, key) not in self._oracles:
            self._oracles[(kind, key)] = hf_prefill(
                self.loaded.model, self.family, self.passes[(kind, key)][1]
            )
        return self._oracles[(kind, key)]


def _capture(tmp_path_factory: Any, family: str, references: Any = REFERENCES, **capture: Any) -> Captured:
    loaded = loaded_tiny(family)
    location = str(tmp_path_factory.mktemp(f"passes-{family}") / "store.zarr")
    store = ActStore.open(location, create=True)
    sc = make_scenario(generation={"max_new_tokens": NEW_TOKENS}, capture=capture, reference_states=references)
    run = store.run(capture_run(sc, store, loaded, progress=False).run_id)
    tok = loaded.tokenizer
    cap = Captured(family, run, loaded, location)
    reply = {"role": "assistant", "content": run.generated_text()}
    for k in range(len(MESSAGES)):
        cap.passes[("snapshot", k)] = (MESSAGES[: k + 1], render_ids(tok, MESSAGES[: k + 1]))
    cap.passes[("snapshot", "generated")] = ([*MESSAGES, reply], render_ids(tok, [*MESSAGES, reply]))
    for ref in references:
        cap.passes[("reference", ref["label"])] = (ref["messages"], render_ids(tok, ref["messages"]))
    return cap


@pytest.fixture(scope="module")
def one_thread() -> Any:
    """Run this module's tiny models on one torch thread: on a busy two-core machine each
    small op otherwise waits ~10 ms for the other intra-op thread (measured: a 60 x 64
    linear 15 ms with two threads, 0.02 ms with one), which made the file take a minute."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", params=FAMILIES)
def f32(request: Any, tmp_path_factory: Any, one_thread: Any) -> Captured:
    """Every family, every source on (attention weights and logits included), float32."""
    return _capture(tmp_path_factory, request.param, store_dtype="float32")


@pytest.fixture(scope="module")
def f16(tmp_path_factory: Any, one_thread: Any) -> Captured:
    return _capture(tmp_path_factory, "llama", store_dtype="float16")


@pytest.fixture(scope="module")
def subset(tmp_path_factory: Any, one_thread: Any) -> Captured:
    """Layers 0 and 2 of 3: the residual boundaries are 0..3 but layer 1 has no hooks."""
    return _capture(tmp_path_factory, "phi3", store_dtype="float32", layers=[0, 2])


def max_differences(cap: Captured) -> dict[str, float]:
    """Worst |stored - oracle| per source over every pass: not a test, how the bracketed
    numbers by the tolerances were measured."""
    worst: dict[str, float] = {}
    for kind, key in cap.passes:
        want = cap.oracle(kind, key)
        for source in cap.run.sources:
            got = cap.run.pass_array(kind, key, source).compute().astype(np.float64)
            ref = want[source][cap.run.layers] if source in naming.LAYER_SOURCES else want[source]
            assert got.shape == ref.shape, (cap.family, kind, key, source, got.shape, ref.shape)
            worst[source] = max(worst.get(source, 0.0), float(np.abs(got - ref).max()))
    return worst


def _assert_passes_match(cap: Captured, tolerance: Any) -> None:
    run = cap.run
    for kind, key in cap.passes:
        want = cap.oracle(kind, key)
        for source in run.sources:
            got = run.pass_array(kind, key, source).compute()
            ref = want[source][run.layers] if source in naming.LAYER_SOURCES else want[source]
            assert got.dtype == np.dtype(run.meta["store_dtype"]), source
            assert got.shape == ref.shape, (cap.family, kind, key, source)
            np.testing.assert_allclose(got.astype(np.float64), ref, **tolerance(source),
                                       err_msg=f"{cap.family} {kind} {key} {source}")  # fmt: skip


# ---- 1. every source of every pass equals a separate prefill -------------------------------
def test_every_pass_equals_a_separate_hf_prefill(f32: Captured) -> None:
    run = f32.run
    # every source the family has, attention weights and logits included
    wanted = {"attn_weights", "logits", "embeddings", "q", "k", "v", "mlp_act", "mlp_down_in"}
    assert wanted <= set(run.sources)
    assert len(f32.passes) == len(run.passes) == len(MESSAGES) + 1 + len(REFERENCES)
    _assert_passes_match(f32, f32_tolerance)


def test_float16_passes_are_one_rounding_from_a_separate_prefill(f16: Captured) -> None:
    run = f16.run
    assert run.meta["store_dtype"] == "float16" and "logits" in run.sources
    gated = bool(run.meta["gated_mlp"])
    _assert_passes_match(f16, lambda source: f16_tolerance(source, gated))


def test_layer_subset_passes_use_real_layer_indices(subset: Captured) -> None:
    run = subset.run
    assert run.layers == [0, 2] and run.meta["residual_boundaries"] == [0, 1, 2, 3]
    assert run.pass_array("snapshot", 0, "q").shape[0] == 2
    _assert_passes_match(subset, f32_tolerance)


# ---- 2. the stored bytes are views ---------------------------------------------------------
def test_passes_store_only_their_own_rows(f32: Captured) -> None:
    run = f32.run
    infos = run.passes
    assert [(p.kind, p.key) for p in infos] == (
        [("snapshot", k) for k in range(len(MESSAGES) + 1)] + [("reference", r["label"]) for r in REFERENCES]
    )
    # own rows follow each other in the passes arrays, nothing else is stored there
    starts = np.cumsum([0] + [p.rows for p in infos])
    assert [p.start for p in infos] == starts[:-1].tolist()
    total = int(starts[-1])
    prefix = naming.PASSES_GROUP + "/" + naming.ACTS_GROUP
    assert run.open_array(f"{naming.PASSES_GROUP}/{naming.TOKENS_ARRAY}").shape == (total,)
    assert run.open_array(f"{prefix}/{naming.RESIDUAL_ARRAY}").shape[1] == total
    assert run.open_array(f"{prefix}/logits").shape[0] == total
    assert run.open_array(f"{prefix}/attn_weights").shape[2:] == (total, max(p.length for p in infos))
    run_tokens = run.tokens().tolist()
    for p in infos:
        assert p.rows == p.length - p.shared >= 0
        # no rows only for a pass the run holds whole (a prefix that ends where the
        # prompt's next turn is the assistant's): then it is the run's first positions
        covered = p.base is None and run_tokens[: p.length] == run.pass_tokens(p.kind, p.key).tolist()
        assert (p.rows == 0) == (covered and f32.family != "gemma2"), p  # gemma2: full prefills
    assert any(p.rows == 0 for p in infos) or f32.family == "gemma2"
    if f32.family == "gemma2":
        return  # no slices of a sliding-window cache: test_sliding_window_passes_are_full_prefills
    snapshots = [p for p in infos if p.kind == "snapshot"]
    refs = [p for p in infos if p.kind == "reference"]
    # every snapshot borrows its leading positions from the run (base None)
    assert all(p.base is None and p.shared > 0 for p in snapshots)
    # each reference after the first borrows the shared system preamble from an earlier one
    for n, p in enumerate(refs[1:], start=1):
        assert p.shared > 0 and p.base is not None, p
        assert infos[p.base].kind == "reference" and infos[p.base].key in [r.key for r in refs[:n]], p
    assert total < sum(p.length for p in infos) / 3


def _common(a: Any, b: Any) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def test_each_pass_shares_all_it_can(f32: Captured) -> None:
    """A pass borrows the longest prefix any base offers (the run's positions for every
    pass, earlier references for a reference), short of its last token, which it always
    runs itself (for the last-token stacks) but stores only when the base lacks it; less
    would still be correct, only stored twice."""
    if f32.family == "gemma2":
        return
    _assert_shares_all_it_can(f32, REFERENCES)


def _assert_shares_all_it_can(cap: Captured, references: Any) -> None:
    run = cap.run
    run_tokens = run.tokens().tolist()
    refs = [cap.passes[("reference", r["label"])][1] for r in references]
    ref_index = {r["label"]: run.passes.index(run.pass_info("reference", r["label"])) for r in references}
    for (kind, key), (_, ids) in cap.passes.items():
        info = run.pass_info(kind, key)
        prior = refs[: refs.index(ids)] if kind == "reference" else []
        best = max(min(_common(ids, c), len(ids) - 1) for c in [run_tokens, *prior])
        if _common(ids, run_tokens) == len(ids):
            best = len(ids)  # held whole by the run: every position is borrowed
        assert info.shared == best, (kind, key, info.shared, best)
        if kind == "reference" and info.base is not None:  # the first earlier reference sharing that much
            first = next(i for i, c in enumerate(prior) if min(_common(ids, c), len(ids) - 1) == best)
            assert info.base == ref_index[references[first]["label"]], (key, info.base)


def test_pass_tokens_are_the_rendered_prefixes(f32: Captured) -> None:
    run = f32.run
    run_tokens = run.tokens()
    assert run_tokens[: run.prompt_len].tolist() == render_ids(f32.loaded.tokenizer, MESSAGES)
    own_tokens = np.asarray(run.open_array(f"{naming.PASSES_GROUP}/{naming.TOKENS_ARRAY}")[...])
    for (kind, key), (_, ids) in f32.passes.items():
        info = run.pass_info(kind, key)
        got = run.pass_tokens(kind, key)
        assert got.tolist() == ids, (kind, key)
        assert info.length == len(ids)
        # the stored rows are the pass's own tokens; the shared part is its base's
        assert own_tokens[info.start : info.start + info.rows].tolist() == ids[info.shared :]
        base = (
            run_tokens
            if info.base is None
            else f32.passes[(run.passes[info.base].kind, run.passes[info.base].key)][1]
        )
        assert list(base[: info.shared]) == ids[: info.shared], (kind, key)
    gen = run.pass_info("snapshot", "generated")
    assert gen.key == len(MESSAGES) and run.snapshot_index[gen.key]["generated"]


# ---- 3. the last-token fast path is unchanged -----------------------------------------------
def _one_rounding(dtype: np.dtype) -> dict[str, float]:
    """One rounding to the store dtype: half an ulp relative, half the subnormal spacing."""
    info = np.finfo(dtype)
    return {"rtol": float(info.eps) / 2, "atol": float(info.smallest_subnormal) / 2}


def _assert_stacks_are_last_rows(cap: Captured) -> float:
    """The stacks hold the vectors of the pass's last token, rounded once to the store
    dtype, so they equal the full pass's last row bit for bit. (A pass the run holds
    whole has no own rows: its stack row is taken from the main prefill, like its full
    pass, when the run captured the stack's sources, as every capture here does.)"""
    run = cap.run
    tol = _one_rounding(np.dtype(run.meta["store_dtype"]))
    worst = 0.0
    labels = [key for kind, key in cap.passes if kind == "reference"]
    for source in naming.RESIDUAL_SOURCES:
        snaps = run.snapshots(source).compute()
        refs = run.references(source).compute()
        assert snaps.shape[0] == len(MESSAGES) + 1 and refs.shape[0] == len(labels)
        rows: list[tuple[str, np.ndarray, int | str]] = [
            *((f"snapshot:{k}", snaps[k], k) for k in range(len(MESSAGES))),
            ("snapshot:generated", snaps[len(MESSAGES)], "generated"),
            *((f"reference:{label}", refs[j], label) for j, label in enumerate(labels)),
        ]
        for state, stacked, key in rows:
            kind = state.split(":")[0]
            last = run.pass_array(kind, key, source)[:, -1].compute()
            queried = state_vectors(run, state, source).compute()
            for got in (stacked, queried):
                assert got.dtype == last.dtype
                np.testing.assert_allclose(got.astype(np.float64), last.astype(np.float64), **tol,
                                           err_msg=f"{cap.family} {state} {source}")  # fmt: skip
                worst = max(worst, float(np.abs(got.astype(np.float64) - last).max()))
    return worst


def test_last_token_stacks_are_the_last_row_of_each_full_pass(f32: Captured) -> None:
    _assert_stacks_are_last_rows(f32)


def test_float16_last_token_stacks_are_the_last_row_of_each_full_pass(f16: Captured) -> None:
    _assert_stacks_are_last_rows(f16)


def test_layer_subset_last_token_stacks_are_the_last_row_of_each_full_pass(subset: Captured) -> None:
    _assert_stacks_are_last_rows(subset)


def test_snapshot_state_still_reads_one_stored_object(f16: Captured) -> None:
    store, cs = counting_store(f16.location)
    run = store.run(f16.run.id)
    for state in ("snapshot:1", "snapshot:generated", "reference:fear"):
        for source in ("hidden_out", "mlp_down_out"):
            cs.reset()
            state_vectors(run, state, source).compute()
            objects = {k for k, _ in cs.data_reads()}
            where = naming.SNAPSHOTS_GROUP if state.startswith("snapshot") else naming.REFERENCES_GROUP
            assert len(objects) == 1, (state, source, objects)
            assert f"/{where}/{source}/" in objects.pop()


# ---- 4. cases that must not break -----------------------------------------------------------
def test_sliding_window_passes_are_full_prefills(f32: Captured) -> None:
    """gemma2's cache is not a plain DynamicCache: every pass is a separate prefill
    (shared 0, all rows its own), still equal to HF's (checked by the test above). Every
    other family slices the cache."""
    run = f32.run
    if f32.family != "gemma2":
        assert all(p.shared > 0 for p in run.passes if p.kind == "snapshot")
        return
    cfg = f32.loaded.model.config
    assert "sliding_attention" in cfg.layer_types
    # the window is shorter than every pass, so its sliding layers differ from full ones
    assert all(cfg.sliding_window < p.length for p in run.passes)
    for p in run.passes:
        assert (p.shared, p.base, p.rows) == (0, None, p.length), p


# ---- 5. snapshots packed into shared forward passes -----------------------------------------
def _count_packed(monkeypatch: Any) -> list[int]:
    """The tokens fed by each packed forward pass (one with a custom mask) from now on."""
    from actstore.capture import prefixes

    packed: list[int] = []
    real = prefixes.forward

    def counting(model: Any, input_ids: torch.Tensor, **kw: Any) -> Any:
        if "attention_mask" in kw:
            packed.append(input_ids.shape[1])
        return real(model, input_ids, **kw)

    monkeypatch.setattr(prefixes, "forward", counting)
    return packed


@pytest.mark.parametrize("pack_tokens", [None, 6])
def test_packed_snapshot_passes_equal_separate_prefills(
    pack_tokens: int | None, tmp_path_factory: Any, one_thread: Any, monkeypatch: Any
) -> None:
    """The conversation snapshots extending the prompt run side by side in one forward
    pass (or, with a small pack size, in several), and every row of them still equals a
    separate prefill of its prefix."""
    from actstore.capture import prefixes

    if pack_tokens is not None:
        monkeypatch.setattr(prefixes, "PACK_TOKENS", pack_tokens)
    packed = _count_packed(monkeypatch)
    cap = _capture(tmp_path_factory, "qwen2", store_dtype="float32")
    snaps = [p for p in cap.run.passes if p.kind == "snapshot" and p.key != len(MESSAGES)]  # not the reply
    fed = sum(p.length - min(p.shared, p.length - 1) for p in snaps)  # covered ones feed their last token
    if pack_tokens is None:
        assert packed == [fed]
    else:
        assert len(packed) >= 2 and all(n <= pack_tokens for n in packed) and sum(packed) <= fed, packed
    _assert_passes_match(cap, f32_tolerance)
    _assert_stacks_are_last_rows(cap)


MORE_REFERENCES = [
    *REFERENCES,  # "I am so happy!", "I am terrified."
    {"label": "calm", "messages": [{"role": "user", "content": "I am calm."}]},
    {"label": "spiders", "messages": [{"role": "user", "content": "I am terrified of spiders."}]},
    {"label": "late", "messages": [{"role": "user", "content": "You are late."}]},
]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_references_seeding_others_run_alone_the_rest_packed(
    family: str, tmp_path_factory: Any, one_thread: Any, monkeypatch: Any
) -> None:
    """joy seeds calm and late (packed together, from joy's cache) and fear; fear seeds
    spiders: each reference still shares the longest prefix any earlier one offers, and
    every row equals a separate prefill."""
    packed = _count_packed(monkeypatch)
    cap = _capture(tmp_path_factory, family, references=MORE_REFERENCES, store_dtype="float32")
    run = cap.run
    base_of = {p.key: p.base for p in run.passes if p.kind == "reference"}
    index = {p.key: i for i, p in enumerate(run.passes) if p.kind == "reference"}
    assert base_of["fear"] == base_of["calm"] == index["joy"] and base_of["spiders"] == index["fear"]
    calm_late = [run.pass_info("reference", k) for k in ("calm", "late")]
    assert sum(p.length - p.shared for p in calm_late) in packed  # one forward pass for both
    _assert_shares_all_it_can(cap, MORE_REFERENCES)
    _assert_passes_match(cap, f32_tolerance)
    _assert_stacks_are_last_rows(cap)


class _EarlierApi(torch.nn.Module):
    """A causal LM with the forward signature of transformers before 5.2x, which named the
    KV cache ``past_key_values`` going in and coming out (``pyproject`` accepts 5.0 on),
    around a current tiny model."""

    def __init__(self, inner: Any) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, input_ids: torch.Tensor, past_key_values: Any = None, use_cache: bool = True) -> Any:
        out = self.inner(input_ids=input_ids, cache=past_key_values, use_cache=use_cache)
        return SimpleNamespace(logits=out.logits, past_key_values=out.cache)


def test_a_cache_goes_in_and_comes_out_under_the_earlier_name() -> None:
    from actstore.capture import prefixes
    from actstore.testing import tiny_model

    inner, _ = tiny_model("llama")
    ids = torch.tensor([[5, 9, 14, 3, 22, 7, 11, 30]])
    whole = inner(input_ids=ids).logits  # HF's own prefill of all eight tokens
    model = _EarlierApi(inner)
    first = prefixes.forward(model, ids[:, :5], last_logits_only=False)
    cache = prefixes.cache_of(first)
    assert cache is not None
    rest = prefixes.forward(model, ids[:, 5:], cache=cache, last_logits_only=False)
    # float32: a pass over a cache differs from a prefill in summation order only (measured 1.8e-7)
    torch.testing.assert_close(rest.logits, whole[:, 5:], rtol=0, atol=1e-5)
