"""The viewer's answers by route, independent of HTTP: runs opened once, models loaded
once, request parameters checked and handed to :mod:`actstore.view.api`.

>>> app = ViewApp(ActStore.open("stores/actstore.zarr"), "latest")      # doctest: +SKIP
>>> app.answer("heatmap", Params([("layer", "3"), ("step", "0")]))      # doctest: +SKIP

:data:`ROUTES` says, per route, its HTTP method and whether it is *heavy* (reads or
computes more than metadata: the server runs those in a few slots at a time). Everything
that loads a model, saves a file or starts a job is a POST (today: the logit lens,
which loads the run's model on first use); every other route only reads the store.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from actstore.errors import SelectionError
from actstore.view import api, builder


@dataclass(frozen=True)
class RouteInfo:
    method: str  # "GET" (reads the store) or "POST" (loads a model, writes, starts a job)
    heavy: bool  # reads or computes more than metadata: runs in one of the server's slots
    cached: bool = True  # a GET whose answer only changes with its parameters (runs are immutable)


ROUTES: dict[str, RouteInfo] = {
    "runs": RouteInfo("GET", False, cached=False),  # a capture job adds runs
    "summary": RouteInfo("GET", False),
    "heatmap": RouteInfo("GET", True),
    "top_neurons": RouteInfo("GET", True),
    "trajectory": RouteInfo("GET", True),
    "decomposition": RouteInfo("GET", True),
    "pair": RouteInfo("GET", True),
    "group": RouteInfo("GET", True),
    "depth": RouteInfo("GET", True),
    "next_token": RouteInfo("GET", True),
    "cross_layer": RouteInfo("GET", True),
    "state_map": RouteInfo("GET", True),
    "logit_lens": RouteInfo("POST", True),
    # the scenario builder (view/builder.py): files of the scenarios folder, models, jobs
    "scenarios": RouteInfo("GET", False, cached=False),
    "scenario": RouteInfo("GET", False, cached=False),
    "clone": RouteInfo("GET", False),
    "models": RouteInfo("GET", False, cached=False),
    "jobs": RouteInfo("GET", False, cached=False),
    "validate": RouteInfo("POST", False),
    "render": RouteInfo("POST", False),
    "save": RouteInfo("POST", False),
    "launch": RouteInfo("POST", False),
    "cancel": RouteInfo("POST", False),
}
MAX_VALUES = 256  # parameters in one request (a group's states are the most)


class Params:
    """A request's parameters: name -> values in the order given (a query string may
    repeat a name; a JSON body gives one value or a list). Typed getters raise
    :class:`SelectionError` with the parameter's name."""

    def __init__(self, items: Iterable[tuple[str, str]] = ()):
        self._values: dict[str, list[str]] = {}
        for n, (k, v) in enumerate(items):
            if n >= MAX_VALUES:
                raise SelectionError(f"too many parameters (at most {MAX_VALUES})")
            self._values.setdefault(k, []).append(v)

    @classmethod
    def from_json(cls, body: Any) -> Params:
        """A JSON object's members: strings, numbers, booleans or lists of them."""
        if not isinstance(body, dict):
            raise SelectionError("the request body must be a JSON object")
        items: list[tuple[str, str]] = []
        for k, v in body.items():
            for x in v if isinstance(v, list) else [v]:
                if isinstance(x, bool):
                    items.append((k, "true" if x else "false"))
                elif isinstance(x, (str, int, float)):
                    items.append((k, str(x)))
                elif x is not None:
                    raise SelectionError(f"{k}: expected a string, number or list of them")
        return cls(items)

    def key(self) -> tuple[tuple[str, tuple[str, ...]], ...]:
        """The parameters as a hashable value (names sorted, each name's values in order)."""
        return tuple((k, tuple(v)) for k, v in sorted(self._values.items()))

    def get(self, name: str, default: str | None = None) -> str | None:
        values = self._values.get(name)
        return values[-1] if values else default

    def text(self, name: str, default: str) -> str:
        return self.get(name) or default

    def all(self, name: str) -> list[str]:
        return list(self._values.get(name, []))

    def as_int(self, name: str, default: int | None = None) -> int | None:
        value = self.get(name, "") or ""
        if value in ("", "mean", "none"):
            return default
        try:
            return int(value)
        except ValueError:
            raise SelectionError(f"{name} must be a whole number, not {value!r}") from None

    def req_int(self, name: str) -> int:
        value = self.as_int(name)
        if value is None:
            raise SelectionError(f"missing {name}")
        return value

    def as_float(self, name: str, default: float) -> float:
        value = self.get(name)
        if value in (None, ""):
            return default
        try:
            return float(value)  # type: ignore[arg-type]
        except ValueError:
            raise SelectionError(f"{name} must be a number, not {value!r}") from None

    def flag(self, name: str) -> bool:
        value = (self.get(name) or "false").lower()
        if value not in ("true", "false", "1", "0", "yes", "no"):
            raise SelectionError(f"{name} must be true or false, not {value!r}")
        return value in ("true", "1", "yes")


def parse_steps(text: str | None) -> list[int] | None:
    """``"all"`` (or nothing) -> None; ``"0,5,-1"`` -> [0, 5, -1]."""
    if text is None or text.strip().lower() in ("", "all"):
        return None
    try:
        return [int(s) for s in text.split(",")]
    except ValueError:
        raise SelectionError(f"steps {text!r}: use all or a list of steps like 0,5,-1") from None


class ViewApp:
    """Runs of one store, opened once each, and the answers the page asks for."""

    MAX_OPEN_RUNS = 64

    def __init__(
        self, store: Any, default_run: str = "latest", model: Any = None, device: str | None = None,
        scenarios: str | Path | None = None,
    ):  # fmt: skip
        self.store = store
        # The scenario builder's folder (None: the builder only validates and clones)
        self.scenarios = builder.ScenarioFolder(scenarios) if scenarios is not None else None
        self._jobs: builder.CaptureJobs | None = None
        self.default = store.run(default_run).id  # fails now, not on the first request
        self._runs: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()
        # The logit lens needs the run's model: ``model`` (a LoadedModel already in
        # memory) serves the runs captured with it (same model id); any other run's
        # scenario model is loaded on its first lens request (``device`` overrides its
        # device) and kept.
        self.model, self.device = model, device
        self._models: dict[str, Any] = {}
        self._model_lock = threading.Lock()

    def loaded_model(self, run: Any) -> Any:
        if self.model is not None and run.meta["model"]["id"] == self.model.model_id:
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
        """The run a selector names, opened once (the most recent MAX_OPEN_RUNS kept)."""
        key = selector or self.default
        with self._lock:
            if key in self._runs:
                self._runs.move_to_end(key)
                return self._runs[key]
        reader = self.store.run(key)
        with self._lock:
            self._runs[key] = reader
            while len(self._runs) > self.MAX_OPEN_RUNS:
                self._runs.popitem(last=False)
        return reader

    def selected(self, items: list[str], run: str | None) -> list[Any]:
        """``RUN@STATE`` or ``STATE`` items (``query.selection``); a bare STATE is the
        state of ``run`` (the run the page shows)."""
        from actstore.query.selection import Selected, parse_item

        parsed = [parse_item(text) for text in items]  # every item checked before a run opens
        return [Selected(self.run(r or run), state) for r, state in parsed]

    def layers(self, q: Params, runs: list[Any]) -> list[int] | None:
        """The ``layers`` parameter (``all``, ``29-33``, ``0,5,10``) against the layers
        every run captured (``query.layers``)."""
        from actstore.query.layers import choose_layers, common_layers

        return choose_layers(q.text("layers", "all"), common_layers(runs)).layers

    def answer(self, route: str, q: Params) -> Any:
        """The JSON answer of an ``/api/<route>`` request."""
        if route == "runs":
            return {"runs": api.runs(self.store), "default": self.default}
        if route not in ROUTES:
            raise SelectionError(f"unknown request /api/{route}")
        handlers: dict[str, Callable[[], Any]] = {
            "summary": lambda: api.summary(self.run(q.get("run"))),
            "heatmap": lambda: api.heatmap(self.run(q.get("run")), q.text("source", "hidden_out"),
                                           q.as_int("layer"), q.as_int("step", 0) or 0, q.as_int("head"),
                                           q.text("reduce", "signed"), q.as_int("bins")),
            "top_neurons": lambda: api.top_neurons(self.run(q.get("run")), q.text("source", "hidden_out"),
                                                   q.as_int("layer"), q.as_int("step", 0) or 0),
            "trajectory": lambda: api.trajectory(self.run(q.get("run")), q.text("source", "hidden_out"),
                                                 q.req_int("layer"), q.req_int("neuron"), q.text("over", "steps")),
            "decomposition": lambda: api.decomposition(self.run(q.get("run")), q.as_int("step", 0) or 0),
            "logit_lens": lambda: self._lens(q),
            "pair": lambda: self._pair(q),
            "group": lambda: self._group(q),
            "depth": lambda: self._depth(q),
            "next_token": lambda: api.next_token(self.run(q.get("run")), parse_steps(q.get("steps"))),
            "cross_layer": lambda: self._cross_layer(q),
            "state_map": lambda: self._state_map(q),
            "scenarios": lambda: self._scenario_files(),
            "scenario": lambda: self._scenario_file(q.text("name", "")),
            "clone": lambda: builder.clone(self.run(q.get("run"))),
            "models": lambda: {"models": builder.available_models()},
            "jobs": lambda: self._job_list(q),
            "validate": lambda: {"problems": builder.problems(q.text("text", ""), q.text("name", "scenario.yaml")),
                                 "data": builder.parsed(q.text("text", ""))},
            "render": lambda: builder.render(q.text("data", "{}")),
            "save": lambda: self._save(q),
            "launch": lambda: self.jobs().launch(q.text("name", "")),
            "cancel": lambda: self.jobs().cancel(q.req_int("job")),
        }  # fmt: skip
        return handlers[route]()

    def _cross_layer(self, q: Params) -> Any:
        state = q.get("state")
        if not state:
            raise SelectionError("cross_layer needs a state: state=STATE (or RUN@STATE)")
        (sel,) = self.selected([state], q.get("run"))
        return api.cross_layer(sel, q.text("source", "hidden_out"), self.layers(q, [sel.run]))

    def _state_map(self, q: Params) -> Any:
        state = q.get("state")
        if not state:
            raise SelectionError("state_map needs a state: state=STATE (or RUN@STATE)")
        (sel,) = self.selected([state], q.get("run"))
        return api.state_map(sel, q.text("source", "hidden_out"), q.as_int("layer"), q.as_int("head"),
                             q.as_int("bins"))  # fmt: skip

    # ---- the scenario builder ------------------------------------------------------------
    def folder(self) -> builder.ScenarioFolder:
        if self.scenarios is None:
            raise SelectionError("no scenarios folder: start actstore view with --scenarios DIR")
        return self.scenarios

    def jobs(self) -> builder.CaptureJobs:
        with self._lock:
            if self._jobs is None:
                self._jobs = builder.CaptureJobs(self.folder(), str(self.store.location))
            return self._jobs

    def close(self) -> None:
        """Stop the capture jobs (a running one is cancelled)."""
        if self._jobs is not None:
            self._jobs.close()

    def _scenario_files(self) -> dict[str, Any]:
        if self.scenarios is None:  # a page without a builder folder is no error
            return {"folder": None, "files": []}
        return {"folder": self.scenarios.root.name, "files": self.scenarios.files()}

    def _scenario_file(self, name: str) -> dict[str, Any]:
        text = self.folder().read(name)
        return {"name": name, "text": text, "problems": builder.problems(text, name)}

    def _save(self, q: Params) -> dict[str, Any]:
        name, text = q.text("name", ""), q.text("text", "")
        problems = builder.problems(text, name)
        if any(p["severity"] == "error" for p in problems) and not q.flag("anyway"):
            raise SelectionError(f"{name}: not saved: the scenario has errors (fix them, or save anyway)")
        return self.folder().save(name, text, overwrite=q.flag("overwrite")) | {"problems": problems}

    def _job_list(self, q: Params) -> dict[str, Any]:
        if self._jobs is None:
            return {"jobs": []}
        job = q.as_int("job")
        return {"jobs": self._jobs.all()} if job is None else {"job": self._jobs.get(job)}

    def _lens(self, q: Params) -> Any:
        run = self.run(q.get("run"))
        position = q.as_int("position")
        return api.logit_lens_step(run, self.loaded_model(run), q.as_int("step", 0) or 0, q.as_int("top_k", 5) or 5,
                                   -1 if position is None else position)  # fmt: skip

    def _sources(self, q: Params) -> list[str] | None:
        return q.all("source") or None

    def _frac(self, q: Params) -> float:
        frac = q.as_float("frac", 0.01)
        if not 0 < frac <= 1:
            raise SelectionError(f"frac must be in (0, 1], not {frac}")
        return frac

    def _pair(self, q: Params) -> Any:
        a, b = (q.get(n) for n in ("a", "b"))
        if not a or not b:
            raise SelectionError("a pair needs two states: a=STATE&b=STATE (or RUN@STATE)")
        sa, sb = self.selected([a, b], q.get("run"))
        return api.pair(sa, sb, q.text("what", "vectors"), self._sources(q), self.layers(q, [sa.run, sb.run]),
                        self._frac(q), q.flag("magnitude"), q.as_int("layer"), q.as_int("head"),
                        q.as_int("bins"))  # fmt: skip

    def _group(self, q: Params) -> Any:
        sel = self.selected(q.all("state"), q.get("run"))
        return api.group(sel, q.text("what", "centroid"), self._sources(q), self.layers(q, [s.run for s in sel]),
                         self._frac(q), q.flag("magnitude"), q.as_int("components", 2) or 2)  # fmt: skip

    def _depth(self, q: Params) -> Any:
        state = q.get("state")
        if not state:
            raise SelectionError("depth needs a state: state=STATE (or RUN@STATE)")
        (sel,) = self.selected([state], q.get("run"))
        return api.depth(sel, q.text("what", "convergence"), q.text("source", "hidden_out"),
                         self.layers(q, [sel.run]), q.as_int("layer"), q.as_int("head"), q.as_float("threshold", 0.99),
                         q.as_int("bins"))  # fmt: skip
