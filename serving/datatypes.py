"""The one table of tensor data types and its five spellings.

======  ===========  ===================  ===============  ====================
KServe  numpy        ONNX ``TensorProto``  Triton           onnxruntime
v2                   element type         ``DataType``     ``NodeArg.type``
======  ===========  ===================  ===============  ====================
FP32    float32      1 (FLOAT)            TYPE_FP32        ``tensor(float)``
...     ...          ...                  ...              ...
BYTES   object       8 (STRING)           TYPE_STRING      ``tensor(string)``
BF16    (none)       16 (BFLOAT16)        TYPE_BF16        ``tensor(bfloat16)``
======  ===========  ===================  ===============  ====================

The KServe v2 / Open Inference Protocol name is the canonical one (specs, metadata, the wire);
the dicts below are derived from :data:`_TABLE`, the only place a spelling is written down.
"""

from __future__ import annotations

import numpy as np

# v2 name, numpy dtype (None: numpy has none), ONNX elem type, Triton DataType, ORT type string
_TABLE: tuple[tuple[str, type | None, int, str, str], ...] = (
    ("BOOL", np.bool_, 9, "TYPE_BOOL", "tensor(bool)"),
    ("UINT8", np.uint8, 2, "TYPE_UINT8", "tensor(uint8)"),
    ("UINT16", np.uint16, 4, "TYPE_UINT16", "tensor(uint16)"),
    ("UINT32", np.uint32, 12, "TYPE_UINT32", "tensor(uint32)"),
    ("UINT64", np.uint64, 13, "TYPE_UINT64", "tensor(uint64)"),
    ("INT8", np.int8, 3, "TYPE_INT8", "tensor(int8)"),
    ("INT16", np.int16, 5, "TYPE_INT16", "tensor(int16)"),
    ("INT32", np.int32, 6, "TYPE_INT32", "tensor(int32)"),
    ("INT64", np.int64, 7, "TYPE_INT64", "tensor(int64)"),
    ("FP16", np.float16, 10, "TYPE_FP16", "tensor(float16)"),
    ("FP32", np.float32, 1, "TYPE_FP32", "tensor(float)"),
    ("FP64", np.float64, 11, "TYPE_FP64", "tensor(double)"),
    ("BF16", None, 16, "TYPE_BF16", "tensor(bfloat16)"),
    ("BYTES", np.object_, 8, "TYPE_STRING", "tensor(string)"),
)

V2_DATATYPES: tuple[str, ...] = tuple(row[0] for row in _TABLE)
#: KServe v2 name -> numpy dtype (BF16 has no numpy dtype and is absent)
V2_TO_NUMPY: dict[str, np.dtype] = {
    row[0]: np.dtype(row[1]) for row in _TABLE if row[1] is not None
}
NUMPY_TO_V2: dict[np.dtype, str] = {v: k for k, v in V2_TO_NUMPY.items()}
#: ONNX ``TensorProto.DataType`` value -> KServe v2 name
ONNX_TO_V2: dict[int, str] = {row[2]: row[0] for row in _TABLE}
V2_TO_ONNX: dict[str, int] = {v: k for k, v in ONNX_TO_V2.items()}
V2_TO_TRITON: dict[str, str] = {row[0]: row[3] for row in _TABLE}
TRITON_TO_V2: dict[str, str] = {v: k for k, v in V2_TO_TRITON.items()}
#: onnxruntime ``NodeArg.type`` -> KServe v2 name
ORT_TO_V2: dict[str, str] = {row[4]: row[0] for row in _TABLE}


def v2_to_triton(datatype: str) -> str:
    """``"FP32"`` -> ``"TYPE_FP32"``; ``"BYTES"`` -> ``"TYPE_STRING"`` (Triton's name for it)."""
    try:
        return V2_TO_TRITON[datatype]
    except KeyError:
        raise ValueError(
            f"unknown KServe v2 datatype {datatype!r}; expected one of {', '.join(V2_DATATYPES)}"
        ) from None


def triton_to_v2(triton_type: str) -> str:
    """``"TYPE_FP32"`` -> ``"FP32"``; ``"TYPE_STRING"`` -> ``"BYTES"``."""
    if not triton_type.startswith("TYPE_"):
        raise ValueError(f"not a Triton data type: {triton_type!r} (expected TYPE_<NAME>)")
    try:
        return TRITON_TO_V2[triton_type]
    except KeyError:
        raise ValueError(f"unknown Triton data type {triton_type!r}") from None


def onnx_to_v2(elem_type: int) -> str:
    """ONNX element type -> KServe v2 name, with an error that names the unsupported type."""
    try:
        return ONNX_TO_V2[elem_type]
    except KeyError:
        raise ValueError(
            f"ONNX element type {elem_type} has no KServe v2 datatype; "
            f"supported: {sorted(ONNX_TO_V2)}"
        ) from None


def ort_to_v2(ort_type: str) -> str:
    """onnxruntime type string (``"tensor(float)"``) -> KServe v2 name."""
    try:
        return ORT_TO_V2[ort_type]
    except KeyError:
        raise ValueError(
            f"onnxruntime type {ort_type!r} has no KServe v2 datatype; "
            f"supported: {', '.join(ORT_TO_V2)}"
        ) from None
