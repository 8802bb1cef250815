"""``flwr-simulation`` that can run every simulated client at once.

flwr 1.42's Simulation Engine (``flwr/server/superlink/fleet/vce/vce_api.py``, ``run_api``) submits
one worker per backend actor to a ``ThreadPoolExecutor()``. Its default size is
``min(32, cpu_count + 4)`` and each worker loops for the whole run, so the workers beyond that
size never start: on a 2-core machine at most 6 ClientApps run at once, however many actors Ray
was given (``RAY_OVERRIDE_RESOURCES``, or ``client-resources-num-cpus=0.1``). With emulated device
times (``heterogeneity.device_factor``: clients mostly sleep) a federation of 20 devices then
behaves like one of 6, and a slow device holds one of those 6 for its whole update.

:func:`server.launcher.local_superlink` puts :func:`write_wrapper`'s script first on the
SuperLink's ``PATH`` as ``flwr-simulation`` (the SuperLink starts the simulation process by that
name). The script sizes the executor so that every submitted worker gets a thread (threads are
created per submitted task, so that is one per actor) and runs flwr's own entry point. ``flwr run
.`` against a SuperLink started by hand keeps flwr's limit.

The engine's dispatcher (``add_messages_to_queue``) sweeps every 0.1 s over every node and asks
the LinkState for that node's next message, and ``InMemoryLinkState.get_message_ins`` scans (and
validates) every stored message for each such call: a sweep costs nodes x stored messages. At
1,000 clients with a message for each, that is a million validations per sweep, every 0.1 s, for
the whole round (the delivered messages stay stored until their replies are pulled): one server
core is busy with it, and on two cores the clients get the other. :func:`deliver_pending` is the
same dispatch in one pass over the stored messages (the same validation of each message it
delivers, at most one message per node per sweep, as flwr's); the runtime puts it in its place.

On a Ray cluster (``RAY_ADDRESS``, see :mod:`server.launcher`) nothing else changes: flwr sizes
its actor pool per node (``floor(node CPUs / client-resources-num-cpus)`` summed over the
cluster's nodes) and Ray places the actors; this runtime gives each of them its worker thread in
the simulation process, so the whole cluster works at once, and each actor logs once, at its
first client, which Ray node it runs on and that node's resources (:class:`NodeReport`): Ray
forwards the line to the run's log, where it shows how the clients are spread.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from queue import Queue
from typing import Any

log = logging.getLogger(__name__)

COMMAND = "flwr-simulation"
# An upper bound, not a pool size: ThreadPoolExecutor starts a thread per submitted task.
MAX_WORKERS = 1024


class EveryWorkerExecutor(ThreadPoolExecutor):
    """A ``ThreadPoolExecutor`` whose default size fits every task submitted to it."""

    def __init__(self, max_workers: int | None = None, *args: Any, **kwargs: Any) -> None:
        super().__init__(max_workers or MAX_WORKERS, *args, **kwargs)


class NodeReport:
    """The ClientApp loader the Ray backend sends to its actors, wrapped: the first call in an
    actor's process logs the Ray node it runs on, then every call loads the app as before."""

    reported_pid: int | None = None  # per process: each actor is a process of its own

    def __init__(self, app_fn: Callable[[], Any]) -> None:
        self.app_fn = app_fn

    def __call__(self) -> Any:
        if NodeReport.reported_pid != os.getpid():
            NodeReport.reported_pid = os.getpid()
            _log_ray_node()
        return self.app_fn()


def _log_ray_node() -> None:
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    node = next((n for n in ray.nodes() if n.get("NodeID") == node_id), {})
    resources = ", ".join(
        f"{name}={value:g}"
        for name, value in sorted(node.get("Resources", {}).items())
        if not name.startswith(("node:", "memory", "object_store_memory", "accelerator_type"))
    )
    if not log.handlers:  # Ray's worker process configures no logging of ours
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    log.info(
        "ClientApp actor (pid %d) on Ray node %s at %s with %s",
        os.getpid(),
        node_id,
        node.get("NodeManagerAddress", "?"),
        resources or "no resources",
    )


#: seconds between two dispatch sweeps (flwr's)
SWEEP_INTERVAL_S = 0.1


def take_undelivered(state: Any, nodes: Mapping[int, int] | set[int]) -> list[Any]:
    """One dispatch sweep of an ``InMemoryLinkState``: the oldest undelivered message of each of
    ``nodes`` that passes the state's own validation (expired or invalid ones are deleted, as
    ``get_message_ins`` does), marked delivered; one pass over the stored messages."""
    from flwr.supercore.date import now

    taken: list[Any] = []
    served: set[int] = set()
    with state.lock:
        for message_id, message in list(state.message_ins_store.items()):
            meta = message.metadata
            node = meta.dst_node_id
            if meta.delivered_at != "" or node in served or node not in nodes:
                continue
            state._check_stored_messages({message_id})  # may delete it
            if message_id in state.message_ins_store:
                served.add(node)
                taken.append(message)
        delivered_at = now().isoformat()
        for message in taken:
            message.metadata.delivered_at = delivered_at
    return taken


def deliver_pending(
    state: Any, queue: Queue[Any], nodes_mapping: Mapping[int, int], f_stop: threading.Event
) -> None:
    """The engine's dispatcher (flwr's ``add_messages_to_queue``, same signature) in one pass
    per sweep; any other LinkState than the in-memory one gets flwr's own."""
    if not hasattr(state, "message_ins_store") or not hasattr(state, "_check_stored_messages"):
        _flwr_dispatch()(state, queue, nodes_mapping, f_stop)
        return
    nodes = set(nodes_mapping)
    while not f_stop.is_set():
        for message in take_undelivered(state, nodes):
            queue.put(message)
        f_stop.wait(SWEEP_INTERVAL_S)


#: flwr's dispatcher, kept when :func:`patch_simulation_engine` replaces it
_replaced_dispatch: Callable[..., None] | None = None


def _flwr_dispatch() -> Callable[..., None]:
    from flwr.server.superlink.fleet.vce import vce_api

    return _replaced_dispatch or vce_api.add_messages_to_queue


def patch_simulation_engine() -> None:
    """Give the Simulation Engine's worker loops one thread each, its dispatcher one pass per
    sweep, and each Ray actor a :class:`NodeReport`."""
    global _replaced_dispatch
    from flwr.server.superlink.fleet.vce import vce_api
    from flwr.server.superlink.fleet.vce.backend import raybackend

    vce_api.ThreadPoolExecutor = EveryWorkerExecutor  # type: ignore[misc]
    if vce_api.add_messages_to_queue is not deliver_pending:
        _replaced_dispatch = vce_api.add_messages_to_queue
        vce_api.add_messages_to_queue = deliver_pending
    build = raybackend.RayBackend.build
    if getattr(build, "reports_nodes", False):
        return

    def build_reporting_nodes(self: Any, app_fn: Callable[[], Any]) -> None:
        build(self, NodeReport(app_fn))

    build_reporting_nodes.reports_nodes = True  # type: ignore[attr-defined]
    raybackend.RayBackend.build = build_reporting_nodes  # type: ignore[method-assign]


def write_wrapper(directory: Path) -> Path:
    """Write the ``flwr-simulation`` script into ``directory``; return its path."""
    directory.mkdir(parents=True, exist_ok=True)
    script = directory / COMMAND
    root = Path(__file__).resolve().parent.parent
    script.write_text(
        f"#!{sys.executable}\n"
        "import sys\n"
        f"sys.path.insert(0, {str(root)!r})\n"
        "from server.simulation_runtime import main\n"
        "sys.exit(main())\n"
    )
    script.chmod(0o755)
    return script


def main() -> int | None:
    """Patch the engine, then run flwr's ``flwr-simulation`` (it reads our argv)."""
    patch_simulation_engine()
    from flwr.simulation.app import flwr_simulation

    return flwr_simulation()  # type: ignore[func-returns-value]
