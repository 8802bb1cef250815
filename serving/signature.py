"""The served interface of one model version, and the check of a request's tensors against it.

:meth:`ModelSignature.validate` checks decoded tensors against the model's specs (names, datatype,
rank, fixed dims, batch size <= ``max_batch_size``, all batch dims equal, non-finite floats) before
anything is queued, so a bad request never reaches (or poisons the batch of) an engine; each
message names the input and the expected spec.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from serving.datatypes import NUMPY_TO_V2
from serving.errors import InputError
from serving.tensor_spec import TensorSpec


@dataclass(frozen=True)
class ModelSignature:
    """The served interface of one model version.

    ``max_batch_size > 0``: dim 0 of every input and output is the batch dim; requests may carry
    1..max_batch_size rows and the dispatcher concatenates requests along it. ``0``: no batch dim,
    requests are never merged. ``allow_nonfinite``: input names whose float values may be NaN/Inf
    (by default no float input may be).
    """

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch_size: int
    allow_nonfinite: frozenset[str] = frozenset()

    @classmethod
    def build(
        cls,
        inputs: Iterable[TensorSpec | Mapping],
        outputs: Iterable[TensorSpec | Mapping],
        max_batch_size: int,
        allow_nonfinite: Iterable[str] = (),
    ) -> ModelSignature:
        """From specs or their dicts (a version's ``metadata.json`` ``inputs``/``outputs``)."""

        def specs(items: Iterable[TensorSpec | Mapping]) -> tuple[TensorSpec, ...]:
            return tuple(s if isinstance(s, TensorSpec) else TensorSpec.from_dict(s) for s in items)

        return cls(specs(inputs), specs(outputs), int(max_batch_size), frozenset(allow_nonfinite))

    @functools.cached_property
    def input_map(self) -> dict[str, TensorSpec]:
        return {s.name: s for s in self.inputs}

    @functools.cached_property
    def output_names(self) -> list[str]:
        return [s.name for s in self.outputs]

    def describe_inputs(self) -> str:
        return "; ".join(s.describe() for s in self.inputs)

    def validate(self, feeds: Mapping[str, np.ndarray]) -> int:
        """Check ``feeds`` against the input specs; returns the batch size (1 when not batching).

        Raises :class:`~serving.errors.InputError` naming the input and its expected spec.
        """
        specs = self.input_map
        batch = -1
        for name, arr in feeds.items():
            spec = specs.get(name)
            if spec is None:
                raise InputError(
                    f"unknown input '{name}'; the model expects {self.describe_inputs()}"
                )
            if arr.dtype != spec.dtype:
                got = NUMPY_TO_V2.get(arr.dtype, str(arr.dtype))
                raise InputError(
                    f"input '{name}': datatype {got} does not match the model's {spec.describe()}"
                )
            shape = arr.shape
            if len(shape) != len(spec.shape) or any(
                want != -1 and got != want for got, want in zip(shape, spec.shape, strict=True)
            ):
                raise InputError(
                    f"input '{name}': shape {list(shape)} does not match the model's "
                    f"{spec.describe()}"
                )
            if self.max_batch_size > 0:
                n = shape[0]
                if n < 1 or n > self.max_batch_size:
                    raise InputError(
                        f"input '{name}': batch size {n} is outside 1..{self.max_batch_size} "
                        f"(max_batch_size) for {spec.describe()}"
                    )
                if batch == -1:
                    batch = n
                elif n != batch:
                    raise InputError(
                        f"input '{name}': batch size {n} differs from the other inputs' {batch}"
                    )
            if arr.dtype.kind == "f" and name not in self.allow_nonfinite:
                if not np.isfinite(arr).all():
                    raise InputError(
                        f"input '{name}': contains NaN or Inf, which the model does not accept "
                        f"({spec.describe()})"
                    )
        if len(feeds) != len(specs):
            missing = [s.describe() for s in self.inputs if s.name not in feeds]
            raise InputError(f"missing input(s): {'; '.join(missing)}")
        return batch if batch > 0 else 1

    def example_feeds(self, batch: int = 1) -> dict[str, np.ndarray]:
        """Zeros of each input spec (dynamic dims 1, batch ``batch``) for warm-up."""
        feeds = {}
        for spec in self.inputs:
            if spec.dtype is None:
                raise ValueError(
                    f"input {spec.describe()}: numpy has no {spec.datatype} dtype, so this "
                    "server cannot feed it"
                )
            shape = [1 if d == -1 else d for d in spec.shape]
            if self.max_batch_size > 0 and shape:
                shape[0] = batch
            feeds[spec.name] = np.zeros(shape, dtype=spec.dtype)
        return feeds
