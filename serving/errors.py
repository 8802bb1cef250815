"""Every error class of ``serving``, each request error with its HTTP and its gRPC status.

A :class:`ServingError` is what a front end answers when a request fails: ``status`` is the HTTP
status, ``grpc_code`` the name of the ``grpc.StatusCode`` member a gRPC front end answers with,
``message`` the text both send and ``headers`` extra HTTP headers (``Retry-After``). A subclass
sets ``status`` only; its ``grpc_code`` follows from :data:`GRPC_CODES`, so the two can never
disagree. How an error is rendered (``{"error": ...}`` bodies, gRPC trailers) is the front end's
business.

The gRPC codes follow grpc's ``statuscodes.md`` and the KServe v2 / Triton gRPC service: bad input
is ``INVALID_ARGUMENT``, an unknown model ``NOT_FOUND``, full queues ``RESOURCE_EXHAUSTED``, no live
engine ``UNAVAILABLE``. A body over the size limit (413) is ``RESOURCE_EXHAUSTED`` too: that is
what a gRPC server itself answers for a message over its receive limit, so a client sees the same
code whether the transport or our check caught it.

:class:`RepositoryError` is not a request error: it refuses a repository operation (publish,
verify, retention) and is a ``ValueError``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import ClassVar

#: HTTP status -> gRPC status code name, for every status a ServingError may carry
GRPC_CODES: dict[int, str] = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    404: "NOT_FOUND",
    413: "RESOURCE_EXHAUSTED",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}


class ServingError(Exception):
    """A failed request: HTTP ``status``, gRPC ``grpc_code``, ``message`` and HTTP ``headers``."""

    status: ClassVar[int] = 500
    grpc_code: ClassVar[str] = GRPC_CODES[500]

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if cls.status not in GRPC_CODES:
            raise TypeError(f"{cls.__name__}.status {cls.status} has no entry in GRPC_CODES")
        cls.grpc_code = GRPC_CODES[cls.status]

    def __init__(self, message: str, *, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = dict(headers or {})


class BadRequest(ServingError, ValueError):
    status = 400


class InputError(BadRequest):
    """A request tensor does not fit the model's input spec, or the model rejected it."""


class Unauthorized(ServingError):
    status = 401


class NotFound(ServingError, LookupError):
    status = 404


class PayloadTooLarge(ServingError):
    status = 413


class Overloaded(ServingError):
    """Every engine's queue is full: 429 with ``Retry-After`` (whole seconds, at least 1)."""

    status = 429

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message, headers={"Retry-After": str(max(1, math.ceil(retry_after_s)))})


class Unavailable(ServingError):
    """No engine could run the request (engine failures, pool closing): 503 with ``Retry-After``."""

    status = 503

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message, headers={"Retry-After": str(max(1, math.ceil(retry_after_s)))})


class PoolClosed(Unavailable):
    """The version's pool is draining for a swap or shutdown: look the model up again."""


class DeadlineExceeded(ServingError):
    """The model ran longer than ``serving.run_timeout_s`` on the request: 504, never retried
    (a retry would burn another engine on the same input)."""

    status = 504


class RepositoryError(ValueError):
    """A repository operation was refused; the message names the value, the rule and the fix.

    Raised before anything already published is changed: a failed publish, verify or retention
    leaves every existing version as it was.
    """


class StoreError(OSError):
    """A call to a model store (an fsspec URL such as ``s3://bucket/prefix``) failed; the message
    is one line naming the URL, the call and the store library's error."""


class StoreKeyMissing(StoreError):
    """The model store answered that no object is at the key (a 404): the store works, the
    object is not there (not written yet, or deleted since it was listed)."""


class PortUnavailable(OSError):
    """A front end could not listen on its port (in use, or not ours to bind); the message names
    the address and the key to change."""
