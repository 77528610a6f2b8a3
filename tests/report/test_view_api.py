"""The run viewer's answers against the stored arrays read straight from Zarr, and its
HTTP server (a real one on loopback)."""

from __future__ import annotations

import dataclasses
import json
import urllib.error
import urllib.request
from typing import Any

import numpy as np
import pytest
import zarr

from actstore.errors import ModelLoadError, SelectionError
from actstore.store.store import ActStore
from actstore.view import api, serve


def _raw(store: ActStore, run: Any, name: str) -> np.ndarray:
    arr = zarr.open_array(store=store.zstore, path=f"runs/{run.id}/acts/{name}", mode="r")
    return np.asarray(arr[...], dtype=np.float64)


def _hidden_out(store: ActStore, run: Any) -> np.ndarray:
    res = _raw(store, run, "residual")  # boundaries 0..L: hidden_out of layer l is row l + 1
    return res[1:]


def _close(got: Any, want: np.ndarray) -> None:
    np.testing.assert_allclose(np.asarray(got, dtype=np.float64), want, rtol=1e-4, atol=1e-6)


def test_heatmap_prefill_is_the_step_positions_of_one_layer(two_run_store: ActStore) -> None:
    run = two_run_store.run(two_run_store.run_ids()[0])
    h = api.heatmap(run, "hidden_out", layer=1, step=0)
    assert not h["reshaped"] and h["rows"] == list(range(run.prompt_len))
    _close(h["z"], _hidden_out(two_run_store, run)[1, : run.prompt_len])
    mag = api.heatmap(run, "hidden_out", layer=1, step=0, reduce="abs")
    _close(mag["z"], np.abs(_hidden_out(two_run_store, run)[1, : run.prompt_len]))


def test_heatmap_decode_step_is_one_vector_as_a_grid(two_run_store: ActStore) -> None:
    run = two_run_store.run(two_run_store.run_ids()[0])
    h = api.heatmap(run, "mlp_act", layer=2, step=3)
    rows, cols = h["grid"]
    vec = _raw(two_run_store, run, "mlp_act")[2, run.prompt_len + 2]
    flat = np.asarray(h["z"], dtype=np.float64).reshape(-1)
    assert h["reshaped"] and rows * cols >= vec.size
    _close(flat[: vec.size], vec)


def test_heatmap_attention_head_and_mean(two_run_store: ActStore) -> None:
    run = two_run_store.run(two_run_store.run_ids()[0])
    att = _raw(two_run_store, run, "attn_weights")  # (L, heads, T, T)
    p = run.prompt_len + 1  # step 2 computes position P+1 and attends to keys 0..P+1
    one = api.heatmap(run, "attn_weights", layer=0, step=2, head=1)
    _close(one["z"], att[0, 1, p : p + 1, : p + 1])
    mean = api.heatmap(run, "attn_weights", layer=0, step=2)
    _close(mean["z"], att[0, :, p : p + 1, : p + 1].mean(axis=0))
    assert len(mean["key_tokens"]) == p + 1


def test_top_neurons_trajectory_and_decomposition(two_run_store: ActStore) -> None:
    run = two_run_store.run(two_run_store.run_ids()[1])  # the float16 run
    hout = _hidden_out(two_run_store, run)
    last = [run.prompt_len - 1] + [run.prompt_len + s - 1 for s in range(1, run.n_steps)]
    top = api.top_neurons(run, "hidden_out", layer=2, step=1, k=5)
    vec = hout[2, last[1]]
    assert [n["index"] for n in top["neurons"]] == np.argsort(-np.abs(vec), kind="stable")[:5].tolist()
    t = api.trajectory(run, "hidden_out", layer=2, neuron=top["neurons"][0]["index"])
    assert t["x"] == list(range(run.n_steps))
    _close(t["value"], hout[2, last, top["neurons"][0]["index"]])
    d = api.decomposition(run, step=1)
    res = _raw(two_run_store, run, "residual")
    _close(d["norm_hidden_in"], np.linalg.norm(res[:-1, last[1]], axis=-1))
    attn = _raw(two_run_store, run, "attn_out")[:, last[1]]
    cos = (attn * hout[:, last[1]]).sum(-1) / np.linalg.norm(attn, axis=-1) / np.linalg.norm(hout[:, last[1]], axis=-1)
    _close(d["cos_attn_out"], cos)


def test_summary_lists_tokens_and_steps(two_run_store: ActStore) -> None:
    run = two_run_store.run(two_run_store.run_ids()[0])
    s = api.summary(run)
    assert len(s["tokens"]) == run.n_positions and len(s["steps"]) == run.n_steps
    assert s["steps"][1]["positions"] == [run.prompt_len, run.prompt_len + 1]
    assert {"hidden_out", "attn_weights", "mlp_act", "logits"} <= set(s["sources"]) and s["heads"] == 4
    probs = [t["p"] for t in s["steps"][0]["top_k"]]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001


@pytest.mark.parametrize(
    ("call", "fragment"),
    [
        (lambda run: api.heatmap(run, "nope", 0, 0), "unknown source 'nope'"),
        (lambda run: api.heatmap(run, "hidden_out", 99, 0), "did not capture layer"),
        (lambda run: api.heatmap(run, "hidden_out", 0, 99), "has steps 0.."),
        (lambda run: api.top_neurons(run, "attn_weights", 0, 0), "no neurons"),
        (lambda run: api.trajectory(run, "logits", 0, 0), "per-layer vector source"),
    ],
)
def test_bad_requests_say_what_is_wrong(two_run_store: ActStore, call: Any, fragment: str) -> None:
    run = two_run_store.run(two_run_store.run_ids()[0])
    with pytest.raises(SelectionError, match=fragment):
        call(run)


def _get(url: str | urllib.request.Request) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            body = r.read()
            return r.status, json.loads(body) if r.headers["Content-Type"] == "application/json" else body
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_server_answers_over_http(two_run_store: ActStore) -> None:
    first = two_run_store.run_ids()[0]
    server = serve(two_run_store, first, port=0)
    try:
        base = server.url.split("?")[0]
        assert server.url.startswith("http://127.0.0.1:") and first in server.url
        status, runs = _get(base + "api/runs")
        assert status == 200 and [r["id"] for r in runs["runs"]] == two_run_store.run_ids()[::-1]
        status, h = _get(base + f"api/heatmap?run={first}&source=hidden_out&layer=1&step=0")
        assert status == 200
        _close(h["z"], _hidden_out(two_run_store, two_run_store.run(first))[1, : h["rows"][-1] + 1])
        status, err = _get(base + "api/heatmap?source=hidden_out&layer=x")
        assert status == 400 and "whole number" in err["error"]
        status, err = _get(base + "api/nothing")
        assert status == 404 and "unknown request" in err["error"]
        status, page = _get(base)
        assert status == 200 and b"/static/view.js" in page
        status, js = _get(base + "static/plotly.min.js")
        assert status == 200 and len(js) > 1_000_000
        assert _get(base + "static/../secrets")[0] == 404
    finally:
        server.shutdown()


def test_cli_view_errors_are_one_line_exit_2(two_run_store: ActStore) -> None:
    import socket

    from click.testing import CliRunner

    from actstore.cli import main

    res = CliRunner().invoke(main, ["view", "no_such_run", "--store", str(two_run_store.location), "--no-browser"])
    assert res.exit_code == 2 and "no_such_run" in res.output and len(res.output.strip().splitlines()) == 1
    res = CliRunner().invoke(main, ["view", "--store", str(two_run_store.location), "--no-browser", "--token", "short"])
    assert res.exit_code == 2 and "--token" in res.output and len(res.output.strip().splitlines()) == 1
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        res = CliRunner().invoke(
            main, ["view", "--store", str(two_run_store.location), "--port", str(port), "--no-browser"]
        )
    assert res.exit_code == 2 and "pick another --port" in res.output


@pytest.mark.parametrize("stop", ["SIGINT", "SIGTERM"])
def test_cli_view_serves_until_stopped(two_run_store: ActStore, stop: str) -> None:
    import signal
    import subprocess
    import sys

    proc = subprocess.Popen(
        [sys.executable, "-m", "actstore", "view", "--store", str(two_run_store.location), "--port", "0",
         "--no-browser"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # started as a shell's background job would be: SIGINT ignored, which Python keeps
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("actstore view: http://127.0.0.1:"), line + (proc.stderr.read() if proc.stderr else "")
        url = line.split()[2]
        status, summary = _get(url.replace("/?", "/api/summary?"))
        assert status == 200 and summary["id"] == two_run_store.run_ids()[-1]
    finally:
        proc.send_signal(getattr(signal, stop))
        assert proc.wait(timeout=30) == 0


def test_large_heatmaps_are_sent_as_block_means(two_run_store: ActStore, monkeypatch: pytest.MonkeyPatch) -> None:
    run = two_run_store.run(two_run_store.run_ids()[0])
    monkeypatch.setattr(api, "MAX_ROWS", 4)
    monkeypatch.setattr(api, "MAX_COLS", 5)
    att = _raw(two_run_store, run, "attn_weights")[1, 2, : run.prompt_len, : run.prompt_len]
    h = api.heatmap(run, "attn_weights", layer=1, step=0, head=2)
    fr, fc = h["block"]
    assert fr == -(-run.prompt_len // 4) and fc == -(-run.prompt_len // 5)
    want = np.array([[att[i : i + fr, j : j + fc].mean() for j in range(0, att.shape[1], fc)]
                     for i in range(0, att.shape[0], fr)])  # fmt: skip
    _close(h["z"], want)
    assert h["rows"] == list(range(0, run.prompt_len, fr)) and h["cols"] == list(range(0, run.prompt_len, fc))


def test_logit_lens_panel_is_the_query_layers_logit_lens(two_run_store: ActStore, loaded: Any) -> None:
    from actstore.query.logit_lens import logit_lens

    run = two_run_store.run(two_run_store.run_ids()[0])
    got = api.logit_lens_step(run, loaded, step=2)
    df = logit_lens(run, loaded, steps=[2], top_k=5)
    assert got["layer"] == run.layers and got["position"] == run.prompt_len + 1
    _close(got["p"], np.exp(df["argmax_logprob"].to_numpy()))
    _close(got["kl"], df["kl_from_final"].to_numpy())
    assert [len(t) for t in got["top"]] == [5] * len(run.layers)


def test_logit_lens_without_a_loadable_model_is_a_400(two_run_store: ActStore) -> None:
    server = serve(two_run_store, two_run_store.run_ids()[0], port=0)  # the runs' model "tiny" is not on disk
    try:
        url = server.url.split("?")[0] + "api/logit_lens"
        assert _get(url + "?step=0")[0] == 405  # it loads a model: a POST with the token
        post = urllib.request.Request(url, data=b'{"step": 0}', method="POST", headers={
            "Content-Type": "application/json", "X-Actstore-Token": server.policy.token})  # fmt: skip
        status, err = _get(post)
        assert status == 400 and "tiny" in err["error"]
    finally:
        server.shutdown()


def test_the_served_model_lenses_only_its_own_runs(two_run_store: ActStore, loaded: Any) -> None:
    """``serve(model=)`` serves the runs captured with that model; a run of another model
    gets its own (here not on disk: a one-line 400 naming it), never the wrong one's
    numbers."""
    from actstore.view.app import ViewApp

    run = two_run_store.run(two_run_store.run_ids()[0])
    app = ViewApp(two_run_store, run.id, model=loaded)
    assert app.loaded_model(run) is loaded
    other = dataclasses.replace(loaded, model_id="tiny-gpt2")
    app = ViewApp(two_run_store, run.id, model=other)
    with pytest.raises(ModelLoadError, match="tiny") as caught:
        app.loaded_model(run)
    assert "\n" not in str(caught.value)


def test_logit_lens_panel_at_another_position_with_more_candidates(two_run_store: ActStore, loaded: Any) -> None:
    from actstore.query.logit_lens import logit_lens

    run = two_run_store.run(two_run_store.run_ids()[0])
    got = api.logit_lens_step(run, loaded, step=0, top_k=8, position=1)
    df = logit_lens(run, loaded, steps=[0], top_k=8, position=1)
    assert got["position"] == 1 and [len(t) for t in got["top"]] == [8] * len(run.layers)
    _close(got["kl"], df["kl_from_final"].to_numpy())
    with pytest.raises(SelectionError, match="top_k"):
        api.logit_lens_step(run, loaded, step=0, top_k=0)


def test_state_map_columns_against_zarr(two_run_store: ActStore) -> None:
    """A side-by-side column of a selected state: a vector source's tokens x channels or
    one layer's attention over the state's full pass, as stored (binned on request)."""
    from actstore.query.selection import Selected
    from actstore.query.states import parse_state

    run = two_run_store.run(two_run_store.run_ids()[0])
    p = run.prompt_len
    prefill = api.state_map(Selected(run, parse_state("step:0")), "hidden_out", layer=1)
    assert prefill["block"] == [1, 1] and prefill["shape"] == [p, run.array("hidden_out").shape[-1]]
    _close(prefill["maps"]["z"], _hidden_out(two_run_store, run)[1, :p])
    binned = api.state_map(Selected(run, parse_state("step:0")), "hidden_out", layer=1, bins=5)
    fr, fc = binned["block"]
    h = _hidden_out(two_run_store, run)[1, :p]
    _close(binned["maps"]["z"], np.array([[h[i : i + fr, j : j + fc].mean() for j in range(0, h.shape[1], fc)]
                                          for i in range(0, p, fr)]))  # fmt: skip
    att = api.state_map(Selected(run, parse_state("step:2")), "attn_weights", layer=0, head=1)
    w = _raw(two_run_store, run, "attn_weights")  # a decode step: one query row over every key so far
    _close(att["maps"]["z"], w[0, 1, p + 1 : p + 2, : p + 2])
    assert att["colorscale"] == "Viridis" and att["zmid"] is None and prefill["zmid"] == 0
    snap = api.state_map(Selected(run, parse_state("snapshot:1")), "hidden_out", layer=2)
    last = np.asarray(run.snapshots("hidden_out")[1], dtype=np.float64)[run.layers.index(2)]
    _close(snap["maps"]["z"][-1], last)  # the pass's last token is the stored snapshot vector
    with pytest.raises(SelectionError, match="give a layer"):
        api.state_map(Selected(run, parse_state("step:0")), "q", layer=None)


def test_cross_layer_and_stacked_scores_against_numpy(two_run_store: ActStore) -> None:
    from actstore.query.depth import qk_score_array
    from actstore.query.selection import Selected
    from actstore.query.states import parse_state

    run = two_run_store.run(two_run_store.run_ids()[0])
    sel = Selected(run, parse_state("snapshot:1"))
    got = api.cross_layer(sel)
    v = np.asarray(run.snapshots("hidden_out")[1], dtype=np.float64)  # (L, W), read from Zarr
    want = (v @ v.T) / np.outer(np.linalg.norm(v, axis=1), np.linalg.norm(v, axis=1))
    assert got["layers"] == run.layers
    _close(got["z"], want)
    stacked = api.depth(sel, "scores")  # every layer, one band each, small enough to be unbinned
    assert stacked["block"] == [1, 1] and stacked["layers"] == run.layers
    z = np.asarray(stacked["maps"]["score"], dtype=np.float64)
    for i, layer in enumerate(run.layers):
        band = z[stacked["layer_starts"][i] : stacked["layer_starts"][i] + stacked["shape"][1]]
        _close(band, qk_score_array(sel, layer).mean(axis=0))
    qkv = api.depth(sel, "qkv-last")
    assert np.asarray(qkv["maps"]["qkv_last"]).shape[0] == len(run.layers)
