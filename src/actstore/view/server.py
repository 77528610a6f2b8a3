"""The run viewer's local HTTP server: one page, and JSON answers read on request.

>>> server = serve(ActStore.open("stores/actstore.zarr"), "latest")   # doctest: +SKIP
>>> server.url                                                       # doctest: +SKIP
'http://127.0.0.1:8765/?run=emotions_...'
>>> server.shutdown()                                                # doctest: +SKIP

Routes: ``/`` the page (``static/view.html``), ``/static/*`` its script, style and the
installed plotly.js; ``/api/runs``, ``/api/summary``, ``/api/heatmap``,
``/api/top_neurons``, ``/api/trajectory``, ``/api/decomposition``, ``/api/logit_lens``
(which loads the run's model on first use) (query parameters as
in :mod:`actstore.view.api`, plus ``run``). A bad request answers 400 with
``{"error": "..."}``, the same one-line message the CLI prints. The standard library's
threading HTTP server is enough: it binds to loopback by default and serves one person.
"""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Callable
from functools import cache
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

from actstore.errors import ActstoreError, SelectionError
from actstore.view import api

_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".css": "text/css; charset=utf-8"}  # fmt: skip


@cache
def _static(name: str) -> bytes:
    if name == "plotly.min.js":
        from plotly.offline import get_plotlyjs

        return get_plotlyjs().encode()
    return (resources.files("actstore.view") / "static" / name).read_bytes()


class ViewApp:
    """Runs of one store, opened once each, and the answers the page asks for."""

    def __init__(self, store: Any, default_run: str = "latest", model: Any = None, device: str | None = None):
        self.store = store
        self.default = store.run(default_run).id  # fails now, not on the first request
        self._runs: dict[str, Any] = {}
        self._lock = threading.Lock()
        # The logit lens needs the run's model: ``model`` (a LoadedModel already in
        # memory) serves every run; otherwise each run's scenario model is loaded on
        # the first lens request (``device`` overrides its device) and kept.
        self.model, self.device = model, device
        self._models: dict[str, Any] = {}
        self._model_lock = threading.Lock()

    def loaded_model(self, run: Any) -> Any:
        if self.model is not None:
            return self.model
        from actstore.models.loading import load_model
        from actstore.scenario import ModelConfig

        cfg = dict(run.scenario["model"]) | ({"device": self.device} if self.device else {})
        key = json.dumps(cfg, sort_keys=True)
        with self._model_lock:  # one load, however many panels ask at once
            if key not in self._models:
                self._models[key] = load_model(ModelConfig(**cfg))
            return self._models[key]

    def run(self, selector: str | None) -> Any:
        key = selector or self.default
        with self._lock:
            if key not in self._runs:
                self._runs[key] = self.store.run(key)
            return self._runs[key]

    def answer(self, route: str, q: dict[str, str]) -> Any:
        """The JSON answer of an ``/api/<route>`` request."""
        if route == "runs":
            return {"runs": api.runs(self.store), "default": self.default}
        run = self.run(q.get("run"))
        handlers: dict[str, Callable[[], Any]] = {
            "summary": lambda: api.summary(run),
            "heatmap": lambda: api.heatmap(run, q.get("source", "hidden_out"), _int(q, "layer", None),
                                           _int(q, "step", 0), _int(q, "head", None), q.get("reduce", "signed")),
            "top_neurons": lambda: api.top_neurons(run, q.get("source", "hidden_out"), _int(q, "layer", None),
                                                   _int(q, "step", 0)),
            "trajectory": lambda: api.trajectory(run, q.get("source", "hidden_out"), _req_int(q, "layer"),
                                                 _req_int(q, "neuron"), q.get("over", "steps")),
            "decomposition": lambda: api.decomposition(run, _int(q, "step", 0)),
            "logit_lens": lambda: api.logit_lens_step(run, self.loaded_model(run), _int(q, "step", 0)),
        }  # fmt: skip
        if route not in handlers:
            raise SelectionError(f"unknown request /api/{route}")
        return handlers[route]()


def _int(q: dict[str, str], name: str, default: int | None) -> Any:
    value = q.get(name, "")
    if value in ("", "mean", "none"):
        return default
    try:
        return int(value)
    except ValueError:
        raise SelectionError(f"{name} must be a whole number, not {value!r}") from None


def _req_int(q: dict[str, str], name: str) -> int:
    value = _int(q, name, None)
    if value is None:
        raise SelectionError(f"missing {name}")
    return int(value)


def _handler(app: ViewApp) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            parts = urlsplit(self.path)
            q = {k: v[-1] for k, v in parse_qs(parts.query).items()}
            path = parts.path
            try:
                if path in ("/", "/index.html"):
                    self._send(HTTPStatus.OK, _static("view.html"), _TYPES[".html"])
                elif path.startswith("/static/"):
                    name = path.removeprefix("/static/")
                    if "/" in name or name.startswith("."):
                        raise FileNotFoundError(name)
                    self._send(
                        HTTPStatus.OK, _static(name), _TYPES.get(name[name.rfind(".") :], "text/plain")
                    )
                elif path.startswith("/api/"):
                    body = json.dumps(app.answer(path.removeprefix("/api/"), q), allow_nan=False)
                    self._send(HTTPStatus.OK, body.encode(), "application/json")
                else:
                    raise FileNotFoundError(path)
            except ActstoreError as e:  # what the reader asked for is wrong: say so
                self._error(HTTPStatus.BAD_REQUEST, str(e))
            except FileNotFoundError as e:
                self._error(HTTPStatus.NOT_FOUND, f"not found: {e}")
            except Exception as e:  # noqa: BLE001 - a failed answer must not stop the server
                print(f"actstore view: {self.path}: {type(e).__name__}: {e}", file=sys.stderr)
                self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"{type(e).__name__}: {e}")

        def _send(self, status: HTTPStatus, body: bytes, ctype: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store" if ctype == "application/json" else "max-age=3600")
            self.end_headers()
            self.wfile.write(body)

        def _error(self, status: HTTPStatus, message: str) -> None:
            self._send(status, json.dumps({"error": message}).encode(), "application/json")

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's name
            pass  # one line per chart request would bury the URL the user needs

    return Handler


class ViewServer:
    """A running viewer: ``url``, ``serve_forever()`` (CLI) or ``start()`` (background)."""

    def __init__(self, app: ViewApp, host: str = "127.0.0.1", port: int = 8765):
        self.app = app
        self.httpd = ThreadingHTTPServer((host, port), _handler(app))
        self.httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        raw, port = self.httpd.server_address[:2]
        host = raw.decode() if isinstance(raw, bytes) else str(raw)
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{port}/?run={quote(self.app.default)}"

    def start(self) -> ViewServer:
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="actstore-view", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self.httpd.serve_forever()

    def shutdown(self) -> None:
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread.join()
        self.httpd.server_close()


def serve(
    store: Any, run: str = "latest", host: str = "127.0.0.1", port: int = 0, model: Any = None
) -> ViewServer:
    """Start the viewer for ``run`` of ``store`` in a background thread (``port=0``: any
    free port); ``.url`` is where to point a browser, ``.shutdown()`` stops it. ``model``:
    a LoadedModel for the logit lens (else each run's own model is loaded when asked)."""
    return ViewServer(ViewApp(store, run, model), host, port).start()
