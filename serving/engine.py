"""One onnxruntime InferenceSession with chosen providers, warm-up and input validation.

Providers (:mod:`serving.providers`): :attr:`Engine.providers` is what the session obtained
(``session.get_providers()``), not what was asked.

Threads. ``intra_op_threads`` (default 1: the pool runs one engine per core). Sessions with >= 2
intra-op threads spin while idle and steal cores from the other engines and the event loop, so
spinning is off unless ``allow_spinning=True`` (``session.intra_op.allow_spinning = "0"``).

Validation. :class:`ModelSignature` checks a request's tensors against the model's specs (names,
datatype, rank, fixed dims, batch size <= ``max_batch_size``, all batch dims equal, non-finite
floats) before anything is queued, so a bad request never reaches (or poisons the batch of) an
engine; each message names the input and the expected spec.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from serving.batching import pad_rows
from serving.model_config import NUMPY_TO_V2, onnx_to_v2
from serving.protocol import BadRequest, Spec
from serving.providers import (  # noqa: F401 - re-exported: the engine's public names
    CONV_ALGO_SEARCHES,
    CPU,
    CUDA,
    cuda_usable,
    default_instances,
    resolve_providers,
    session_providers,
)

log = logging.getLogger(__name__)


_ORT_TYPES = {
    "tensor(float)": 1,
    "tensor(uint8)": 2,
    "tensor(int8)": 3,
    "tensor(uint16)": 4,
    "tensor(int16)": 5,
    "tensor(int32)": 6,
    "tensor(int64)": 7,
    "tensor(string)": 8,
    "tensor(bool)": 9,
    "tensor(float16)": 10,
    "tensor(double)": 11,
    "tensor(uint32)": 12,
    "tensor(uint64)": 13,
    "tensor(bfloat16)": 16,
}


class InputError(BadRequest):
    """A request tensor does not match the model's input spec (HTTP 400)."""


# ---------------------------------------------------------------- signature


@dataclass(frozen=True)
class ModelSignature:
    """The served interface of one model version.

    ``max_batch_size > 0``: dim 0 of every input and output is the batch dim; requests may carry
    1..max_batch_size rows and the dispatcher concatenates requests along it. ``0``: no batch dim,
    requests are never merged. ``allow_nonfinite``: input names whose float values may be NaN/Inf
    (by default no float input may be).
    """

    inputs: tuple[Spec, ...]
    outputs: tuple[Spec, ...]
    max_batch_size: int
    allow_nonfinite: frozenset[str] = frozenset()

    @classmethod
    def build(
        cls,
        inputs: Iterable[Any],
        outputs: Iterable[Any],
        max_batch_size: int,
        allow_nonfinite: Iterable[str] = (),
    ) -> ModelSignature:
        return cls(
            tuple(Spec.of(s) for s in inputs),
            tuple(Spec.of(s) for s in outputs),
            int(max_batch_size),
            frozenset(allow_nonfinite),
        )

    @classmethod
    def from_session(cls, session: ort.InferenceSession, max_batch_size: int) -> ModelSignature:
        """Specs read from the ONNX graph (symbolic dims become -1)."""

        def specs(args: Sequence[Any]) -> tuple[Spec, ...]:
            return tuple(
                Spec(
                    a.name,
                    onnx_to_v2(_ORT_TYPES.get(a.type, 0)),
                    tuple(d if isinstance(d, int) and d >= 0 else -1 for d in a.shape),
                )
                for a in args
            )

        return cls(specs(session.get_inputs()), specs(session.get_outputs()), max_batch_size)

    @functools.cached_property
    def input_map(self) -> dict[str, Spec]:
        return {s.name: s for s in self.inputs}

    @functools.cached_property
    def output_names(self) -> list[str]:
        return [s.name for s in self.outputs]

    def describe_inputs(self) -> str:
        return "; ".join(s.describe() for s in self.inputs)

    def validate(self, feeds: Mapping[str, np.ndarray]) -> int:
        """Check ``feeds`` against the input specs; returns the batch size (1 when not batching).

        Raises :class:`InputError` naming the input and its expected spec.
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
                got = _v2_name(arr.dtype)
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
        for i_spec in self.inputs:
            shape = [1 if d == -1 else d for d in i_spec.shape]
            if self.max_batch_size > 0 and shape:
                shape[0] = batch
            feeds[i_spec.name] = np.zeros(shape, dtype=i_spec.dtype)
        return feeds


def _v2_name(dtype: np.dtype) -> str:
    return NUMPY_TO_V2.get(dtype, str(dtype))


# ---------------------------------------------------------------- engine


class Engine:
    """One InferenceSession. :meth:`run` is thread-safe (onnxruntime releases the GIL inside)."""

    def __init__(
        self,
        model_path: str | Path,
        signature: ModelSignature | None = None,
        *,
        max_batch_size: int = 0,
        providers: str | Sequence[str] = "auto",
        intra_op_threads: int = 1,
        allow_spinning: bool = False,
        cudnn_conv_algo_search: str = "heuristic",
        pad_batches: bool | str = "auto",
        warmup: bool = True,
        name: str = "engine",
    ) -> None:
        self.name = name
        self.model_path = Path(model_path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, int(intra_op_threads))
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if not allow_spinning:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        self.requested_providers = resolve_providers(providers)
        self.session = ort.InferenceSession(
            str(self.model_path),
            options,
            providers=session_providers(self.requested_providers, cudnn_conv_algo_search),
        )
        self.providers: list[str] = self.session.get_providers()
        if self.requested_providers[0] not in self.providers:
            log.warning(
                "%s asked for %s but obtained %s", name, self.requested_providers, self.providers
            )
        graph = ModelSignature.from_session(self.session, max_batch_size)
        self.signature = signature or graph
        _check_against_graph(self.signature, graph, self.model_path)
        self.output_names = self.signature.output_names
        self.pad_to = self._pad_target(pad_batches)
        self.warmup_seconds = 0.0
        if warmup:
            self.warmup()

    def _pad_target(self, pad_batches: bool | str) -> int:
        """Rows every run is padded to: ``max_batch_size`` when padding is on, else 0.

        ``"auto"`` pads on the CUDA provider only. There every change of input shape costs a
        cuDNN set-up of each convolution (on an H200: ~44 ms per change for ResNet-18 against
        1.3 ms for a whole 64-row run, benchmarks/gpu_conv_search.py), and dynamic batching
        changes the shape almost every run under batch-1 load; one shape per engine removes
        that. On the CPU the padded rows would cost their compute and a shape change costs
        nothing, so padding is off."""
        if self.signature.max_batch_size <= 1:
            return 0
        if pad_batches == "auto":
            pad = self.providers[:1] == [CUDA]
        elif isinstance(pad_batches, bool):
            pad = pad_batches
        else:
            raise ValueError(f"pad_batches must be true, false or auto, got {pad_batches!r}")
        return self.signature.max_batch_size if pad else 0

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Runs the session; outputs by name. Feeds are assumed validated (equal batch dims)."""
        rows = next(iter(feeds.values())).shape[0] if self.pad_to and feeds else 0
        if rows and rows < self.pad_to:
            values = self.session.run(self.output_names, pad_rows(feeds, self.pad_to))
            values = [v[:rows] for v in values]
        else:
            values = self.session.run(self.output_names, feeds)
        return dict(zip(self.output_names, values, strict=True))

    def warmup(self) -> None:
        """One run at batch 1 and one at max_batch_size (allocations, kernel selection)."""
        t0 = time.perf_counter()
        sizes = {1}
        if self.signature.max_batch_size > 1:
            sizes.add(self.signature.max_batch_size)
        for n in sorted(sizes):
            self.run(self.signature.example_feeds(n))
        self.warmup_seconds = time.perf_counter() - t0

    def close(self) -> None:
        self.session = None  # type: ignore[assignment]


def _check_against_graph(sig: ModelSignature, graph: ModelSignature, path: Path) -> None:
    """The declared specs must name the graph's inputs/outputs with the same datatypes and ranks."""
    for kind, declared, actual in (
        ("input", sig.inputs, graph.inputs),
        ("output", sig.outputs, graph.outputs),
    ):
        by_name = {s.name: s for s in actual}
        for spec in declared:
            real = by_name.get(spec.name)
            if real is None:
                raise ValueError(
                    f"{path}: declared {kind} '{spec.name}' is not in the ONNX graph "
                    f"(graph has {', '.join(by_name) or 'none'})"
                )
            if real.datatype != spec.datatype or len(real.shape) != len(spec.shape):
                raise ValueError(
                    f"{path}: declared {kind} {spec.describe()} disagrees with the graph's "
                    f"{real.describe()}"
                )
        if kind == "input" and {s.name for s in declared} != set(by_name):
            raise ValueError(
                f"{path}: declared inputs {[s.name for s in declared]} differ from the graph's "
                f"{list(by_name)}"
            )
