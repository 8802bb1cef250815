"""One process's HTTP and gRPC servers, run in its event loop until told to stop.

The engine process (:mod:`serving.cli`) and each front-end process (:mod:`serving.frontend_worker`)
run :func:`run_servers`. With ``serving.frontends: N > 1`` the engine process binds both ports so
that N processes can share them (SO_REUSEPORT, after checking that nothing else holds them),
starts the other N - 1 (:class:`~serving.frontend_processes.FrontendProcesses`, over a
:class:`~serving.dataplane_link.LinkServer`) once its own servers are bound, and stops them
first when it stops: their requests in flight still need its engines.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
from collections.abc import Callable
from typing import Any

from serving.grpc_server import grpc_server
from serving.http_server import http_server, listen_socket
from serving.settings import ServeConfig

log = logging.getLogger(__name__)


async def run_servers(
    conf: ServeConfig,
    app: Any,
    dataplane: Any,
    *,
    stop: asyncio.Event | None = None,
    banner: Callable[[int | None], None] = lambda grpc_port: None,
    joining: bool = False,
) -> None:
    """Serve ``app`` over HTTP (and ``dataplane`` over gRPC unless ``serving.grpc_port`` is null)
    in this event loop until ``stop`` is set — by default on SIGTERM or SIGINT — then stop
    accepting, let the requests in flight finish (at most ``serving.drain_timeout_s``) and
    return. A second SIGINT stops at once. ``banner(grpc_port)`` runs once both listen (and, with
    ``serving.frontends > 1``, the front-end processes too). ``joining``: this is a front-end
    process, binding the ports its engine process holds."""
    from serving.frontend_processes import FrontendProcesses, check_port_free

    settings = conf.serving
    share = joining or settings.frontends > 1
    if share and not joining:  # a port shared by SO_REUSEPORT is no proof that it was free
        check_port_free(conf.host, conf.port, "HTTP", "port=<a free port>")
        if settings.grpc_port is not None:
            check_port_free(
                conf.host,
                settings.grpc_port,
                "gRPC",
                "serving.grpc_port=<a free port>, or serving.grpc_port=null for no gRPC",
            )
    http = http_server(app, conf.host, conf.port, settings, log_level=conf.log_level)
    listening = listen_socket(conf.host, conf.port, reuse_port=share)  # before gRPC: see below
    grpc = None
    grpc_port = None
    frontends: FrontendProcesses | None = None
    if settings.grpc_port is not None:  # a port in use above has stopped nothing yet
        grpc, grpc_port = grpc_server(
            dataplane,
            conf.host,
            settings.grpc_port,
            token=conf.token or None,
            max_message_bytes=settings.body_limit_bytes,
            reuse_port=share,
        )
        await grpc.start()
    loop = asyncio.get_running_loop()
    signals: tuple[signal.Signals, ...] = ()
    if stop is None:
        stop = asyncio.Event()
        signals = (signal.SIGTERM, signal.SIGINT)

    def on_signal(sig: signal.Signals) -> None:
        if stop.is_set():
            if sig == signal.SIGINT:
                log.warning("second SIGINT: stopping without waiting for requests in flight")
                http.force_exit = True
                if frontends is not None:
                    frontends.kill()
            return
        log.info(
            "%s: draining requests in flight (at most %.0f s)", sig.name, settings.drain_timeout_s
        )
        stop.set()

    for sig in signals:
        loop.add_signal_handler(sig, on_signal, sig)
    serving: asyncio.Future[None] | None = None
    try:
        serving = asyncio.ensure_future(http.serve(sockets=[listening]))
        while not http.started and not serving.done():
            await asyncio.sleep(0.01)
        if serving.done():
            serving.result()
            raise RuntimeError("the HTTP server stopped before it listened")
        if settings.frontends > 1 and not joining:
            bound = dataclasses.replace(
                conf,
                port=listening.getsockname()[1],
                serving=dataclasses.replace(settings, grpc_port=grpc_port),
            )
            frontends = FrontendProcesses(settings.frontends - 1, dataplane, bound)
            await frontends.start(stop)
        if not stop.is_set():
            banner(grpc_port)
        await stop.wait()
        http.begin_shutdown()
        draining = [serving]
        if grpc is not None:
            draining.append(grpc.stop(settings.drain_timeout_s))
        if frontends is not None:  # the link stays up until they stop: their requests in
            draining.append(frontends.stop(settings.drain_timeout_s))  # flight need it
        await asyncio.gather(*draining)
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
        if frontends is not None:
            await frontends.stop(0)
        if grpc is not None:
            await grpc.stop(0)
        if serving is not None and not serving.done():  # failed after it started listening
            http.force_exit = True
            http.begin_shutdown()
            await asyncio.wait({serving}, timeout=10)


def event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop when it is installed (uvicorn[standard] brings it; both front ends run
    on it: a bare grpc.aio servicer costs less CPU per call there, benchmarks.serving.grpc_floor),
    else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop
