"""``actstore view``: a thin command over :mod:`actstore.view`; ``actstore.cli`` calls
:func:`register`."""

from __future__ import annotations

import click

from actstore.cli.common import _fail_cleanly, open_store, stop_on_signals, store_options
from actstore.errors import OptionError


def register(main: click.Group) -> None:
    """Add the viewer command to the ``actstore`` group."""

    @main.command("view")
    @click.argument("run", default="latest")
    @store_options
    @click.option("--host", default="127.0.0.1", show_default=True,
                  help="address to listen on (the default is reachable from this machine only)")  # fmt: skip
    @click.option(
        "--port", type=int, default=8765, show_default=True, help="port to listen on (0: any free port)"
    )
    @click.option("--no-browser", is_flag=True, help="print the address instead of opening a browser")
    @click.option("--device", default=None, help="device for the logit lens model (default: the scenario's)")
    @_fail_cleanly
    def view_cmd(
        run: str, host: str, port: int, no_browser: bool, device: str | None, store_location: str | None,
        storage_options: tuple[str, ...],
    ) -> None:  # fmt: skip
        """Explore RUN in the browser: tokens, a heatmap per layer x step, top-k, neuron
        trajectories, the residual decomposition, the logit lens (a local server; Ctrl-C
        stops it)."""
        from actstore.view.server import ViewApp, ViewServer

        if not 0 <= port <= 65535:  # checked before the store opens; socket would raise OverflowError
            raise OptionError(f"--port {port}: ports are 0-65535 (0: any free port)")
        app = ViewApp(open_store(store_location, storage_options), run, device=device)
        try:
            server = ViewServer(app, host, port)
        except OSError as e:
            raise OptionError(
                f"--port {port}: cannot listen on {host}:{port} ({e.strerror}); pick another --port"
            ) from None
        stop_on_signals()  # Ctrl-C and SIGTERM stop the server cleanly (exit 0)
        click.echo(f"actstore view: {server.url}  (Ctrl-C stops)")
        if not no_browser:
            import webbrowser

            webbrowser.open(server.url)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            server.httpd.server_close()
