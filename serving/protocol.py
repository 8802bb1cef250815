"""KServe v2 / Open Inference Protocol codec: JSON tensors and Triton's binary-tensor extension.

Request body, JSON only::

    {"id": "...", "parameters": {...},
     "inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 4], "data": [...]}],
     "outputs": [{"name": "logits", "parameters": {"binary_data": true}}]}

With the binary extension the body is that JSON header (its byte length in the HTTP header
``Inference-Header-Content-Length``) followed by the raw little-endian, row-major bytes of every
input whose ``parameters.binary_data_size`` is set, in the order of ``inputs``. Outputs are
returned as binary when the requested output says ``binary_data: true`` or, with no ``outputs``
list, when the request parameter ``binary_data_output`` is true (tritonclient's default); the
response then carries the same header. Errors are :class:`~serving.errors.ServingError`
subclasses; every message about a tensor names the input and, when known, the model's spec.

This is the codec only: it turns bytes into an :class:`~serving.inference.InferRequest` and
outputs into bytes; lookup, validation and dispatch are the dataplane's. Needs numpy only.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from serving.datatypes import NUMPY_TO_V2, V2_TO_NUMPY
from serving.errors import BadRequest, ServingError
from serving.inference import InferRequest
from serving.tensor_spec import TensorSpec

HEADER_LENGTH = "Inference-Header-Content-Length"
#: numpy's own limits on a tensor (its dimensions; 2**40 bytes is past any body limit)
MAX_RANK = 64
MAX_BYTES = 2**40


def spec_hint(spec: TensorSpec | None) -> str:
    return f" (model expects {spec.describe()})" if spec is not None else ""


# ---------------------------------------------------------------- request


def _load_json(raw: bytes | str) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise BadRequest(
            "request body is not valid JSON: nested deeper than this server parses "
            f"(about {sys.getrecursionlimit()} levels)"
        ) from None


def check_shape(shape: Any, name: str, dtype: np.dtype, spec: TensorSpec | None) -> tuple[int, ...]:
    """``shape`` as a tuple when it is a list of non-negative ints numpy can hold; BadRequest
    naming the input otherwise (every codec's shapes pass here)."""
    if not isinstance(shape, list | tuple) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise BadRequest(
            f"input '{name}': 'shape' must be a list of non-negative integers, got "
            f"{clip(shape)}" + spec_hint(spec)
        )
    # numpy refuses more dims, and a zero dim does not excuse a product it cannot index
    if len(shape) > MAX_RANK or math.prod(d for d in shape if d) * dtype.itemsize > MAX_BYTES:
        raise BadRequest(
            f"input '{name}': shape {clip(list(shape))} is larger than any tensor this server "
            f"holds (at most {MAX_RANK} dims and {MAX_BYTES} bytes)" + spec_hint(spec)
        )
    return tuple(shape)


def clip(value: Any, limit: int = 100) -> str:
    """``repr(value)`` cut to ``limit`` characters (and safe on absurdly nested input)."""
    try:
        text = repr(value)
    except RecursionError:
        text = f"<{type(value).__name__} nested too deep to print>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _decode_json_data(
    data: Any,
    name: str,
    datatype: str,
    dtype: np.dtype,
    shape: tuple[int, ...],
    spec: TensorSpec | None,
) -> np.ndarray:
    count = math.prod(shape)
    if datatype == "BYTES":
        raise BadRequest(f"input '{name}': BYTES tensors are not supported by this server")
    if not isinstance(data, list):
        data = [data]
    try:
        with np.errstate(over="raise"):  # 1e39 as FP32: an error, not a warning and an inf
            arr = np.array(data, dtype=dtype)
    except (ValueError, TypeError, OverflowError, FloatingPointError) as exc:
        raise BadRequest(
            f"input '{name}': 'data' is not a list of {datatype} values ({exc})" + spec_hint(spec)
        ) from None
    if arr.dtype == np.object_ or arr.size != count:
        raise BadRequest(
            f"input '{name}': 'data' has {arr.size} elements but shape {list(shape)} needs {count}"
            + spec_hint(spec)
        )
    return arr.reshape(shape)


def decode_request(
    body: bytes,
    header_length: int | str | None = None,
    specs: Mapping[str, TensorSpec] | None = None,
) -> InferRequest:
    """Decode a v2 inference request (JSON, or JSON header + binary tensors).

    ``specs`` (the model's inputs by name) only enriches error messages;
    :meth:`~serving.signature.ModelSignature.validate` checks the tensors against them. Raises
    :class:`~serving.errors.BadRequest` for junk JSON, a bad header length, a datatype it cannot
    decode, an element count that disagrees with the shape, and a missing or short binary part.
    """
    if header_length is not None:
        try:
            hl = int(header_length)
        except ValueError:
            raise BadRequest(f"{HEADER_LENGTH} must be an integer, got {header_length!r}") from None
        if hl < 0 or hl > len(body):
            raise BadRequest(f"{HEADER_LENGTH} is {hl} but the body has only {len(body)} bytes")
        header, binary, offset = _load_json(body[:hl]), body, hl
    else:
        header, binary, offset = _load_json(body), b"", len(body)
    if not isinstance(header, dict):
        raise BadRequest("request body must be a JSON object with an 'inputs' list")
    items = header.get("inputs")
    if not isinstance(items, list) or not items:
        raise BadRequest("request needs a non-empty 'inputs' list")
    inputs: dict[str, np.ndarray] = {}
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise BadRequest(f"each input needs a 'name', got {clip(item)}")
        name = item["name"]
        spec = specs.get(name) if specs is not None else None
        if name in inputs:
            raise BadRequest(f"input '{name}' given twice")
        datatype = item.get("datatype")
        dtype = V2_TO_NUMPY.get(datatype) if isinstance(datatype, str) else None
        if dtype is None:
            raise BadRequest(f"input '{name}': unknown datatype {clip(datatype)}" + spec_hint(spec))
        shape = check_shape(item.get("shape"), name, dtype, spec)
        params = item.get("parameters") or {}
        if not isinstance(params, dict):
            raise BadRequest(
                f"input '{name}': 'parameters' must be a JSON object, got {clip(params)}"
            )
        size = params.get("binary_data_size")
        if size is not None:
            if datatype == "BYTES":
                raise BadRequest(f"input '{name}': BYTES tensors are not supported by this server")
            need = math.prod(shape) * dtype.itemsize
            if not isinstance(size, int) or size != need:
                raise BadRequest(
                    f"input '{name}': binary_data_size is {size!r} but {datatype} shape "
                    f"{list(shape)} needs {need} bytes" + spec_hint(spec)
                )
            if offset + size > len(binary):
                raise BadRequest(
                    f"input '{name}': binary data missing, need {size} bytes at offset {offset} "
                    f"but the body has {len(binary)} bytes" + spec_hint(spec)
                )
            arr = np.frombuffer(binary, dtype=dtype, count=math.prod(shape), offset=offset)
            inputs[name] = arr.reshape(shape)
            offset += size
        elif "data" in item:
            inputs[name] = _decode_json_data(item["data"], name, datatype, dtype, shape, spec)
        else:
            raise BadRequest(
                f"input '{name}': neither 'data' nor parameters.binary_data_size given"
                + spec_hint(spec)
            )
    if header_length is not None and offset != len(binary):
        raise BadRequest(
            f"binary body has {len(binary) - offset} bytes after the last binary input; "
            "check binary_data_size of each input"
        )
    parameters = header.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise BadRequest("'parameters' must be a JSON object")
    outputs: list[tuple[str, bool]] | None = None
    binary_default = bool(parameters.get("binary_data_output", False))
    if header.get("outputs") is not None:
        raw_outputs = header["outputs"]
        if not isinstance(raw_outputs, list):
            raise BadRequest("'outputs' must be a list")
        outputs = []
        for out in raw_outputs:
            if not isinstance(out, dict) or not isinstance(out.get("name"), str):
                raise BadRequest(f"each requested output needs a 'name', got {clip(out)}")
            oparams = out.get("parameters") or {}
            if not isinstance(oparams, dict):
                raise BadRequest(
                    f"output '{out['name']}': 'parameters' must be a JSON object, got "
                    f"{clip(oparams)}"
                )
            if oparams.get("classification"):
                raise BadRequest(
                    f"output '{out['name']}': the classification extension is not supported"
                )
            outputs.append((out["name"], bool(oparams.get("binary_data", binary_default))))
    req_id = header.get("id")
    return InferRequest(
        inputs=inputs,
        id=str(req_id) if req_id is not None else None,
        outputs=outputs,
        binary_output=binary_default,
    )


# ---------------------------------------------------------------- response


def _datatype_of(arr: np.ndarray) -> str:
    try:
        return NUMPY_TO_V2[arr.dtype]
    except KeyError:
        raise ServingError(f"output dtype {arr.dtype} has no KServe v2 datatype") from None


def encode_response(
    model_name: str,
    model_version: str,
    outputs: Mapping[str, np.ndarray],
    output_order: Sequence[str],
    request: InferRequest,
) -> tuple[bytes, int | None]:
    """Encode a v2 inference response; returns ``(body, header_length)`` where ``header_length`` is
    None for a JSON-only body. ``request.outputs`` must name entries of ``outputs`` (the dataplane
    checked them); without it every output of ``output_order`` is answered."""
    if request.outputs is None:
        wanted = [(name, request.binary_output) for name in output_order]
    else:
        wanted = request.outputs
    entries = []
    blobs = []
    for name, binary in wanted:
        arr = outputs[name]
        entry: dict[str, Any] = {
            "name": name,
            "datatype": _datatype_of(arr),
            "shape": list(arr.shape),
        }
        if binary:
            blob = np.ascontiguousarray(arr).tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = arr.ravel().tolist()
        entries.append(entry)
    doc: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request.id is not None:
        doc["id"] = request.id
    doc["outputs"] = entries
    header = json.dumps(doc, separators=(",", ":"), allow_nan=True).encode()
    if not blobs:
        return header, None
    return b"".join([header, *blobs]), len(header)
