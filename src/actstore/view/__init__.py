"""``actstore view``: explore one run in the browser, reading only what is on screen.

>>> from actstore.view import serve                                   # doctest: +SKIP
>>> server = serve(actstore.open_store("stores/actstore.zarr"), "latest")  # doctest: +SKIP
>>> print(server.url)                                                 # doctest: +SKIP

``api`` turns a run into JSON answers through the query layer (tokens and top-k,
one layer x step heatmap, the loudest neurons, a neuron's trajectory, the residual
decomposition); ``server`` serves them and the page (``static/``) on loopback.
"""

from __future__ import annotations

from actstore.view.server import ViewApp, ViewServer, serve

__all__ = ["ViewApp", "ViewServer", "serve"]
