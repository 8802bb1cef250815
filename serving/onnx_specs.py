"""Tensor specs of an ONNX graph, and the check that specs given to publish describe that graph.

Needs numpy and onnx only.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import onnx

from serving.datatypes import onnx_to_v2
from serving.errors import RepositoryError
from serving.tensor_spec import TensorSpec


def _value_info_spec(info: onnx.ValueInfoProto) -> TensorSpec:
    tensor_type = info.type.tensor_type
    dims = [
        d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1
        for d in tensor_type.shape.dim
    ]
    try:
        datatype = onnx_to_v2(tensor_type.elem_type)
    except ValueError as exc:
        raise RepositoryError(f"graph tensor {info.name!r}: {exc}") from None
    return TensorSpec(info.name, datatype, dims)


def specs_from_onnx(
    model: onnx.ModelProto | str | os.PathLike,
) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """(inputs, outputs) of an ONNX graph; initializers listed as inputs are skipped.

    Symbolic dims (``"batch"``) become -1. A path is read without its external data.
    """
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(os.fspath(model), load_external_data=False)
    initializers = {t.name for t in model.graph.initializer}
    inputs = [_value_info_spec(i) for i in model.graph.input if i.name not in initializers]
    outputs = [_value_info_spec(o) for o in model.graph.output]
    return inputs, outputs


def check_specs(kind: str, given: Sequence[TensorSpec], graph: Sequence[TensorSpec]) -> None:
    """The specs to publish must describe the graph: same names, types, ranks; a dim may be
    fixed in the spec where the graph is dynamic, never dynamic where the graph is fixed."""
    if [s.name for s in given] != [s.name for s in graph]:
        raise RepositoryError(
            f"{kind} names {[s.name for s in given]} do not match the ONNX graph's "
            f"{[s.name for s in graph]}"
        )
    for spec, ref in zip(given, graph, strict=True):
        if spec.datatype != ref.datatype:
            raise RepositoryError(
                f"{kind} {spec.name!r}: datatype {spec.datatype} does not match the ONNX graph's "
                f"{ref.datatype}"
            )
        ok = len(spec.shape) == len(ref.shape) and all(
            r == -1 or s == r for s, r in zip(spec.shape, ref.shape, strict=True)
        )
        if not ok:
            raise RepositoryError(
                f"{kind} {spec.name!r}: shape {list(spec.shape)} does not fit the ONNX graph's "
                f"{list(ref.shape)} (-1 = dynamic)"
            )
