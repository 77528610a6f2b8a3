"""The run viewer's HTTP server: Starlette on uvicorn, safe by default.

>>> server = serve(ActStore.open("stores/actstore.zarr"), "latest")   # doctest: +SKIP
>>> server.url                                                       # doctest: +SKIP
'http://127.0.0.1:8765/?run=emotions_...&token=...'
>>> server.shutdown()                                                # doctest: +SKIP

Routes: ``/`` the page (``static/view.html``), ``/static/<name>`` its script, style and
the installed plotly.js; ``/api/<route>`` the answers of :mod:`actstore.view.app`
(``ROUTES``: runs, summary, heatmap, top_neurons, trajectory, decomposition, pair,
group, depth, next_token as GET with query parameters; logit_lens, which loads the
run's model, as POST with a JSON body).

Safety (the rules are :mod:`actstore.view.security`'s):

* loopback unless ``host`` says otherwise, and then the access token on every request;
  Host and Origin checked on every request; a POST needs the token in a header;
* heavy routes run at most ``slots`` at a time in worker threads, each holding its slot
  until its answer is sent; up to ``queue`` more wait, and beyond that (or after
  ``limits.QUEUE_WAIT_S``) a request is answered 503 with ``Retry-After``. So memory is bounded
  by slots x what one answer needs (a heatmap: its bins, ``query.slices``; the lab's
  analyses: ``api.MAX_REQUEST_BYTES``) plus the answer cache (``limits.CACHE_BYTES``);
* a request's head must arrive within ``header_timeout`` seconds (a silent or trickling
  connection is closed), idle keep-alive connections close after 5 s, at most
  ``MAX_CONNECTIONS`` are open, heads are at most 16 KiB (uvicorn's h11 limit) and a
  POST body at most ``MAX_BODY`` bytes;
* every refused or bad request is a one-line JSON ``{"error": "..."}`` with a 4xx status
  and no file-system path in it; an unexpected failure is a 500 saying so, with one line
  on the server's console; a client that disconnects is no error.
"""

from __future__ import annotations

import json
import re
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import quote

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from actstore.errors import ActstoreError, SelectionError
from actstore.view.app import ROUTES, Params, ViewApp
from actstore.view.limits import CACHE_BYTES, AnswerCache, Slots, default_slots
from actstore.view.security import TOKEN_HEADER, Policy, is_loopback

_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".css": "text/css; charset=utf-8"}  # fmt: skip
MAX_BODY = 64 * 2**10  # bytes of a POST body
MAX_CONNECTIONS = 512  # open connections (uvicorn answers 503 beyond)
SEND_TIMEOUT_S = 60.0  # longest a client may take to read an answer that holds a slot
BODY_TIMEOUT_S = 10.0
RETRY_AFTER_S = 1
_PAGE_CSP = ("default-src 'self'; script-src 'self' 'unsafe-eval'; style-src 'self' 'unsafe-inline'; "
             "img-src 'self' data: blob:; connect-src 'self'; object-src 'none'; base-uri 'none'; "
             "frame-ancestors 'none'; form-action 'none'")  # fmt: skip
_COMMON_HEADERS = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
                   "X-Frame-Options": "DENY", "Cross-Origin-Resource-Policy": "same-origin"}  # fmt: skip


@cache
def _static_names() -> frozenset[str]:
    folder = resources.files("actstore.view") / "static"
    return frozenset({p.name for p in folder.iterdir() if not p.name.startswith(".")} | {"plotly.min.js"})


@cache
def _static(name: str) -> bytes:
    if name == "plotly.min.js":
        from plotly.offline import get_plotlyjs

        return get_plotlyjs().encode()
    return (resources.files("actstore.view") / "static" / name).read_bytes()


# ---- error bodies without paths ---------------------------------------------------------
_ABS_PATH = re.compile(r"(?<![\w/.:~-])(?:~/[^\s'\",;)]+|/(?:[^\s/'\"]+/)+[^\s'\",;)]*)")


@cache
def _private_prefixes() -> tuple[str, ...]:
    import actstore

    found = {sys.prefix, sys.exec_prefix, sys.base_prefix, str(Path(actstore.__file__).resolve().parents[1]),
             str(Path.home()), tempfile.gettempdir(), str(Path.cwd())}  # fmt: skip
    return tuple(sorted((p for p in found if p and p != "/"), key=len, reverse=True))


def scrub(message: str, extra: tuple[str, ...] = ()) -> str:
    """``message`` on one line with file-system paths replaced by ``<path>``: the
    install, home, temporary and working folders, ``extra`` (the store), and anything
    else that looks like an absolute path (but not this server's own ``/api/`` and
    ``/static/`` routes)."""
    text = " ".join(str(message).split())
    for prefix in (*sorted(extra, key=len, reverse=True), *_private_prefixes()):
        if prefix and prefix != "/":  # the prefix and the rest of the path after it
            text = re.sub(re.escape(prefix) + r"[^\s'\",;)]*", "<path>", text)

    def hide(m: re.Match[str]) -> str:
        return m.group(0) if m.group(0).startswith(("/api/", "/static/")) else "<path>"

    return _ABS_PATH.sub(hide, text)[:2000]


def _json_error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    body = json.dumps({"error": message}, ensure_ascii=False).encode()
    return Response(body, status, {**_COMMON_HEADERS, "Cache-Control": "no-store", **(headers or {})},
                    media_type="application/json")  # fmt: skip


# ---- the guard: Host, Origin, token, before any route ----------------------------------
class _Guard:
    """ASGI middleware applying :meth:`Policy.check` to every HTTP request."""

    def __init__(self, app: ASGIApp, policy: Policy):
        self.app, self.policy = app, policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # no websockets, no lifespan here
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        query = scope.get("query_string", b"").decode("latin-1")
        problem = self.policy.check(scope["method"], scope["path"], query, headers)
        if problem is not None:
            await _json_error(*problem)(scope, receive, send)
            return
        scope.setdefault("state", {})["authenticated"] = self.policy.authenticated(query, headers)
        await self.app(scope, receive, send)


class _HeldResponse(Response):
    """A response that gives its slot back once sent (or once the client has had
    ``SEND_TIMEOUT_S`` to read it), so an answer waiting for a slow reader still counts."""

    def __init__(self, *args: Any, release: Callable[[], None], **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            with anyio.move_on_after(SEND_TIMEOUT_S):
                await super().__call__(scope, receive, send)
        finally:
            self._release()


# ---- the application --------------------------------------------------------------------
class _Handlers:
    def __init__(self, view: ViewApp, policy: Policy, slots: Slots, cache: AnswerCache):
        self.view, self.policy, self.slots, self.cache = view, policy, slots, cache
        loc = str(getattr(view.store, "location", "") or "")
        self.private = (loc,) if loc.startswith("/") else ()

    def _headers(self, **extra: str) -> dict[str, str]:
        return {**_COMMON_HEADERS, **extra}

    async def page(self, request: Request) -> Response:
        html = _static("view.html")
        authed = bool(request.scope.get("state", {}).get("authenticated"))
        if authed:  # the page's script sends the token with each POST
            html = html.replace(b'name="actstore-token" content=""', f'name="actstore-token" content="{self.policy.token}"'.encode())
        response = Response(html, 200, self._headers(**{"Cache-Control": "no-store", "Content-Security-Policy": _PAGE_CSP}),
                            media_type=_TYPES[".html"])  # fmt: skip
        token = request.query_params.get("token")
        if token is not None and self.policy.token_matches(token):
            response.set_cookie(self.policy.cookie, token, httponly=True, samesite="strict", path="/")
        return response

    async def static(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name not in _static_names():
            return _json_error(404, "not found")
        ctype = _TYPES.get(name[name.rfind(".") :], "text/plain; charset=utf-8")
        return Response(_static(name), 200, self._headers(**{"Cache-Control": "max-age=3600"}), media_type=ctype)

    async def not_found(self, request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 404)
        if status == 405:
            return _json_error(405, f"{request.method} is not allowed here", dict(getattr(exc, "headers", None) or {}))
        return _json_error(status if 400 <= status < 500 else 404, "not found")

    async def api(self, request: Request) -> Response:
        route = request.path_params["route"]
        info = ROUTES.get(route)
        if info is None:
            return _json_error(404, f"unknown request /api/{route[:64]}")
        if request.method != info.method:
            return _json_error(405, f"/api/{route} takes {info.method} only", {"Allow": info.method})
        try:
            if info.method == "POST":
                params = Params.from_json(await self._json_body(request))
            else:
                params = Params(request.query_params.multi_items())
                await request.body()  # take the (empty) body, so a disconnect shows below
        except _Refused as e:
            return _json_error(e.status, str(e))
        except SelectionError as e:
            return _json_error(400, scrub(str(e), self.private))
        release: Callable[[], None] = _noop
        if info.heavy:
            if not await self.slots.acquire():
                return _json_error(503, "busy: too many requests at once; try again shortly",
                                   {"Retry-After": str(RETRY_AFTER_S)})  # fmt: skip
            release = self.slots.release
        try:
            if await request.is_disconnected():  # gone while it waited: nothing to compute
                release()
                return Response(status_code=204)
            started = time.perf_counter()
            status, body = await anyio.to_thread.run_sync(self._compute, route, params, request.method)
            timing = f"app;dur={(time.perf_counter() - started) * 1000:.1f}"
        except BaseException:
            release()
            raise
        headers = self._headers(**{"Cache-Control": "no-store", "Server-Timing": timing})
        return _HeldResponse(body, status, headers, media_type="application/json", release=release)

    def _compute(self, route: str, params: Params, method: str) -> tuple[int, bytes]:
        """(status, JSON body) of one answer, in a worker thread (GET answers cached)."""
        if method == "GET" and ROUTES[route].cached:
            return self.cache.get_or_compute((route, params.key()), lambda: self._answer(route, params, method))
        return self._answer(route, params, method)

    def _answer(self, route: str, params: Params, method: str) -> tuple[int, bytes]:
        try:
            answer = self.view.answer(route, params)
            return 200, json.dumps(answer, allow_nan=False, separators=(",", ":")).encode()
        except ActstoreError as e:  # what the reader asked for is wrong: say so
            message = scrub(str(e), self.private)
            return 400, json.dumps({"error": message}, ensure_ascii=False).encode()
        except Exception as e:  # noqa: BLE001 - a failed answer must not stop the server
            print(f"actstore view: {method} /api/{route}: {type(e).__name__}: {e}", file=sys.stderr)
            body = {"error": f"internal error ({type(e).__name__}); the server's console says more"}
            return 500, json.dumps(body).encode()

    async def _json_body(self, request: Request) -> Any:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise _Refused(415, "a POST body must be JSON (Content-Type: application/json)")
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY):
            raise _Refused(413, f"request body too large (at most {MAX_BODY} bytes)")
        chunks, size = [], 0
        try:
            with anyio.fail_after(BODY_TIMEOUT_S):
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > MAX_BODY:
                        raise _Refused(413, f"request body too large (at most {MAX_BODY} bytes)")
                    chunks.append(chunk)
        except TimeoutError:
            raise _Refused(408, "request body too slow") from None
        try:
            return json.loads(b"".join(chunks) or b"{}")
        except (ValueError, UnicodeDecodeError):
            raise _Refused(400, "the request body is not valid JSON") from None


class _Refused(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _noop() -> None:
    pass


def build_app(view: ViewApp, policy: Policy, slots: Slots, cache: AnswerCache | None = None) -> ASGIApp:
    """The viewer as an ASGI application (guarded; see the module docstring)."""
    h = _Handlers(view, policy, slots, cache or AnswerCache(0))
    routes = [
        Route("/", h.page, methods=["GET"]),
        Route("/index.html", h.page, methods=["GET"]),
        Route("/static/{name}", h.static, methods=["GET"]),
        Route("/api/{route}", h.api, methods=["GET", "POST"]),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: h.not_found})
    return _Guard(app, policy)


# ---- uvicorn, in a thread -----------------------------------------------------------------
def _timed_protocol(header_timeout: float) -> type:
    """uvicorn's h11 protocol with a deadline for each request's head: a connection that
    sends no complete request head within ``header_timeout`` seconds of opening (or of
    its last answer) is closed. uvicorn closes idle keep-alive connections, but a
    connection that trickles a head byte by byte would otherwise stay open for good."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class TimedH11(H11Protocol):
        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._idle_since = self.loop.time()
            self._watch = self.loop.call_later(header_timeout, self._check)

        def _check(self) -> None:
            if self.transport.is_closing():
                return
            waiting = self.cycle is None or self.cycle.response_complete
            left = header_timeout - (self.loop.time() - self._idle_since)
            if waiting and left <= 0:
                self.transport.close()
                return
            self._watch = self.loop.call_later(max(left, 0.05) if waiting else header_timeout, self._check)

        def on_response_complete(self) -> None:
            self._idle_since = self.loop.time()
            super().on_response_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._watch.cancel()
            super().connection_lost(exc)

    return TimedH11


def _listen(host: str, port: int, backlog: int = 256) -> socket.socket:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(backlog)
        sock.set_inheritable(True)
    except OSError:
        sock.close()
        raise
    return sock


class ViewServer:
    """A running viewer: ``url``, ``serve_forever()`` (CLI) or ``start()`` (background).

    ``host``: loopback by default; any other address makes the token required on every
    request. ``token``: the access token (default: random). ``slots``/``queue``: heavy
    requests at once / waiting; ``cache_bytes``: answers kept (``AnswerCache``; 0: none).
    Binding happens here, so a busy port fails at once (``OSError``)."""

    def __init__(
        self, app: ViewApp, host: str = "127.0.0.1", port: int = 8765, *, token: str | None = None,
        slots: int | None = None, queue: int = 32, header_timeout: float = 10.0, cache_bytes: int = CACHE_BYTES,
    ):  # fmt: skip
        import uvicorn

        self.app = app
        self.host = host
        self.sock = _listen(host, port)
        self.port = int(self.sock.getsockname()[1])
        self.policy = Policy.for_bind(host, self.port, token)
        self.slots = Slots(slots or default_slots(), queue)
        self.cache = AnswerCache(cache_bytes)
        config = uvicorn.Config(
            build_app(app, self.policy, self.slots, self.cache), http=_timed_protocol(header_timeout), loop="asyncio",
            lifespan="off", log_config=None, log_level="warning", access_log=False, server_header=False,
            timeout_keep_alive=5, limit_concurrency=MAX_CONNECTIONS, timeout_graceful_shutdown=2,
        )  # fmt: skip
        self.server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """Where to point a browser: the run and the access token in the query."""
        host = self.host
        if host in ("0.0.0.0", "::", ""):
            host = socket.gethostname()
        elif is_loopback(host) and host != "localhost":
            host = str(self.sock.getsockname()[0])
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}/?run={quote(self.app.default)}&token={quote(self.policy.token)}"

    def start(self) -> ViewServer:
        """Serve in a background thread; returns once it accepts connections."""
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                        name="actstore-view", daemon=True)  # fmt: skip
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("actstore view: the server did not start")
            time.sleep(0.01)
        return self

    def serve_forever(self) -> None:
        """Serve until interrupted (KeyboardInterrupt reaches the caller; call
        :meth:`shutdown` then)."""
        if self._thread is None:
            self.start()
        assert self._thread is not None
        while self._thread.is_alive():
            self._thread.join(0.5)

    def shutdown(self) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.sock.close()
        self.app.close()  # a capture job still running is cancelled


def serve(
    store: Any, run: str = "latest", host: str = "127.0.0.1", port: int = 0, model: Any = None,
    token: str | None = None, scenarios: str | Path | None = None,
) -> ViewServer:  # fmt: skip
    """Start the viewer for ``run`` of ``store`` in a background thread (``port=0``: any
    free port); ``.url`` is where to point a browser (it carries the access token),
    ``.shutdown()`` stops it. ``model``: a LoadedModel for the logit lens (else each
    run's own model is loaded when asked). ``scenarios``: the scenario builder's folder."""
    return ViewServer(ViewApp(store, run, model, scenarios=scenarios), host, port, token=token).start()


__all__ = ["TOKEN_HEADER", "ViewApp", "ViewServer", "build_app", "scrub", "serve"]
