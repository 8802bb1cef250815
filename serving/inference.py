"""The protocol-neutral inference request and result.

Every front end's codec decodes its wire format into an :class:`InferRequest` and encodes an
:class:`InferResult` back; the dataplane (:mod:`serving.dataplane`) sits between them and knows
no wire format. Needs numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(slots=True)
class InferRequest:
    """A decoded inference request: tensors keyed by input name, in request order.

    ``outputs`` lists the requested outputs as ``(name, binary)``, or is None for "all outputs";
    ``binary`` (and ``binary_output``, the default for all outputs) is how the KServe v2 HTTP codec
    is asked to return a tensor, which other codecs leave False.
    """

    inputs: dict[str, np.ndarray]
    id: str | None = None
    outputs: list[tuple[str, bool]] | None = None
    binary_output: bool = False


@dataclass(slots=True)
class InferResult:
    """What the model version that ran a request answered.

    ``outputs`` holds every output the model produced; ``output_names`` the ones to answer, in
    answer order (the requested ones, or all in the model's order). ``queue_seconds`` is the
    time the request waited before its batch started.
    """

    model_name: str
    model_version: int
    id: str | None
    outputs: dict[str, np.ndarray]
    output_names: list[str]
    queue_seconds: float
