"""``actstore view`` is safe by default: Host, Origin and token checks, POST-only model
loads, static files by name only, bounded requests, one-line JSON errors without paths,
no tracebacks on disconnects; and its lab endpoints are the query functions' tables."""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from actstore.store.store import ActStore
from actstore.view import serve
from actstore.view.limits import Slots
from actstore.view.security import Policy, split_host
from actstore.view.server import ViewServer, scrub
from query.synth import write_synthetic_run


@pytest.fixture(scope="module")
def store(tmp_path_factory: Any) -> ActStore:
    st = ActStore.open(tmp_path_factory.mktemp("safe") / "store.zarr", create=True)
    write_synthetic_run(st, name="safe", n_layers=3, prompt_len=24, n_steps=4, width=32, n_snapshots=3,
                        labels=("joy", "fear"), attention_heads=2, seed=1)  # fmt: skip
    return st


@pytest.fixture(scope="module")
def server(store: ActStore) -> Any:
    srv = serve(store, "latest", port=0)
    yield srv
    srv.shutdown()


def call(srv: Any, path: str, method: str = "GET", headers: dict[str, str] | None = None,
         body: bytes | None = None, port: int | None = None) -> tuple[int, dict[str, str], Any]:  # fmt: skip
    """One request over a raw connection (so Host and every header are ours to set)."""
    conn = http.client.HTTPConnection("127.0.0.1", port or srv.port, timeout=30)
    try:
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        hdrs = {"Host": f"127.0.0.1:{port or srv.port}", **(headers or {})}
        if body is not None:
            hdrs.setdefault("Content-Length", str(len(body)))
        for k, v in hdrs.items():
            if v is not None:
                conn.putheader(k, v)
        conn.endheaders(body)
        r = conn.getresponse()
        raw = r.read()
        heads = {k.lower(): v for k, v in r.getheaders()}
        data = json.loads(raw) if heads.get("content-type", "").startswith("application/json") else raw
        return r.status, heads, data
    finally:
        conn.close()


def is_one_line_error(data: Any) -> bool:
    return isinstance(data, dict) and set(data) == {"error"} and "\n" not in data["error"] and data["error"]


# ---- Host and Origin ------------------------------------------------------------------------
@pytest.mark.parametrize("host", ["evil.example:{port}", "evil.example", "127.0.0.1:1", "10.0.0.1:{port}",
                                  "localhost.evil.example:{port}", "", "[::1:{port}"])  # fmt: skip
def test_a_foreign_host_is_refused(server: Any, host: str) -> None:
    """DNS rebinding: a page at evil.example whose name resolves to 127.0.0.1 sends its
    own name as Host; so does a request for another port or a non-loopback address."""
    status, _, data = call(server, "/api/runs", headers={"Host": host.format(port=server.port)})
    assert status == 403 and is_one_line_error(data) and "Host" in data["error"]


@pytest.mark.parametrize("host", ["127.0.0.1:{port}", "localhost:{port}", "[::1]:{port}", "127.0.0.2:{port}"])
def test_loopback_names_are_accepted(server: Any, host: str) -> None:
    assert call(server, "/api/runs", headers={"Host": host.format(port=server.port)})[0] == 200


@pytest.mark.parametrize("origin", ["http://evil.example", "http://localhost:{port}", "null",
                                    "https://127.0.0.1:{port}", "http://127.0.0.1:1"])  # fmt: skip
def test_a_foreign_origin_is_refused(server: Any, origin: str) -> None:
    status, _, data = call(server, "/api/runs", headers={"Origin": origin.format(port=server.port)})
    assert status == 403 and is_one_line_error(data) and "Origin" in data["error"]


def test_same_origin_and_cross_site_fetches(server: Any) -> None:
    assert call(server, "/api/runs", headers={"Origin": f"http://127.0.0.1:{server.port}"})[0] == 200
    assert call(server, "/api/runs", headers={"Sec-Fetch-Site": "same-origin"})[0] == 200
    for site in ("cross-site", "same-site"):  # same-site: another port of localhost
        status, _, data = call(server, "/api/runs", headers={"Sec-Fetch-Site": site})
        assert status == 403 and "cross-site" in data["error"]
        assert call(server, "/static/view.js", headers={"Sec-Fetch-Site": site})[0] == 403
    # the page itself may be opened from a link elsewhere: it reads nothing, holds no token
    status, _, page = call(server, "/", headers={"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate"})
    assert status == 200 and b'name="actstore-token" content=""' in page


# ---- the token ----------------------------------------------------------------------------
def test_loopback_reads_need_no_token_but_a_wrong_one_is_refused(server: Any) -> None:
    assert call(server, "/api/runs")[0] == 200
    status, _, data = call(server, "/api/runs?token=wrong")
    assert status == 403 and is_one_line_error(data)
    status, _, data = call(server, "/api/runs", headers={"X-Actstore-Token": "wrong"})
    assert status == 403
    stale = {"Cookie": f"{server.policy.cookie}=from-an-earlier-start"}
    assert call(server, "/api/runs", headers=stale)[0] == 200  # a stale cookie is no token


def test_the_page_gets_the_token_only_with_the_token(server: Any) -> None:
    token = server.policy.token
    status, heads, page = call(server, "/")
    assert status == 200 and token.encode() not in page and "set-cookie" not in heads
    assert "frame-ancestors 'none'" in heads["content-security-policy"] and heads["cache-control"] == "no-store"
    status, heads, page = call(server, f"/?run=x&token={token}")
    assert status == 200 and f'name="actstore-token" content="{token}"'.encode() in page
    cookie = heads["set-cookie"]
    assert cookie.startswith(f"{server.policy.cookie}={token}") and "HttpOnly" in cookie and "SameSite=strict" in cookie
    status, _, page = call(server, "/", headers={"Cookie": f"{server.policy.cookie}={token}"})
    assert token.encode() in page


@pytest.fixture(scope="module")
def open_server(store: ActStore) -> Any:
    """Bound to every interface: the token on every request (reached here over loopback)."""
    try:
        srv = serve(store, "latest", host="0.0.0.0", port=0)
    except OSError as e:  # pragma: no cover - a sandbox without the wildcard address
        pytest.skip(f"cannot bind 0.0.0.0: {e}")
    yield srv
    srv.shutdown()


def test_off_loopback_every_request_needs_the_token(open_server: Any) -> None:
    srv, token = open_server, open_server.policy.token
    assert not srv.policy.loopback and f"token={token}" in srv.url
    for path in ("/", "/api/runs", "/static/view.js", "/api/heatmap?layer=0"):
        status, _, data = call(srv, path)
        assert status == 401 and is_one_line_error(data) and "token" in data["error"], path
        status, _, data = call(srv, path + ("&" if "?" in path else "?") + "token=wrong")
        assert status == 403 and is_one_line_error(data), path
    assert call(srv, f"/api/runs?token={token}")[0] == 200
    assert call(srv, "/api/runs", headers={"X-Actstore-Token": token})[0] == 200
    assert call(srv, "/api/runs", headers={"Authorization": f"Bearer {token}"})[0] == 200
    status, heads, _ = call(srv, f"/?token={token}")
    cookie = heads["set-cookie"].split(";")[0]
    assert status == 200 and call(srv, "/api/runs", headers={"Cookie": cookie})[0] == 200
    # any IP literal of this machine is a fine Host off loopback; a foreign name is not
    assert call(srv, f"/api/runs?token={token}", headers={"Host": f"192.0.2.1:{srv.port}"})[0] == 200
    assert call(srv, f"/api/runs?token={token}", headers={"Host": f"evil.example:{srv.port}"})[0] == 403


# ---- methods, POST bodies -----------------------------------------------------------------
def test_model_loads_are_post_with_the_token(server: Any) -> None:
    token = server.policy.token
    status, heads, data = call(server, "/api/logit_lens?step=0")
    assert status == 405 and heads["allow"] == "POST" and is_one_line_error(data)
    status, heads, data = call(server, "/api/heatmap?layer=0", "POST", {"Content-Type": "application/json",
                                                                        "X-Actstore-Token": token}, b"{}")  # fmt: skip
    assert status == 405 and heads["allow"] == "GET" and is_one_line_error(data)
    json_ct = {"Content-Type": "application/json"}
    status, _, data = call(server, "/api/logit_lens", "POST", json_ct, b'{"step": 0}')
    assert status == 401 and is_one_line_error(data)  # no token: even on loopback
    status, _, data = call(server, "/api/logit_lens", "POST", {**json_ct, "Cookie": f"{server.policy.cookie}={token}"},
                           b'{"step": 0}')  # fmt: skip
    assert status == 401  # a cookie alone does not do for a POST
    status, _, data = call(server, "/api/logit_lens", "POST", {**json_ct, "X-Actstore-Token": "wrong"}, b"{}")
    assert status == 403
    ok = {**json_ct, "X-Actstore-Token": token}
    status, _, data = call(server, "/api/logit_lens", "POST", ok, b"{not json")
    assert status == 400 and "JSON" in data["error"]
    status, _, data = call(server, "/api/logit_lens", "POST", {"X-Actstore-Token": token, "Content-Type": "text/plain"},
                           b"{}")  # fmt: skip
    assert status == 415 and is_one_line_error(data)
    status, _, data = call(server, "/api/logit_lens", "POST", ok, b"[" + b"0," * 40_000 + b"0]")
    assert status == 413 and is_one_line_error(data)
    status, _, data = call(server, "/api/logit_lens", "POST", ok, b'{"step": {"deep": 1}}')
    assert status == 400 and is_one_line_error(data)
    status, _, data = call(server, "/api/logit_lens", "POST", ok, b'{"step": 0}')  # the run's model is not here
    assert status == 400 and "synthetic" in data["error"]


# ---- bad requests: 4xx, one line, no paths ----------------------------------------------
BAD = [
    ("/static/", 404), ("/static/../pyproject.toml", 404), ("/static/%2e%2e%2fview.js", 404),
    ("/static/..%2F..%2Fpyproject.toml", 404), ("/static/view.py", 404), ("/static/.hidden", 404),
    ("/nothing", 404), ("/api/nothing", 404), ("/api/", 404),
    ("/api/heatmap?source=attn_weights&layer=0&step=0&head=-1", 400),
    ("/api/heatmap?source=attn_weights&layer=0&step=0&head=2", 400),
    ("/api/heatmap?layer=x", 400), ("/api/heatmap?layer=0&step=99", 400), ("/api/heatmap?layer=0&bins=0", 400),
    ("/api/heatmap?layer=0&bins=99999", 400), ("/api/heatmap?source=nope&layer=0", 400),
    ("/api/summary?run=no_such_run", 400), ("/api/trajectory?layer=0", 400),
    ("/api/pair?a=final", 400), ("/api/pair?a=final&b=nope:1", 400), ("/api/pair?a=final&b=initial&what=x", 400),
    ("/api/pair?a=final&b=initial&frac=2", 400), ("/api/group?state=final", 400),
    ("/api/depth?state=pos:3", 400), ("/api/depth?state=final&what=scores", 400),
    ("/api/next_token?steps=a", 400), ("/api/heatmap?" + "&".join(f"x{i}=1" for i in range(300)), 400),
]  # fmt: skip


@pytest.mark.parametrize(("path", "status"), BAD)
def test_bad_requests_are_one_line_4xx_json(server: Any, path: str, status: int) -> None:
    got, heads, data = call(server, path)
    assert got == status and heads["content-type"] == "application/json" and is_one_line_error(data), data


def test_error_bodies_hold_no_path(server: Any, store: ActStore, tmp_path: Path) -> None:
    """Not the install, not the store, not the home folder: a run whose model id is a
    folder of the install makes the model loader name it; the answer does not."""
    import actstore

    private = [sys.prefix, str(Path(actstore.__file__).resolve().parents[1]), str(store.location), str(Path.home())]
    run = store.run("latest")
    bodies = [call(server, path)[2] for path, _ in BAD]
    scenario = run.group.attrs["run"]
    meta = dict(scenario) | {"scenario": {**scenario["scenario"], "model": {**scenario["scenario"]["model"],
                                                                         "id": sys.prefix + "/lib"}}}  # fmt: skip
    run.group.attrs["run"] = meta
    try:
        srv = serve(ActStore.open(store.location), run.id, port=0)
        try:
            hdrs = {"Content-Type": "application/json", "X-Actstore-Token": srv.policy.token}
            status, _, data = call(srv, "/api/logit_lens", "POST", hdrs, b'{"step": 0}')
            assert status == 400 and "<path>" in data["error"], data
            bodies.append(data)
        finally:
            srv.shutdown()
    finally:
        run.group.attrs["run"] = scenario
    for body in bodies:
        text = json.dumps(body)
        assert not any(p in text for p in private), text
        assert is_one_line_error(body)


def test_scrub_hides_paths_but_not_routes() -> None:
    text = scrub("cannot open /home/ann/stores/a.zarr/runs/x (see /api/summary, ~/x/y, 0/1, RUN@STATE)\nnext line")
    assert text == "cannot open <path> (see /api/summary, <path>, 0/1, RUN@STATE) next line"
    assert scrub(f"folder {sys.prefix}/lib has no config.json") == "folder <path> has no config.json"


# ---- connections ----------------------------------------------------------------------------
def test_a_trickled_request_head_is_cut_off(store: ActStore) -> None:
    srv = ViewServer(__import__("actstore.view.app", fromlist=["ViewApp"]).ViewApp(store), port=0,
                     header_timeout=0.5).start()  # fmt: skip
    try:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as s:
            s.sendall(b"GET /api/runs HTTP/1.1\r\nHo")
            started = time.monotonic()
            assert s.recv(100) == b""  # closed by the server, not by the 5 s timeout here
            assert time.monotonic() - started < 3
        with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as s:  # a whole head is answered
            s.sendall(f"GET /api/runs HTTP/1.1\r\nHost: 127.0.0.1:{srv.port}\r\n\r\n".encode())
            assert s.recv(12) == b"HTTP/1.1 200"
    finally:
        srv.shutdown()


def test_disconnects_print_no_traceback(store: ActStore, capfd: pytest.CaptureFixture[str]) -> None:
    srv = serve(store, "latest", port=0)
    try:
        for i in range(20):  # clients that leave before (or while) their answer is sent
            with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as s:
                s.sendall(f"GET /api/heatmap?source=attn_weights&layer=1&step=0&bins={100 + i} HTTP/1.1\r\n"
                          f"Host: 127.0.0.1:{srv.port}\r\n\r\n".encode())  # fmt: skip
                if i % 2:
                    s.recv(10)
        time.sleep(0.5)
        assert call(srv, "/api/runs")[0] == 200  # still serving
    finally:
        srv.shutdown()
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Exception" not in err, err


def test_slots_turn_away_beyond_the_queue() -> None:
    async def scenario() -> list[bool]:
        slots = Slots(1, queue=1, wait_s=0.2)
        first = await slots.acquire()
        waiter = asyncio.ensure_future(slots.acquire())  # waits (the queue has room for one)
        await asyncio.sleep(0.01)
        turned_away = await slots.acquire()  # the queue is full
        timed_out = await waiter  # nobody released within wait_s
        slots.release()
        again = await slots.acquire()
        return [first, turned_away, timed_out, again]

    assert asyncio.run(scenario()) == [True, False, False, True]


def test_policy_parts() -> None:
    assert split_host("[::1]:80") == ("::1", 80) and split_host("a:b") is None and split_host("::1") is None
    p = Policy.for_bind("0.0.0.0", 9000, "tok")
    assert not p.loopback and p.host_ok("203.0.113.9:9000") and not p.host_ok("203.0.113.9:9001")
    assert p.check("GET", "/api/runs", "", {"host": "127.0.0.1:9000"}) == (401, p.check("GET", "/", "", {
        "host": "127.0.0.1:9000"})[1])  # fmt: skip
    assert p.check("GET", "/api/runs", "token=tok", {"host": "127.0.0.1:9000"}) is None


# ---- the lab's endpoints are the query functions --------------------------------------------
def test_lab_endpoints_answer_the_query_tables(server: Any, store: ActStore) -> None:
    from actstore.query import depth, groups, pairs
    from actstore.query.selection import resolve

    run = store.run("latest")
    status, _, p = call(server, f"/api/pair?run={run.id}&a=snapshot:1&b=reference:joy&source=hidden_out&layers=0-1")
    assert status == 200 and p["a"] == f"{run.id}@snapshot:1"
    a, b = resolve(store, ["snapshot:1", "reference:joy"])
    want = pairs.pair_metrics(a, b, ["hidden_out"], [0, 1]).per_layer
    assert p["table"]["layer"] == [0, 1]
    np.testing.assert_allclose(p["table"]["cosine"], want["cosine"], rtol=1e-4)

    status, _, m = call(server, "/api/pair?a=step:0&b=final&what=attention&layer=2&head=1")
    assert status == 200 and set(m["maps"]) == {"a", "b", "abs_diff", "sq_err", "hadamard", "ratio"}
    x, y = resolve(store, ["step:0", "final"])
    want_a = pairs.map_array(x, "attention", 2, 1)
    r, c = min(want_a.shape[0], 1), min(want_a.shape[1], pairs.map_array(y, "attention", 2, 1).shape[1])
    np.testing.assert_allclose(np.asarray(m["maps"]["a"], dtype=float), want_a[:r, :c], rtol=1e-4, atol=1e-7)

    items = "&".join(f"state={s}" for s in ("snapshot:0", "snapshot:1", "snapshot:2", "reference:fear"))
    status, _, g = call(server, f"/api/group?{items}&what=divergence&source=hidden_out")
    gv = groups.group_vectors(resolve(store, ["snapshot:0", "snapshot:1", "snapshot:2", "reference:fear"]),
                              ["hidden_out"])  # fmt: skip
    assert status == 200 and len(g["states"]) == 4
    np.testing.assert_allclose(g["table"]["divergence"], groups.divergence(gv)["divergence"], rtol=1e-4)

    status, _, d = call(server, "/api/depth?state=step:0&what=convergence")
    (sel,) = resolve(store, ["step:0"])
    assert status == 200
    np.testing.assert_allclose(d["table"]["cos_mean"], depth.convergence(sel)["cos_mean"], rtol=1e-4)
    status, _, d = call(server, "/api/depth?state=step:0&what=entropy")
    assert status == 200 and d["table"]["layer"] == [0, 1, 2]
    status, _, n = call(server, "/api/next_token")
    assert status == 400 and "logits" in n["error"]  # the synthetic run kept none
