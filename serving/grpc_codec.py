"""KServe v2 gRPC codec: Triton's ``ModelInferRequest`` / ``ModelInferResponse`` <-> numpy.

The messages are Triton's own (``tritonclient.grpc.service_pb2``, generated from Triton's
``grpc_service.proto``); nothing here defines one. An input's tensor comes either from
``raw_input_contents`` (little-endian, row-major bytes; when used, one entry per input in the order
of ``inputs``, as Triton requires) or from its typed ``contents`` field (``fp32_contents`` for
FP32, ``int_contents`` for INT8/16/32, ...; FP16 has none and must be raw). Outputs always go back
as ``raw_output_contents``, as Triton's server sends them (tritonclient reads both).

Errors are :class:`~serving.errors.BadRequest` with the same wording as the HTTP codec
(:mod:`serving.protocol`): every message names the input and, when known, the model's spec.
The request bytes themselves are parsed here too (:func:`parse_infer_request`, the service's
deserializer for both inference methods), so bytes that are no message fail their own request.
Lookup, validation and dispatch are the dataplane's.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from google.protobuf.message import DecodeError
from tritonclient.grpc import service_pb2

from serving.datatypes import NUMPY_TO_V2, V2_TO_NUMPY
from serving.errors import BadRequest, ServingError
from serving.inference import InferRequest
from serving.protocol import check_shape, clip, spec_hint
from serving.tensor_spec import TensorSpec

#: KServe v2 datatype -> the ``InferTensorContents`` field that carries it (FP16/BF16: raw only)
CONTENTS_FIELD: dict[str, str] = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


@dataclass(frozen=True)
class UndecodableRequest:
    """Bytes that are no ``ModelInferRequest`` (:func:`parse_infer_request`): the request is
    answered ``error`` as a BadRequest, and a stream goes on. Its empty name, version and id
    stand in for the message's where an answer needs them."""

    error: str
    model_name: str = ""
    model_version: str = ""
    id: str = ""


def parse_infer_request(data: bytes) -> service_pb2.ModelInferRequest | UndecodableRequest:
    """The gRPC request deserializer of ModelInfer and ModelStreamInfer: never raises, so a
    message that does not parse fails its own request, not the call (grpc ends a stream, every
    request after the bad one unanswered, when its deserializer raises)."""
    try:
        return service_pb2.ModelInferRequest.FromString(data)
    except DecodeError as exc:
        return UndecodableRequest(
            f"the request is not a valid inference.ModelInferRequest message ({exc}); "
            "send one serialized by the service's protobuf definition"
        )


def decode_infer_request(
    msg: service_pb2.ModelInferRequest, specs: Mapping[str, TensorSpec] | None = None
) -> InferRequest:
    """The :class:`InferRequest` of a ``ModelInferRequest`` (``specs`` only enrich messages)."""
    if not msg.inputs:
        raise BadRequest("request needs a non-empty 'inputs' list")
    raw = msg.raw_input_contents
    if raw and len(raw) != len(msg.inputs):
        raise BadRequest(
            f"raw_input_contents has {len(raw)} entries but the request has {len(msg.inputs)} "
            "inputs; when raw_input_contents is used every input must be in it, in order"
        )
    inputs: dict[str, np.ndarray] = {}
    for i, item in enumerate(msg.inputs):
        name = item.name
        if not name:
            raise BadRequest(f"input {i} has no name")
        spec = specs.get(name) if specs is not None else None
        if name in inputs:
            raise BadRequest(f"input '{name}' given twice")
        datatype = item.datatype
        dtype = V2_TO_NUMPY.get(datatype)
        if dtype is None:
            raise BadRequest(f"input '{name}': unknown datatype {clip(datatype)}" + spec_hint(spec))
        if datatype == "BYTES":
            raise BadRequest(f"input '{name}': BYTES tensors are not supported by this server")
        shape = check_shape(list(item.shape), name, dtype, spec)
        count = math.prod(shape)
        if raw:
            data = raw[i]
            need = count * dtype.itemsize
            if len(data) != need:
                raise BadRequest(
                    f"input '{name}': raw_input_contents has {len(data)} bytes but {datatype} "
                    f"shape {list(shape)} needs {need} bytes" + spec_hint(spec)
                )
            arr = np.frombuffer(data, dtype=dtype, count=count)
        else:
            field = CONTENTS_FIELD.get(datatype)
            if field is None:
                raise BadRequest(
                    f"input '{name}': {datatype} has no typed contents field; send it in "
                    "raw_input_contents" + spec_hint(spec)
                )
            values = getattr(item.contents, field)
            if len(values) != count:
                raise BadRequest(
                    f"input '{name}': contents.{field} has {len(values)} elements but shape "
                    f"{list(shape)} needs {count}" + spec_hint(spec)
                )
            try:
                arr = np.array(values, dtype=dtype)
            except OverflowError as exc:
                raise BadRequest(
                    f"input '{name}': contents.{field} holds values outside {datatype} ({exc})"
                    + spec_hint(spec)
                ) from None
        inputs[name] = arr.reshape(shape)
    outputs = None
    if msg.outputs:
        outputs = []
        for out in msg.outputs:
            if "classification" in out.parameters:
                raise BadRequest(
                    f"output '{out.name}': the classification extension is not supported"
                )
            outputs.append((out.name, False))
    return InferRequest(inputs=inputs, id=msg.id or None, outputs=outputs)


def encode_infer_response(
    model_name: str,
    model_version: str,
    outputs: Mapping[str, np.ndarray],
    output_names: Sequence[str],
    request_id: str | None,
) -> service_pb2.ModelInferResponse:
    """A ``ModelInferResponse`` with ``output_names`` of ``outputs`` as raw contents."""
    response = service_pb2.ModelInferResponse(
        model_name=model_name, model_version=model_version, id=request_id or ""
    )
    raw = []
    for name in output_names:
        arr = outputs[name]
        try:
            datatype = NUMPY_TO_V2[arr.dtype]
        except KeyError:
            raise ServingError(f"output dtype {arr.dtype} has no KServe v2 datatype") from None
        response.outputs.add(name=name, datatype=datatype, shape=arr.shape)
        raw.append(np.ascontiguousarray(arr).tobytes())
    response.raw_output_contents.extend(raw)
    return response
