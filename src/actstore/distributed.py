"""Running actstore beyond one machine: queries on a dask.distributed cluster, and
captures fanned out to its workers.

>>> from actstore.distributed import scheduler                       # doctest: +SKIP
>>> with scheduler("tcp://10.0.0.5:8786"):                           # doctest: +SKIP
...     df = intra_run(ActStore.open("s3://lab/acts.zarr").runs())   # runs on the cluster

Data flow of a query: the query layer builds a Dask graph on the client (this opens run
metadata, no tensor bytes); inside :func:`scheduler` the ``dask.compute`` it calls goes to
the cluster's scheduler, the workers read the chunks straight from the store (the graph
carries the zarr arrays, which pickle as "store URL + key"), reduce them, and only the
small answer comes back. Workers therefore need the same store: an object-storage URL
(credentials from their own environment or from storage options) or a shared path.

Data flow of a capture (:func:`capture_on_cluster`): the client validates every scenario,
then submits one task per scenario (``resources={"GPU": 1}`` when any worker advertises a
GPU). Each worker loads the model (kept for its next scenario), captures, writes its
runs into the shared store and commits them (the commit marker rule makes concurrent
writers safe), then returns small :class:`CaptureResult` records that the client reports
as they complete.
"""

from __future__ import annotations

import functools
import os
import socket
import sys
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from actstore.errors import ActstoreError

if TYPE_CHECKING:  # distributed is imported lazily: local use never pays for it
    from distributed import Client

    from actstore.capture.runner import CaptureResult
    from actstore.scenario import Scenario

SCHEDULER_ENV = "ACTSTORE_SCHEDULER"
LOCAL_PREFIX = "local"  # "local" or "local:N": start a throwaway LocalCluster of N processes


class ClusterError(ActstoreError, ConnectionError):
    """The scheduler is unreachable, or tasks failed on the cluster."""


# ---- where Dask graphs run -------------------------------------------------------------------
@contextmanager
def scheduler(address: str | None = None, *, timeout: float = 30.0) -> Iterator[Client | None]:
    """Run every ``dask.compute`` inside the block on ``address``.

    ``None`` or ``""``: the local threaded scheduler (yields None). ``tcp://host:8786``
    (or any address ``dask scheduler`` printed): connect a Client, set as default for the
    block, closed after. ``local`` / ``local:N``: start a LocalCluster of N worker
    processes (default 2) for the block, handy to try the cluster path on one machine.
    """
    import dask

    if not address:
        with dask.config.set(scheduler="threads"):
            yield None
        return
    from distributed import Client, LocalCluster

    cluster = None
    # A Client made default sets dask's global "scheduler"; one that fails half-way does
    # not take it back, and every later compute in the process would then ask for a
    # client that does not exist. Restore what was there, whatever happens.
    saved = {k: dask.config.get(k, None) for k in ("scheduler", "shuffle")}
    if address == LOCAL_PREFIX or address.startswith(LOCAL_PREFIX + ":"):
        n = _local_workers(address)
        cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None)
        address = cluster.scheduler_address
    try:
        try:
            _check_address(address)
            client = Client(address, timeout=timeout, set_as_default=True)
        except ValueError as e:  # distributed's word for an address it cannot parse
            raise ClusterError(
                f"--scheduler {address}: not a scheduler address ({e}); use tcp://HOST:PORT or local:N"
            ) from e
        except (OSError, TimeoutError) as e:
            raise ClusterError(
                f"cannot reach a Dask scheduler at {address!r} ({e}); start one with `dask scheduler` "
                f"and workers with `dask worker {address}`"
            ) from e
        try:
            yield client
        finally:
            client.close()
    finally:
        if cluster is not None:
            cluster.close()
        for key, value in saved.items():
            if value is None:
                dask.config.config.pop(key, None)
            else:
                dask.config.set({key: value})


def _check_address(address: str) -> None:
    """ValueError for an address distributed cannot parse, decided here: Client() itself
    sometimes fails an internal assertion instead, depending on what ran before it in
    the process."""
    from distributed.comm.addressing import parse_address, parse_host_port

    scheme, location = parse_address(address, strict=False)
    if scheme in ("tcp", "tls"):
        parse_host_port(location)


def _local_workers(address: str) -> int:
    """N of ``local:N`` (2 for ``local``). N must be at least 1: a cluster without
    workers accepts tasks and never runs them."""
    text = address.partition(":")[2] or "2"
    if not text.isdigit() or int(text) < 1:
        raise ClusterError(
            f"--scheduler {address}: N in local:N must be a whole number of workers, 1 or more"
        )
    return int(text)


def _scheduler_param() -> Any:
    import click

    return click.Option(
        ["--scheduler", "scheduler_address"],
        envvar=SCHEDULER_ENV,
        default=None,
        metavar="ADDRESS",
        help=f"run on a dask.distributed scheduler, e.g. tcp://10.0.0.5:8786, or local:N for a "
        f"throwaway local cluster (default: ${SCHEDULER_ENV}, else run here on the local threaded scheduler)",
    )


def scheduler_address_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``--scheduler ADDRESS`` (env ACTSTORE_SCHEDULER), passed as ``scheduler_address``."""
    fn.__dict__.setdefault("__click_params__", []).append(_scheduler_param())
    return fn


def _within_scheduler(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a command callback: pop ``scheduler_address``, run the body inside
    :func:`scheduler`. A ClusterError (unreachable scheduler) is one line and exit code 2,
    like every ActstoreError on the command line."""

    @functools.wraps(fn)
    def wrapper(*args: Any, scheduler_address: str | None = None, **kwargs: Any) -> Any:
        try:
            with scheduler(scheduler_address):
                return fn(*args, **kwargs)
        except ClusterError as e:
            import click

            click.echo(f"error: {e}", err=True)
            sys.exit(2)

    return wrapper


def scheduler_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Click decorator: adds ``--scheduler`` and runs the command body inside
    :func:`scheduler`, so every ``.compute()`` in it goes to the cluster."""
    return scheduler_address_option(_within_scheduler(fn))


def add_scheduler_option(cmd: Any) -> None:
    """Give a click command (or every command of a group, recursively) ``--scheduler``.
    ``actstore.cli`` applies this to the ``query`` and ``report`` groups after they
    register, so their modules need not know about clusters."""
    import click

    if isinstance(cmd, click.Group):
        for sub in cmd.commands.values():
            add_scheduler_option(sub)
        return
    if cmd.callback is None or any(p.name == "scheduler_address" for p in cmd.params):
        return
    cmd.params.append(_scheduler_param())
    cmd.callback = _within_scheduler(cmd.callback)


# ---- capture fan-out ----------------------------------------------------------------------
def worker_location(location: str) -> str:
    """A store location as workers must see it: URLs as they are, paths made absolute
    (a worker's working directory is not the client's)."""
    if "://" in location and not location.startswith("file://"):
        return location
    return os.path.abspath(location.removeprefix("file://"))


def gpu_resources(client: Client) -> dict[str, float] | None:
    """``{"GPU": 1}`` when any worker advertises a GPU resource (then captures go only
    there, one per GPU), else None (any worker)."""
    workers = client.scheduler_info(n_workers=-1)["workers"].values()
    return {"GPU": 1} if any(w.get("resources", {}).get("GPU", 0) >= 1 for w in workers) else None


def _local_hosts() -> set[str]:
    hosts = {"127.0.0.1", "localhost", "::1", socket.gethostname()}
    try:
        hosts.update(socket.gethostbyname_ex(socket.gethostname())[2])
    except OSError:
        pass
    return hosts


def _warn_if_path_not_shared(client: Client, locations: Iterable[str]) -> None:
    paths = sorted({loc for loc in locations if "://" not in loc})
    if not paths:
        return
    hosts = {urlsplit(a).hostname for a in client.scheduler_info(n_workers=-1)["workers"]}
    remote = sorted(h for h in hosts if h and h not in _local_hosts())
    if remote:
        warnings.warn(
            f"store {paths[0]} is a local path but workers run on {', '.join(remote)}: it must be a "
            "shared filesystem mounted at the same path there (or use an s3:// URL)",
            stacklevel=3,
        )


# Worker-side state: the last loaded model (loading is the slow part of a small capture),
# and a lock because a model's hooks serve one capture at a time.
_MODEL_CACHE: dict[tuple[Any, ...], Any] = {}
_CAPTURE_LOCK = threading.Lock()


def _model_key(sc: Scenario) -> tuple[Any, ...]:
    from actstore.capture.runner import attn_implementation

    m = sc.model
    return (m.id, m.dtype, m.device, m.gguf_file, m.trust_remote_code, attn_implementation(sc))


def capture_task(
    scenario: Scenario, location: str, storage_options: dict[str, Any] | None = None
) -> list[CaptureResult]:
    """What one worker runs for one scenario: load (or reuse) the model, capture, commit."""
    from actstore.capture.runner import attn_implementation, capture
    from actstore.models.loading import load_model

    with _CAPTURE_LOCK:
        key = _model_key(scenario)
        if key not in _MODEL_CACHE:
            _MODEL_CACHE.clear()  # one model per worker: free the last before loading the next
            _MODEL_CACHE[key] = load_model(scenario.model, attn_implementation=attn_implementation(scenario))
        # capture() creates the store only once the model fits the scenario (layers,
        # context, memory)
        return capture(scenario, location, loaded=_MODEL_CACHE[key], progress=False,
                       storage_options=storage_options)  # fmt: skip


def capture_on_cluster(
    scenarios: list[Scenario],
    client: Client,
    store_location: str | None = None,
    *,
    storage_options: dict[str, Any] | None = None,
    progress: bool = True,
    task: Callable[..., list[CaptureResult]] = capture_task,
) -> Iterator[CaptureResult]:
    """Capture each scenario as one task on the cluster; yield results as runs commit.

    ``store_location`` overrides each scenario's ``output.store``. Failed scenarios do not
    stop the others; after the last one a :class:`ClusterError` names every failure.
    A worker that dies mid-capture leaves an uncommitted (invisible) run group, and the
    scheduler re-runs its task elsewhere.
    """
    from distributed import as_completed
    from tqdm.auto import tqdm

    from actstore.scenario import DEFAULT_STORE

    locations = [worker_location(store_location or sc.output.store or DEFAULT_STORE) for sc in scenarios]
    _warn_if_path_not_shared(client, locations)
    resources = gpu_resources(client)
    futures = {
        client.submit(task, sc, loc, storage_options, resources=resources, pure=False,
                      key=f"actstore-capture-{sc.name}-{os.urandom(4).hex()}"): sc.name
        for sc, loc in zip(scenarios, locations, strict=True)
    }  # fmt: skip
    failures: list[str] = []
    with tqdm(total=len(futures), desc="capture on cluster", unit="scenario", disable=not progress) as bar:
        for fut in as_completed(futures):
            name = futures[fut]
            try:
                results = fut.result()
            except Exception as e:  # noqa: BLE001 - report every failure at the end
                failures.append(f"{name}: {type(e).__name__}: {e}")
                bar.update()
                continue
            bar.update()
            yield from results
    if failures:
        raise ClusterError(f"{len(failures)} of {len(futures)} scenarios failed: " + "; ".join(failures))


def capture_with_scheduler(
    scenarios: list[Scenario],
    address: str,
    store_location: str | None = None,
    *,
    storage_options: dict[str, Any] | None = None,
    progress: bool = True,
) -> Iterator[CaptureResult]:
    """:func:`capture_on_cluster` on the scheduler at ``address`` (what ``actstore capture
    DIR --scheduler ADDRESS`` runs)."""
    with scheduler(address) as client:
        assert client is not None
        yield from capture_on_cluster(
            scenarios, client, store_location, storage_options=storage_options, progress=progress
        )
