"""Bearer-token authentication for the HTTP API, as pure ASGI middleware (no per-request
dependency solving on the hot path)."""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from serving.api_errors import error_response
from serving.errors import Unauthorized


class BearerAuth:
    """Require ``Authorization: Bearer <token>`` on every HTTP path not in ``public_paths``.

    A missing or wrong token (compared in constant time) is answered 401 with
    ``WWW-Authenticate: Bearer`` and an ``{"error": ...}`` body; the app is not called.
    """

    def __init__(self, app: ASGIApp, token: str, public_paths: tuple[str, ...]) -> None:
        self.app = app
        self.expected = f"Bearer {token}".encode()
        self.public = frozenset(public_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in self.public:
            given = b""
            for key, value in scope["headers"]:
                if key == b"authorization":
                    given = value
                    break
            if not hmac.compare_digest(given, self.expected):
                refused = Unauthorized(
                    "missing or invalid bearer token (send 'Authorization: Bearer <token>')",
                    headers={"WWW-Authenticate": "Bearer"},
                )
                response = error_response(refused.status, refused.message, refused.headers)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
