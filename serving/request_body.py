"""Reading a request body under a size limit, with gzip/deflate ``Content-Encoding``.

The limit (``serving.body_limit_bytes`` for inference; the caller's, named by ``limit_name``)
applies to the declared ``Content-Length``, to the bytes received and to the decompressed body;
over it is :class:`~serving.errors.PayloadTooLarge` (413, naming the limit), a malformed length
or encoding is :class:`~serving.errors.BadRequest` (400).
"""

from __future__ import annotations

import zlib

from starlette.requests import Request as HttpRequest
from starlette.types import Receive

from serving.errors import BadRequest, PayloadTooLarge

#: the limit a 413 names unless the caller names its own
BODY_LIMIT_KEY = "serving.body_limit_bytes"


async def read_body(request: HttpRequest, limit: int, limit_name: str = BODY_LIMIT_KEY) -> bytes:
    """The whole (decompressed) body of a Starlette ``request``; see :func:`receive_body`."""
    headers = request.headers
    length, encoding = headers.get("content-length"), headers.get("content-encoding")
    return await receive_body(
        request.receive,
        length.encode("latin-1") if length is not None else None,
        encoding.encode("latin-1") if encoding is not None else None,
        limit,
        limit_name,
    )


async def receive_body(
    receive: Receive,
    length: bytes | None,
    encoding: bytes | None,
    limit: int,
    limit_name: str = BODY_LIMIT_KEY,
) -> bytes:
    """The whole (decompressed) body of an ASGI request whose ``Content-Length`` and
    ``Content-Encoding`` headers are ``length`` and ``encoding`` (None: absent); raises before
    reading past ``limit`` (``limit_name``: what a 413 names as that limit)."""
    if length is not None:
        try:
            size = int(length)
        except ValueError:
            raise BadRequest(
                f"Content-Length must be an integer, got {length.decode('latin-1')!r}"
            ) from None
        if size > limit:
            raise PayloadTooLarge(
                f"request body of {size} bytes exceeds the limit of {limit} bytes ({limit_name})"
            )
    chunks = []
    total = 0
    more = True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise BadRequest("the client disconnected before sending the whole body")
        chunk = message.get("body", b"")
        more = message.get("more_body", False)
        if not chunks and not more:
            body = chunk  # the usual case: one message, no copy
            break
        total += len(chunk)
        if total > limit:
            raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes ({limit_name})")
        chunks.append(chunk)
    else:
        body = b"".join(chunks)
    if len(body) > limit:
        raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes ({limit_name})")
    if encoding:
        body = decompress(body, encoding.decode("latin-1").lower(), limit, limit_name)
    return body


def decompress(body: bytes, encoding: str, limit: int, limit_name: str = BODY_LIMIT_KEY) -> bytes:
    """``body`` decoded from ``gzip`` or ``deflate`` (zlib), at most ``limit`` bytes of output."""
    if encoding not in ("gzip", "deflate"):
        raise BadRequest(f"unsupported Content-Encoding {encoding!r}; use gzip, deflate or none")
    d = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
    try:
        out = d.decompress(body, limit + 1)
    except zlib.error as exc:
        raise BadRequest(f"request body is not valid {encoding}: {exc}") from None
    if len(out) > limit or d.unconsumed_tail:
        raise PayloadTooLarge(
            f"decompressed request body exceeds the limit of {limit} bytes ({limit_name})"
        )
    return out
