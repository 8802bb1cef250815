"""The spec of one model input or output: name, KServe v2 datatype and shape.

One type for the repository's metadata, the engine's signature, the codec's error messages and the
API's metadata documents. Needs numpy only (reading specs off an ONNX graph is
:mod:`serving.onnx_specs`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from serving.datatypes import V2_DATATYPES, V2_TO_NUMPY
from serving.errors import RepositoryError


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One model input or output.

    ``datatype`` is the KServe v2 name (``"FP32"``, ``"INT64"``, ...); ``shape`` includes the
    batch dimension, ``-1`` marks a dynamic dimension (any iterable of ints is accepted and stored
    as a tuple). ``dtype`` is the numpy dtype, None for ``BF16``, which numpy lacks. A bad name,
    datatype or dim raises :class:`~serving.errors.RepositoryError` (specs are part of the
    repository's format).
    """

    name: str
    datatype: str
    shape: tuple[int, ...] = ()
    dtype: np.dtype | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        name, datatype = self.name, self.datatype
        if not isinstance(name, str) or not name:
            raise RepositoryError(f"tensor name must be a non-empty string, got {name!r}")
        if datatype not in V2_DATATYPES:
            raise RepositoryError(
                f"tensor {name!r}: datatype must be a KServe v2 name "
                f"({', '.join(V2_DATATYPES)}), got {datatype!r}"
            )
        dims = tuple(int(d) for d in self.shape)
        if any(d < -1 for d in dims):
            raise RepositoryError(
                f"tensor {name!r}: dims must be >= 0 or -1 (dynamic), got {list(dims)}"
            )
        object.__setattr__(self, "shape", dims)
        object.__setattr__(self, "dtype", V2_TO_NUMPY.get(datatype))

    def describe(self) -> str:
        """``"x: FP32 [-1, 4]"``, the form every error message about a tensor uses."""
        return f"{self.name}: {self.datatype} {list(self.shape)}"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TensorSpec:
        return cls(str(data["name"]), str(data["datatype"]), data["shape"])
