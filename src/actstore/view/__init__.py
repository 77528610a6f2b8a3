"""``actstore view``: explore one run in the browser, reading only what is on screen.

>>> from actstore.view import serve                                   # doctest: +SKIP
>>> server = serve(actstore.open_store("stores/actstore.zarr"), "latest")  # doctest: +SKIP
>>> print(server.url)                                                 # doctest: +SKIP

``api`` turns a run into JSON answers through the query layer (tokens and top-k,
one layer x step heatmap, the loudest neurons, a neuron's trajectory, the residual
decomposition, the logit lens, and the lab's pair, group, depth and next-token
analyses); ``app`` routes requests to them; ``server`` serves them and the page
(``static/``) with Starlette on uvicorn, on loopback unless told otherwise, under the
rules of ``security`` (Host, Origin, access token).
"""

from __future__ import annotations

from actstore.view.app import ViewApp
from actstore.view.server import ViewServer, serve

__all__ = ["ViewApp", "ViewServer", "serve"]
