"""The datatype table: every spelling agrees with Triton's DataType enum, ONNX's element types,
numpy and the type strings onnxruntime reports."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

from serving.datatypes import (
    ONNX_TO_V2,
    ORT_TO_V2,
    V2_DATATYPES,
    V2_TO_NUMPY,
    onnx_to_v2,
    ort_to_v2,
    triton_to_v2,
    v2_to_triton,
)

mc = pytest.importorskip("tritonclient.grpc.model_config_pb2")

#: ONNX TensorProto names that differ from the KServe v2 ones
ONNX_NAMES = {
    "FLOAT": "FP32",
    "DOUBLE": "FP64",
    "FLOAT16": "FP16",
    "BFLOAT16": "BF16",
    "STRING": "BYTES",
}


def test_triton_onnx_and_numpy_spellings_agree() -> None:
    triton_names = set(mc.DataType.keys())
    for v2 in V2_DATATYPES:
        assert v2_to_triton(v2) in triton_names
        assert triton_to_v2(v2_to_triton(v2)) == v2
    for elem, v2 in ONNX_TO_V2.items():
        onnx_name = onnx.TensorProto.DataType.Name(elem)
        assert ONNX_NAMES.get(onnx_name, onnx_name) == v2
        if v2 in V2_TO_NUMPY and v2 != "BYTES":
            assert np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem)) == V2_TO_NUMPY[v2]
    assert set(ONNX_TO_V2.values()) == set(V2_DATATYPES)
    assert v2_to_triton("BYTES") == "TYPE_STRING" and triton_to_v2("TYPE_STRING") == "BYTES"
    assert "BF16" not in V2_TO_NUMPY  # numpy has no bfloat16


@pytest.mark.parametrize("v2", [t for t in V2_DATATYPES if t != "BF16"])
def test_onnxruntime_type_strings(v2: str) -> None:
    """An Identity graph of each type: onnxruntime's NodeArg.type maps back to the same name."""
    elem = {v: k for k, v in ONNX_TO_V2.items()}[v2]
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "identity",
        [helper.make_tensor_value_info("x", elem, [2])],
        [helper.make_tensor_value_info("y", elem, [2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert ort_to_v2(session.get_inputs()[0].type) == v2
    assert ORT_TO_V2[session.get_outputs()[0].type] == v2


def test_unknown_spellings_are_refused_naming_the_value() -> None:
    with pytest.raises(ValueError, match="FP32"):
        v2_to_triton("float")
    # Triton's enum has TYPE_STRING, not TYPE_BYTES; the old reader accepted the latter
    with pytest.raises(ValueError, match="TYPE_BYTES"):
        triton_to_v2("TYPE_BYTES")
    with pytest.raises(ValueError, match="not a Triton data type"):
        triton_to_v2("FP32")
    with pytest.raises(ValueError, match="ONNX element type 0"):
        onnx_to_v2(0)
    with pytest.raises(ValueError, match=r"tensor\(complex64\)"):
        ort_to_v2("tensor(complex64)")
