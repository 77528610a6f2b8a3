"""``actstore view``: a thin command over :mod:`actstore.view`; ``actstore.cli`` calls
:func:`register`."""

from __future__ import annotations

import click

from actstore.cli.common import _fail_cleanly, open_store, store_options
from actstore.errors import OptionError


def register(main: click.Group) -> None:
    """Add the viewer command to the ``actstore`` group."""

    @main.command("view")
    @click.argument("run", default="latest")
    @store_options
    @click.option("--host", default="127.0.0.1", show_default=True,
                  help="address to listen on (the default is reachable from this machine only; any other "
                       "address requires the access token on every request)")  # fmt: skip
    @click.option(
        "--port", type=int, default=8765, show_default=True, help="port to listen on (0: any free port)"
    )
    @click.option("--no-browser", is_flag=True, help="print the address instead of opening a browser")
    @click.option("--device", default=None, help="device for the logit lens model (default: the scenario's)")
    @click.option("--token", default=None, envvar="ACTSTORE_VIEW_TOKEN", show_envvar=True,
                  help="access token (default: a random one per start, printed in the address)")  # fmt: skip
    @click.option("--scenarios", "scenarios", default="scenarios", show_default=True,
                  type=click.Path(file_okay=False),
                  help="the scenario builder's folder: the only one it lists, opens and saves into")  # fmt: skip
    @_fail_cleanly
    def view_cmd(
        run: str, host: str, port: int, no_browser: bool, device: str | None, token: str | None,
        scenarios: str, store_location: str | None, storage_options: tuple[str, ...],
    ) -> None:  # fmt: skip
        """Explore RUN in the browser: tokens, a heatmap per layer x step, top-k, neuron
        trajectories, the residual decomposition, the logit lens, states compared side by
        side and through depth, and a scenario builder that saves into --scenarios and
        launches captures (a local server; Ctrl-C stops it). The printed address carries an access token: GETs on loopback need
        none, anything that loads a model does, and so does every request when --host is
        not a loopback address."""
        import os

        # Answers are computed in parallel slots: NumPy's BLAS gets one thread each (unless
        # the user says otherwise), or concurrent answers oversubscribe the cores (on 2
        # busy cores a group PCA took 2.9 s with OpenBLAS's threads, 0.4 s without). Set
        # before NumPy is imported, which the imports below do.
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
        from actstore.view.app import ViewApp
        from actstore.view.security import is_loopback
        from actstore.view.server import ViewServer

        if not 0 <= port <= 65535:  # checked before the store opens; socket would raise OverflowError
            raise OptionError(f"--port {port}: ports are 0-65535 (0: any free port)")
        if token is not None and (len(token) < 8 or not token.isascii() or not token.isprintable() or " " in token):
            raise OptionError("--token: use 8 or more printable ASCII characters without spaces")
        app = ViewApp(open_store(store_location, storage_options), run, device=device, scenarios=scenarios)
        try:
            server = ViewServer(app, host, port, token=token)
        except OSError as e:
            raise OptionError(
                f"--port {port}: cannot listen on {host}:{port} ({e.strerror or e}); pick another --port"
            ) from None
        click.echo(f"actstore view: {server.url}  (Ctrl-C stops)")
        if not is_loopback(host):
            click.echo(f"note: listening on {host}: every request needs the token in this address", err=True)
        if not no_browser:
            import webbrowser

            webbrowser.open(server.url)
        try:
            server.serve_forever()
        except KeyboardInterrupt:  # Ctrl-C and SIGTERM (cli.common._interruptible): a clean stop, exit 0
            pass
        finally:
            server.shutdown()
