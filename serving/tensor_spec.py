"""Tensor specs: the name, KServe v2 datatype and shape of a model input or output.

:func:`specs_from_onnx` reads them off an ONNX graph; :func:`check_specs` checks that specs given
to publish describe that graph. Needs numpy and onnx only.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from serving.errors import RepositoryError
from serving.model_config import V2_DATATYPES, V2_TO_NUMPY, onnx_to_v2, v2_to_triton


@dataclass
class TensorSpec:
    """One model input or output.

    ``datatype`` is the KServe v2 name (``"FP32"``, ``"INT64"``, ...); ``shape`` includes the
    batch dimension, ``-1`` marks a dynamic dimension.
    """

    name: str
    datatype: str
    shape: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise RepositoryError(f"tensor name must be a non-empty string, got {self.name!r}")
        if self.datatype not in V2_DATATYPES:
            raise RepositoryError(
                f"tensor {self.name!r}: datatype must be a KServe v2 name "
                f"({', '.join(V2_DATATYPES)}), got {self.datatype!r}"
            )
        shape = [int(d) for d in self.shape]
        if any(d < -1 for d in shape):
            raise RepositoryError(
                f"tensor {self.name!r}: dims must be >= 0 or -1 (dynamic), got {shape}"
            )
        self.shape = shape

    @property
    def numpy_dtype(self) -> np.dtype:
        if self.datatype not in V2_TO_NUMPY:
            raise RepositoryError(f"datatype {self.datatype} has no numpy dtype")
        return V2_TO_NUMPY[self.datatype]

    @property
    def triton_type(self) -> str:
        return v2_to_triton(self.datatype)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TensorSpec:
        return cls(name=data["name"], datatype=data["datatype"], shape=list(data["shape"]))


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
                f"{kind} {spec.name!r}: shape {spec.shape} does not fit the ONNX graph's "
                f"{ref.shape} (-1 = dynamic)"
            )
