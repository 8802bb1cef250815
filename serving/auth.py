"""Who may call the HTTP API: the bearer token and the ``Host`` check, as pure ASGI middleware
(no per-request dependency solving on the hot path)."""

from __future__ import annotations

import hmac
from collections.abc import Iterable

from starlette.types import ASGIApp, Receive, Scope, Send

from serving.api_errors import error_response
from serving.errors import BadRequest, Unauthorized


def bearer_token_ok(given: bytes | str | None, token: str) -> bool:
    """``given`` (an ``authorization`` header or gRPC metadata value) is ``Bearer <token>``,
    compared in constant time."""
    if given is None:
        return False
    if isinstance(given, str):
        given = given.encode("latin-1", "replace")
    return hmac.compare_digest(given, f"Bearer {token}".encode())


#: the message both front ends answer a missing or wrong token with
TOKEN_REFUSED = "missing or invalid bearer token (send 'Authorization: Bearer <token>')"


class BearerAuth:
    """Require ``Authorization: Bearer <token>`` on every HTTP path not in ``public_paths``.

    A missing or wrong token (compared in constant time) is answered 401 with
    ``WWW-Authenticate: Bearer`` and an ``{"error": ...}`` body; the app is not called.
    """

    def __init__(self, app: ASGIApp, token: str, public_paths: tuple[str, ...]) -> None:
        self.app = app
        self.token = token
        self.public = frozenset(public_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in self.public:
            given = None
            for key, value in scope["headers"]:
                if key == b"authorization":
                    given = value
                    break
            if not bearer_token_ok(given, self.token):
                refused = Unauthorized(TOKEN_REFUSED, headers={"WWW-Authenticate": "Bearer"})
                response = error_response(refused.status, refused.message, refused.headers)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class AllowedHosts:
    """Answer 400 to a request whose ``Host`` header is not one of ``hosts`` (``serving.
    allowed_hosts``; compared case-insensitively, with or without the port). A page in a browser
    that rebinds its own DNS name to 127.0.0.1 still sends its own name, so it cannot reach a
    server listening on localhost."""

    def __init__(self, app: ASGIApp, hosts: Iterable[str]) -> None:
        self.app = app
        self.hosts = frozenset(h.lower().encode() for h in hosts)

    def allowed(self, host: bytes) -> bool:
        host = host.lower()
        if host in self.hosts:
            return True
        name, sep, port = host.rpartition(b":")
        return bool(sep) and port.isdigit() and name in self.hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            host = b""
            for key, value in scope["headers"]:
                if key == b"host":
                    host = value
                    break
            if not self.allowed(host):
                refused = BadRequest(
                    f"Host header {host.decode('latin-1')!r} is not allowed; this server "
                    f"answers {', '.join(sorted(h.decode() for h in self.hosts))} "
                    "(serving.allowed_hosts)"
                )
                await error_response(refused.status, refused.message)(scope, receive, send)
                return
        await self.app(scope, receive, send)
