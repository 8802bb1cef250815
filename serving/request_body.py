"""Reading a request body under a size limit, with gzip/deflate ``Content-Encoding``.

The limit (``serving.body_limit_bytes``) applies to the declared ``Content-Length``, to the bytes
received and to the decompressed body; over it is :class:`~serving.errors.PayloadTooLarge`
(413), a malformed length or encoding is :class:`~serving.errors.BadRequest` (400).
"""

from __future__ import annotations

import zlib

from starlette.requests import Request as HttpRequest

from serving.errors import BadRequest, PayloadTooLarge


async def read_body(request: HttpRequest, limit: int) -> bytes:
    """The whole (decompressed) body of ``request``; raises before reading past ``limit``."""
    length = request.headers.get("content-length")
    if length is not None:
        try:
            size = int(length)
        except ValueError:
            raise BadRequest(f"Content-Length must be an integer, got {length!r}") from None
        if size > limit:
            raise PayloadTooLarge(
                f"request body of {size} bytes exceeds the limit of {limit} bytes "
                "(serving.body_limit_bytes)"
            )
    chunks = []
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise PayloadTooLarge(
                f"request body exceeds the limit of {limit} bytes (serving.body_limit_bytes)"
            )
        chunks.append(chunk)
    body = b"".join(chunks)
    encoding = request.headers.get("content-encoding")
    if encoding:
        body = decompress(body, encoding.lower(), limit)
    return body


def decompress(body: bytes, encoding: str, limit: int) -> bytes:
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
            f"decompressed request body exceeds the limit of {limit} bytes "
            "(serving.body_limit_bytes)"
        )
    return out
