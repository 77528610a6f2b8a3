"""Forward hooks, registered once per run, that hand activations to the current sink.

``Recorder`` is a context manager: entering registers exactly the hooks the capture
plan needs (nothing for sources that are off, nothing for derived ones), leaving
removes them, also on error. Each hook does the minimum on the forward path: take the
tensor, drop the batch axis, cast to the store dtype (an asynchronous device op, no
host sync) and put it in a dict. Two modes:

* ``"step"``: every position of the pass, every planned source, for the writer;
* ``"last"``: only the last position of the residual-stream sources;
* ``"full"``: both at once, for full snapshot and reference passes: every position of
  every planned source in ``.tensors``, the last position in ``.last`` (with
  ``last_rows`` set, those rows instead: the last of each sequence packed into one pass);
* ``None``: hooks return at once (uncaptured passes such as a shared prefix).

Keys are ``(source, layer)`` for per-layer sources, ``("residual", boundary)`` for the
residual stream (see store.layout.residual_boundaries) and ``("embeddings", None)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from actstore.models.architectures import ModelSites
from actstore.store.layout import residual_boundaries

Key = tuple[str, int | None]
LAST_SOURCES = ("residual", "attn_out", "mlp_down_out")


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple | list) else output


class Recorder:
    """Hooks for one run; the captured tensors of the current pass are in ``.tensors``."""

    def __init__(
        self,
        sites: ModelSites,
        layers: list[int],
        sources: set[str],
        store_dtype: torch.dtype,
        *,
        keep_last: bool = True,
    ):
        self.sites, self.layers, self.sources = sites, layers, sources
        self.dtype = store_dtype
        self.keep_last = keep_last  # snapshots/references need the residual sources
        self.mode: str | None = None
        self.last_rows: list[int] | None = None  # "full" mode: rows kept in .last (default: the last)
        self.tensors: dict[Key, torch.Tensor] = {}
        self.last: dict[Key, torch.Tensor] = {}
        self._handles: list[Any] = []

    # ---- what to hook -------------------------------------------------------------
    def _wants(self, source: str) -> bool:
        """A site is hooked when a step source or the snapshot vectors need it."""
        if source in self.sources:
            return True
        return self.keep_last and source in ("hidden_in", "hidden_out", "attn_out", "mlp_down_out")

    def __enter__(self) -> Recorder:
        s = self.sites
        try:
            if self._wants("hidden_in") or self._wants("hidden_out"):
                captured = set(self.layers)
                for b in residual_boundaries(self.layers):
                    if b - 1 in captured:  # leaving layer b-1 is entering layer b: hook once
                        self._out(s.layers[b - 1].block, ("residual", b), "residual")
                    else:
                        self._pre(s.layers[b].block, ("residual", b))
            if "embeddings" in self.sources:
                self._out(s.embed, ("embeddings", None), "embeddings")
            for layer in self.layers:
                self._hook_layer(layer)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _hook_layer(self, layer: int) -> None:
        ls = self.sites.layers[layer]
        if {"q", "k", "v"} & self.sources:
            if ls.qkv is not None:
                self._fused(ls.qkv, layer, ("q", "k", "v"), self.sites.split_qkv)
            else:
                for name, mod in (("q", ls.q), ("k", ls.k), ("v", ls.v)):
                    if mod is not None:
                        self._out(mod, (name, layer), name)
        if self._wants("attn_out"):
            self._out(ls.o, ("attn_out", layer), "attn_out")
        if "attn_weights" in self.sources:
            self._hook(ls.attn, self._attn_hook(layer))
        if "mlp_gate" in self.sources or "mlp_up" in self.sources:
            if ls.gate_up is not None:
                self._fused(ls.gate_up, layer, ("mlp_gate", "mlp_up"), self.sites.split_gate_up)
            else:
                if ls.gate is not None:
                    self._out(ls.gate, ("mlp_gate", layer), "mlp_gate")
                if ls.up is not None:
                    self._out(ls.up, ("mlp_up", layer), "mlp_up")
        if "mlp_act" in self.sources:
            self._out(ls.act, ("mlp_act", layer), "mlp_act")
        if self._wants("mlp_down_out"):
            self._out(ls.down, ("mlp_down_out", layer), "mlp_down_out")

    # ---- hook factories -------------------------------------------------------------
    def _hook(self, module: nn.Module, fn: Callable[..., None]) -> None:
        self._handles.append(module.register_forward_hook(fn))

    def _keep(self, key: Key, kind: str, t: torch.Tensor) -> None:
        """Store ``t`` (batch, seq, ...) under ``key`` according to the mode."""
        if self.mode in ("step", "full"):
            if kind in self.sources or (kind == "residual" and "hidden_in" in self.sources):
                self.tensors[key] = t[0].detach().to(self.dtype)
        if self.mode in ("last", "full") and kind in LAST_SOURCES:
            rows = -1 if self.last_rows is None or self.mode != "full" else self.last_rows
            (self.last if self.mode == "full" else self.tensors)[key] = t[0, rows].detach().float()

    def _out(self, module: nn.Module, key: Key, kind: str) -> None:
        def hook(_m: nn.Module, _args: Any, output: Any) -> None:
            if self.mode is not None:
                self._keep(key, kind, _first(output))

        self._hook(module, hook)

    def _pre(self, module: nn.Module, key: Key) -> None:
        def hook(_m: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
            if self.mode is not None:
                self._keep(key, "residual", args[0] if args else kwargs["hidden_states"])

        self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))

    def _fused(
        self,
        module: nn.Module,
        layer: int,
        names: tuple[str, ...],
        split: Callable[[torch.Tensor], tuple[torch.Tensor, ...]],
    ) -> None:
        def hook(_m: nn.Module, _args: Any, output: Any) -> None:
            if self.mode in ("step", "full"):
                for name, part in zip(names, split(_first(output)), strict=True):
                    self._keep((name, layer), name, part)

        self._hook(module, hook)

    def _attn_hook(self, layer: int) -> Callable[..., None]:
        def hook(_m: nn.Module, _args: Any, output: Any) -> None:
            if self.mode in ("step", "full"):
                weights = output[1] if isinstance(output, tuple | list) and len(output) > 1 else None
                if weights is None:
                    raise RuntimeError(
                        "attention module returned no weights: load the model with "
                        "attn_implementation='eager' to capture attention_weights"
                    )
                self.tensors[("attn_weights", layer)] = weights[0].detach().to(self.dtype)

        return hook

    # ---- per pass ---------------------------------------------------------------------
    def take(self) -> dict[Key, torch.Tensor]:
        """The tensors of the pass that just ran; resets for the next one."""
        out, self.tensors = self.tensors, {}
        return out

    def take_last(self) -> dict[Key, torch.Tensor]:
        """The last-position vectors of the ``"full"`` pass that just ran; resets."""
        out, self.last = self.last, {}
        return out

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.mode = None
