"""A small KServe v2 (Open Inference Protocol) client: the standard library's HTTP and numpy only.

For the demo, the benchmarks, the tests, and a notebook consuming served models::

    from serving.v2_client import V2Client

    with V2Client("127.0.0.1:8000") as client:
        client.wait_until_ready(model="fedserve")
        result = client.infer("fedserve", {"input": x})  # numpy in, binary tensors on the wire
        logits, version = result.outputs["logits"], result.model_version

Requests and responses are JSON tensors or Triton's binary-tensor extension (``binary=True``, the
default: a JSON header, its byte length in ``Inference-Header-Content-Length``, then the raw
row-major bytes of each tensor); ``tritonclient.http`` speaks the same. Every non-2xx answer raises
:class:`V2Error` with the status and the server's ``error`` message. One keep-alive connection per
client, reopened once when the server dropped it; a client is not thread-safe (one per thread).
BYTES tensors are not supported (fedserve's models take and give numbers).
"""

from __future__ import annotations

import http.client
import json
import math
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from serving.datatypes import NUMPY_TO_V2, V2_TO_NUMPY
from serving.protocol import HEADER_LENGTH


class V2Error(RuntimeError):
    """The server answered ``status`` (not 2xx); ``message`` is its ``error`` text."""

    def __init__(self, status: int, message: str, path: str) -> None:
        super().__init__(f"{path} answered {status}: {message}")
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Response:
    """A raw HTTP answer; header names are lower-case."""

    status: int
    headers: dict[str, str]
    body: bytes


@dataclass(frozen=True)
class InferResult:
    model_name: str
    model_version: str
    outputs: dict[str, np.ndarray]
    id: str | None = None


def encode_request(
    inputs: Mapping[str, np.ndarray],
    outputs: Sequence[str] | None = None,
    *,
    binary: bool = True,
    request_id: str | None = None,
) -> tuple[bytes, int | None]:
    """The body of an inference request and its JSON header's length (None for a JSON-only body).

    ``outputs`` names the outputs wanted (None: all of them); with ``binary`` the inputs travel as
    raw bytes and the outputs are asked for as raw bytes too.
    """
    entries, blobs = [], []
    for name, value in inputs.items():
        array = np.ascontiguousarray(value)
        entry: dict[str, Any] = {
            "name": name,
            "datatype": _datatype(array, name),
            "shape": list(array.shape),
        }
        if binary:
            blob = array.tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = array.ravel().tolist()
        entries.append(entry)
    doc: dict[str, Any] = {}
    if request_id is not None:
        doc["id"] = request_id
    doc["inputs"] = entries
    if outputs is not None:
        doc["outputs"] = [{"name": o, "parameters": {"binary_data": binary}} for o in outputs]
    elif binary:
        doc["parameters"] = {"binary_data_output": True}
    header = json.dumps(doc, separators=(",", ":")).encode()
    if not binary:
        return header, None
    return b"".join([header, *blobs]), len(header)


def decode_response(body: bytes, header_length: int | None = None) -> InferResult:
    """An inference response (JSON, or JSON header + binary outputs) as numpy arrays."""
    end = len(body) if header_length is None else int(header_length)
    doc = json.loads(body[:end])
    offset = end
    outputs: dict[str, np.ndarray] = {}
    for out in doc.get("outputs", []):
        name, datatype, shape = out["name"], out["datatype"], tuple(out["shape"])
        dtype = V2_TO_NUMPY.get(datatype)
        if dtype is None or datatype == "BYTES":
            raise ValueError(f"output '{name}': datatype {datatype!r} is not supported")
        size = (out.get("parameters") or {}).get("binary_data_size")
        if size is None:
            outputs[name] = np.asarray(out["data"], dtype=dtype).reshape(shape)
            continue
        if offset + size > len(body):
            raise ValueError(
                f"output '{name}': {size} binary bytes announced at offset {offset}, but the body "
                f"has {len(body)} bytes"
            )
        count = math.prod(shape)
        outputs[name] = np.frombuffer(body, dtype, count, offset).reshape(shape).copy()
        offset += size
    request_id = doc.get("id")
    return InferResult(
        model_name=str(doc.get("model_name", "")),
        model_version=str(doc.get("model_version", "")),
        outputs=outputs,
        id=None if request_id is None else str(request_id),
    )


def _datatype(array: np.ndarray, name: str) -> str:
    datatype = NUMPY_TO_V2.get(array.dtype)
    if datatype is None or datatype == "BYTES":
        raise ValueError(
            f"input '{name}': numpy dtype {array.dtype} has no numeric KServe v2 datatype; "
            f"use one of {', '.join(sorted(str(d) for d in NUMPY_TO_V2 if d != np.object_))}"
        )
    return datatype


def model_path(model: str, version: int | str | None = None) -> str:
    """``/v2/models/<model>[/versions/<version>]``."""
    return f"/v2/models/{model}" + ("" if version is None else f"/versions/{version}")


class V2Client:
    """KServe v2 over one keep-alive HTTP connection to ``address`` (``host:port`` or
    ``http://host:port``); ``token`` is sent as ``Authorization: Bearer <token>``."""

    def __init__(self, address: str, timeout: float = 10.0, token: str | None = None) -> None:
        parts = urlsplit(address if "://" in address else f"http://{address}")
        if parts.scheme != "http" or parts.hostname is None or parts.port is None:
            raise ValueError(f"address must be host:port or http://host:port, got {address!r}")
        self.address = f"{parts.hostname}:{parts.port}"
        self.conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
        self.auth = {} if token is None else {"Authorization": f"Bearer {token}"}

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> V2Client:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # ------------------------------------------------------------ raw HTTP

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Response:
        """One request, whatever the status; a connection the server dropped between requests
        is reopened once."""
        for attempt in (1, 2):
            try:
                self.conn.request(method, path, body=body, headers={**self.auth, **(headers or {})})
                answer = self.conn.getresponse()
                data = answer.read()
                return Response(answer.status, {k.lower(): v for k, v in answer.getheaders()}, data)
            except (ConnectionError, http.client.HTTPException):
                self.conn.close()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def post(self, path: str, body: bytes, header_length: int | None = None) -> Response:
        """POST a ready-made inference body (``header_length``: binary-tensor extension)."""
        binary = header_length is not None
        headers = {"Content-Type": "application/octet-stream" if binary else "application/json"}
        if header_length is not None:
            headers[HEADER_LENGTH] = str(header_length)
        return self.request("POST", path, body, headers)

    def _json(self, path: str) -> dict[str, Any]:
        answer = self.request("GET", path)
        _raise_for(answer, path)
        return dict(json.loads(answer.body))

    # ------------------------------------------------------------ health and metadata

    def live(self) -> bool:
        return self.request("GET", "/v2/health/live").status == 200

    def ready(self) -> bool:
        return self.request("GET", "/v2/health/ready").status == 200

    def model_ready(self, model: str, version: int | str | None = None) -> bool:
        return self.request("GET", model_path(model, version) + "/ready").status == 200

    def server_metadata(self) -> dict[str, Any]:
        return self._json("/v2")

    def model_metadata(self, model: str, version: int | str | None = None) -> dict[str, Any]:
        return self._json(model_path(model, version))

    def wait_until_ready(
        self,
        timeout: float = 60.0,
        model: str | None = None,
        process: subprocess.Popen[Any] | None = None,
    ) -> None:
        """Poll readiness (the server's, or ``model``'s) until it says yes. Raises
        :class:`RuntimeError` if ``process`` (the server) exits first, :class:`TimeoutError` after
        ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            if process is not None and process.poll() is not None:
                raise RuntimeError(
                    f"the server exited with {process.returncode} before it was ready"
                )
            try:
                if self.model_ready(model) if model is not None else self.ready():
                    return
            except (OSError, http.client.HTTPException):
                pass  # not listening yet
            if time.monotonic() > deadline:
                what = f"model '{model}' on " if model is not None else ""
                raise TimeoutError(f"{what}{self.address} not ready within {timeout:g} s")
            time.sleep(0.1)

    # ------------------------------------------------------------ inference

    def infer(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str] | None = None,
        *,
        version: int | str | None = None,
        binary: bool = True,
        request_id: str | None = None,
    ) -> InferResult:
        """Run ``model`` (its newest served version unless ``version``) on ``inputs`` by name;
        returns every output, or those of ``outputs``."""
        body, header_length = encode_request(inputs, outputs, binary=binary, request_id=request_id)
        path = model_path(model, version) + "/infer"
        answer = self.post(path, body, header_length)
        _raise_for(answer, path)
        length = answer.headers.get(HEADER_LENGTH.lower())
        return decode_response(answer.body, None if length is None else int(length))


def _raise_for(answer: Response, path: str) -> None:
    if 200 <= answer.status < 300:
        return
    try:
        message = str(json.loads(answer.body)["error"])
    except (ValueError, KeyError, TypeError):
        message = answer.body[:300].decode(errors="replace")
    raise V2Error(answer.status, message, path)
