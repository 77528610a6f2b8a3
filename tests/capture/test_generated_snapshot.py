"""The generated-reply snapshot (Activation Lab's last snapshot): the conversation with
the reply appended as an assistant turn, against HF's own forward pass of that prompt
rendered independently, and ``snapshot:generated`` as a query state."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from actstore.capture.runner import capture_run
from actstore.cli import main
from actstore.errors import SelectionError
from actstore.query import compare_states, parse_state, parse_state_pair, state_vectors
from query.synth import write_synthetic_run

from .conftest import MESSAGES, hf_forward, loaded_tiny, make_scenario


def _chat_ids(tok: Any, messages: list[dict[str, str]]) -> list[int]:
    # Tokenized by the template call itself, not actstore's render-then-tokenize.
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    return list(ids)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_generated_snapshot_equals_hf_forward_of_the_reply_prompt(family: str, store: Any) -> None:
    loaded = loaded_tiny(family)
    run = store.run(capture_run(make_scenario(generation={"max_new_tokens": 6}), store, loaded,
                                progress=False).run_id)  # fmt: skip
    tok = loaded.tokenizer
    reply = tok.decode(run.meta["generated_token_ids"], skip_special_tokens=True)
    assert reply and reply == run.meta["generated_text"]  # an empty reply would test little
    ids = _chat_ids(tok, [*MESSAGES, {"role": "assistant", "content": reply}])
    hs = [h[0, -1].numpy() for h in hf_forward(loaded.model, np.asarray(ids)).hidden_states]
    M = len(MESSAGES)
    assert run.snapshot_index[M] == {"index": M, "role": "assistant", "content_preview": reply[:80],
                                     "generated": True}  # fmt: skip
    assert [s["generated"] for s in run.snapshot_index[:M]] == [False] * M
    hin, hout = run.snapshots("hidden_in").compute(), run.snapshots("hidden_out").compute()
    assert hin.shape[0] == M + 1
    # float32 on CPU: the capture reuses the decode's KV cache (other matmul shapes and
    # summation order than one full pass), so equal to ~1e-6, not bit for bit.
    for li in range(len(run.layers)):
        np.testing.assert_allclose(hin[M, li], hs[li], atol=1e-4, rtol=1e-4)
        if li < len(run.layers) - 1:  # HF's last hidden state is after the final norm
            np.testing.assert_allclose(hout[M, li], hs[li + 1], atol=1e-4, rtol=1e-4)
    # Not trivially equal to the last message's snapshot.
    assert not np.allclose(hin[M, -1], hin[M - 1, -1], atol=1e-3)


def test_generated_snapshot_after_eos_drops_the_special_token(store: Any) -> None:
    """A reply that ends at EOS: the EOS is fed to no pass and skipped when decoded, so
    the appended turn is the text alone, as Activation Lab decodes it."""
    loaded = loaded_tiny("llama")
    first = capture_run(make_scenario(generation={"max_new_tokens": 3}), store, loaded, progress=False)
    eos = store.run(first.run_id).meta["generated_token_ids"][1]
    loaded.model.generation_config.eos_token_id = eos  # make the second token end the reply
    try:
        run = store.run(capture_run(make_scenario(generation={"max_new_tokens": 3}), store, loaded,
                                    progress=False).run_id)  # fmt: skip
    finally:
        loaded.model.generation_config.eos_token_id = loaded.tokenizer.eos_token_id
    assert run.meta["generated_token_ids"][-1] == eos and run.n_steps == 2
    tok = loaded.tokenizer
    reply = tok.decode(run.meta["generated_token_ids"], skip_special_tokens=True)
    ids = _chat_ids(tok, [*MESSAGES, {"role": "assistant", "content": reply}])
    hs = hf_forward(loaded.model, np.asarray(ids)).hidden_states
    np.testing.assert_allclose(run.snapshots("hidden_in").compute()[-1, 1], hs[1][0, -1].numpy(),
                               atol=1e-4, rtol=1e-4)  # fmt: skip


def test_snapshot_generated_is_a_state_like_its_row(store: Any) -> None:
    loaded = loaded_tiny("llama")
    run = store.run(capture_run(make_scenario(), store, loaded, progress=False).run_id)
    M = len(MESSAGES)
    assert parse_state("snapshot:generated").arg == "generated"
    assert parse_state_pair("snapshot:generated:reference:joy")[0] == parse_state("snapshot:generated")
    for source in ("hidden_in", "attn_out"):
        v = state_vectors(run, "snapshot:generated", source).compute()
        np.testing.assert_array_equal(v, state_vectors(run, f"snapshot:{M}", source).compute())
        np.testing.assert_array_equal(v, state_vectors(run, "snapshot:-1", source).compute())
    by_name = compare_states(run, "snapshot:generated", "reference:joy", sources=["hidden_out"])
    by_row = compare_states(run, f"snapshot:{M}", "reference:joy", sources=["hidden_out"])
    cols = [c for c in by_name.columns if c not in ("state_a", "run")]
    assert set(by_name["state_a"]) == {"snapshot:generated"}
    np.testing.assert_array_equal(by_name[cols].to_numpy(), by_row[cols].to_numpy())
    # The reference itself, by hand: the cosine is of the stored rows.
    a = run.snapshots("hidden_out").compute()[M].astype(np.float64)
    b = run.references("hidden_out").compute()[0].astype(np.float64)
    cos = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    np.testing.assert_allclose(by_name["cosine"].to_numpy(), cos, rtol=1e-5)
    res = CliRunner().invoke(main, ["query", "cosine", "--compare", "snapshot:generated:final",
                                    "--format", "csv", "--store", store.location])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "snapshot:generated" in res.output
    # inspect lists each snapshot's full pass: its tokens and the rows stored for it
    res = CliRunner().invoke(main, ["inspect", run.id, "--store", store.location])
    assert res.exit_code == 0, res.output
    gen = run.pass_info("snapshot", "generated")
    line = next(x for x in res.stdout.splitlines() if x.endswith("(generated)"))
    assert line.split()[:4] == [str(M), "assistant", str(gen.length), str(gen.rows)]
    assert gen.length == len(run.pass_tokens("snapshot", "generated")) and 0 < gen.rows < gen.length


def test_snapshot_generated_on_a_run_without_it_is_one_line(store: Any) -> None:
    """Runs captured before the generated snapshot existed have only message prefixes."""
    run = store.run(write_synthetic_run(store, n_snapshots=3))
    with pytest.raises(SelectionError, match=r"has no generated-reply snapshot.*snapshots are 0\.\.2$") as err:
        state_vectors(run, "snapshot:generated", "hidden_in")
    assert "\n" not in str(err.value)
    # snapshot:-1 still means the last row there.
    np.testing.assert_array_equal(state_vectors(run, "snapshot:-1", "hidden_in").compute(),
                                  state_vectors(run, "snapshot:2", "hidden_in").compute())  # fmt: skip
    res = CliRunner().invoke(main, ["query", "cosine", "--compare", "snapshot:generated:final",
                                    "--store", store.location])  # fmt: skip
    assert res.exit_code != 0
    assert len(res.output.strip().splitlines()) == 1 and "no generated-reply snapshot" in res.output


def test_generated_snapshot_skipped_when_it_overflows_the_context(store: Any) -> None:
    """The reply's end-of-turn and generation prompt can pass the context that the prompt
    plus max_new_tokens fit: the run is kept, without that row, and says why."""
    loaded = loaded_tiny("llama")
    sc = make_scenario(generation={"max_new_tokens": 4})
    probe = store.run(capture_run(sc, store, loaded, progress=False).run_id)
    limit = probe.meta["n_positions"] + 1  # the prompt and reply fit; the closed turn does not
    config = loaded.model.config
    saved = config.max_position_embeddings
    config.max_position_embeddings = limit
    try:
        with pytest.warns(UserWarning, match="no generated-reply snapshot"):
            run = store.run(capture_run(sc, store, loaded, progress=False).run_id)
    finally:
        config.max_position_embeddings = saved
    assert [s["generated"] for s in run.snapshot_index] == [False] * len(MESSAGES)
    assert run.snapshots("hidden_in").shape[0] == len(MESSAGES)
    with pytest.raises(SelectionError, match="no generated-reply snapshot"):
        state_vectors(run, "snapshot:generated", "hidden_in")
