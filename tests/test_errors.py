"""The errors module: every request error carries its HTTP and its gRPC status."""

from __future__ import annotations

import pytest

from serving.errors import (
    GRPC_CODES,
    BadRequest,
    InputError,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    PoolClosed,
    RepositoryError,
    ServingError,
    Unauthorized,
    Unavailable,
)


def test_each_error_has_its_http_and_grpc_status() -> None:
    expected = {
        ServingError("x"): (500, "INTERNAL"),
        BadRequest("x"): (400, "INVALID_ARGUMENT"),
        InputError("x"): (400, "INVALID_ARGUMENT"),
        Unauthorized("x"): (401, "UNAUTHENTICATED"),
        NotFound("x"): (404, "NOT_FOUND"),
        PayloadTooLarge("x"): (413, "RESOURCE_EXHAUSTED"),
        Overloaded("x", 1.0): (429, "RESOURCE_EXHAUSTED"),
        Unavailable("x"): (503, "UNAVAILABLE"),
        PoolClosed("x"): (503, "UNAVAILABLE"),
    }
    for error, statuses in expected.items():
        assert (error.status, error.grpc_code) == statuses, type(error).__name__
        assert error.message == str(error) == "x"
    assert GRPC_CODES[504] == "DEADLINE_EXCEEDED"
    assert isinstance(BadRequest("x"), ValueError) and isinstance(NotFound("x"), LookupError)


def test_a_status_without_a_grpc_code_is_refused() -> None:
    with pytest.raises(TypeError, match="418"):

        class Teapot(ServingError):
            status = 418


def test_retry_after_is_whole_seconds_at_least_one() -> None:
    assert Overloaded("x", 0.01).headers["Retry-After"] == "1"
    assert Overloaded("x", 2.2).headers["Retry-After"] == "3"
    assert Unavailable("x").headers["Retry-After"] == "1"
    assert Unavailable("x", 4.5).headers["Retry-After"] == "5"
    assert BadRequest("x").headers == {}


def test_repository_error_is_not_a_request_error() -> None:
    assert issubclass(RepositoryError, ValueError)
    assert not issubclass(RepositoryError, ServingError)
