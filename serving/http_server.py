"""The HTTP server (uvicorn) as ``serving.*`` configures it, run inside a caller's event loop.

uvicorn alone would hold a connection that never sends a request (or stops half way through its
headers) forever, and its ``Server`` re-raises SIGTERM/SIGINT after its own shutdown, so a caller's
cleanup never runs. Here:

* ``serving.max_connections`` is uvicorn's ``limit_concurrency`` (connections + requests in flight;
  over it a request is answered 503), ``serving.keep_alive_timeout_s`` its keep-alive timeout;
* ``serving.header_timeout_s``: a connection that has not delivered a request's headers that long
  after connecting (or after its previous response, once it sends a first byte) is closed — a
  timer uvicorn lacks, added by :class:`HeaderTimeoutProtocol`;
* :class:`HttpServer` leaves signals to its caller (:mod:`serving.cli`), which calls
  :meth:`HttpServer.begin_shutdown`: stop accepting, finish the requests in flight (bounded by
  ``drain_timeout_s``), close idle keep-alive connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterator
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from serving.errors import PortUnavailable
from serving.settings import ServingConfig

log = logging.getLogger(__name__)


class HeaderTimeoutProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol plus a deadline for a request's headers (see the module)."""

    header_timeout_s = 10.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None

    def _arm_header_timer(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_timeout)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            log.debug("closing a connection that sent no complete headers in time")
            self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm_header_timer()

    def on_headers_complete(self) -> None:
        self._cancel_header_timer()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)


def protocol_class(header_timeout_s: float) -> type[HeaderTimeoutProtocol]:
    """:class:`HeaderTimeoutProtocol` with its deadline set (uvicorn instantiates the class)."""
    return type(
        "HeaderTimeoutProtocol", (HeaderTimeoutProtocol,), {"header_timeout_s": header_timeout_s}
    )


class HttpServer(uvicorn.Server):
    """A uvicorn server whose shutdown its owner starts (it installs no signal handlers)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    def begin_shutdown(self) -> None:
        """Stop accepting; in-flight requests finish within the graceful-shutdown timeout."""
        self.should_exit = True


def http_server(
    app: Any, host: str, port: int, settings: ServingConfig, *, log_level: str = "info"
) -> HttpServer:
    """An :class:`HttpServer` for ``app`` on ``host:port`` with ``settings``' limits."""
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        http=protocol_class(settings.header_timeout_s),
        loop="none",
        lifespan="off",
        log_level=log_level,
        access_log=False,
        proxy_headers=False,  # nothing here reads the client address; parsing it costs ~2 %
        limit_concurrency=settings.max_connections,
        timeout_keep_alive=settings.keep_alive_timeout_s,  # type: ignore[arg-type]
        timeout_graceful_shutdown=int(max(1.0, settings.drain_timeout_s)),
    )
    return HttpServer(config)


def listen_socket(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """The HTTP front end's bound socket; :class:`PortUnavailable` naming the address and the
    key to change when it cannot be bound (uvicorn would log and ``sys.exit(1)`` from inside the
    event loop, skipping the CLI's cleanup). ``reuse_port``: several processes may bind it.

    The protocol is named: asyncio turns Nagle's algorithm off only on sockets whose ``proto``
    is TCP, and a connection accepted from a ``proto`` 0 socket kept it on, so every response
    (headers and body are two writes) waited ~40 ms for the client's delayed ACK on asyncio's
    loop (uvloop sets TCP_NODELAY either way).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise PortUnavailable(
            f"cannot listen for HTTP on {host}:{port}: {exc.strerror or exc}; pass "
            "port=<a free port>"
        ) from None
    return sock
