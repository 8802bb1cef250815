"""Global model -> ONNX (dynamic batch) -> parity check in onnxruntime -> model repository.

:func:`export_onnx` writes one ONNX file whose input ``input`` and output ``logits`` have a
dynamic batch axis (dim 0, ``"batch"``); the model is exported in eval mode (BatchNorm uses its
running statistics) and put back in the mode it was in. Two exporters:

- ``"legacy"`` (default): TorchScript tracing, ``torch.onnx.export(..., dynamo=False,
  dynamic_axes=...)``. ~0.25 s for ResNet-18 here.
- ``"dynamo"``: ``torch.export`` based, ``dynamic_shapes={<forward arg>: {0: Dim("batch")}}``.
  ~1.5-3 s for ResNet-18 here; same graph interface and parity.

Models whose parameters and buffers exceed ``external_data_threshold_bytes`` (2 GiB, protobuf's
limit) are saved with ONNX external data: ``model.onnx`` + ``model.onnx.data``.

:func:`check_parity` runs the file in onnxruntime (CPU) on a real batch and on its first sample
(proving the batch axis is dynamic) and compares with torch: ``max |onnx - torch|`` above ``atol``
raises :class:`ExportParityError` naming both numbers. :func:`export_and_publish` chains export,
check and :meth:`~serving.repository.ModelRepository.publish` (only after the check passed) and then
applies the retention of :class:`ExportConfig` (the schema of conf/'s ``export/`` group).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from serving.onnx_specs import specs_from_onnx
from serving.repository import ModelRepository
from serving.store_repository import StoreRepository
from serving.tensor_spec import TensorSpec
from task.config import ConfigError, check_non_negative, check_positive

log = logging.getLogger(__name__)

EXPORTERS = ("legacy", "dynamo")
DEFAULT_EXPORTER = "legacy"
EXTERNAL_DATA_THRESHOLD = 2**31
#: metric (in ``metadata["metrics"]``) whose best version retention keeps when export.keep_best
BEST_METRIC = "test_acc"


@dataclass
class ExportConfig:
    """When and how global models become ONNX versions in the model repository."""

    enabled: bool = True
    model_name: str = "fedserve"
    every: int = 1  # export every N global versions (0 = only at the end / on best)
    at_end: bool = True
    on_best: bool = True
    opset: int = 18
    atol: float = 1e-4
    keep_last: int = 5
    keep_best: bool = True
    max_batch_size: int = 64

    def validate(self) -> None:
        check_non_negative("export.every", self.every)
        check_positive("export.atol", self.atol)
        check_positive("export.keep_last", self.keep_last)
        check_positive("export.max_batch_size", self.max_batch_size)
        if not 7 <= self.opset <= 23:
            raise ConfigError(f"export.opset must be in [7, 23], got {self.opset}")


class ExportError(RuntimeError):
    """torch -> ONNX export failed; nothing was published."""


class ExportParityError(ExportError):
    """The ONNX model disagrees with torch by more than the tolerance; nothing was published."""

    def __init__(self, max_abs_diff: float, atol: float, detail: str = "") -> None:
        self.max_abs_diff = max_abs_diff
        self.atol = atol
        super().__init__(
            f"ONNX parity check failed: max abs difference {max_abs_diff:.3g} between onnxruntime "
            f"and torch exceeds export.atol={atol:g}{detail}; the model was not published"
        )


@dataclass
class ExportInfo:
    """What :func:`export_onnx` wrote."""

    path: Path
    external_data: Path | None
    opset: int
    exporter: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    parameter_bytes: int
    seconds: float


@dataclass
class ExportResult:
    """The published version, the parity number and where the time went (seconds)."""

    version: int
    max_abs_diff: float
    seconds: dict[str, float]
    exporter: str
    external_data: bool = False
    removed_versions: list[int] = field(default_factory=list)


def parameter_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers (shared tensors counted once)."""
    seen: set[int] = set()
    total = 0
    for tensor in model.state_dict(keep_vars=False).values():
        key = tensor.untyped_storage().data_ptr() if tensor.numel() else id(tensor)
        if key in seen:
            continue
        seen.add(key)
        total += tensor.numel() * tensor.element_size()
    return total


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    return torch.device("cpu")


def _trace_batch(sample: torch.Tensor) -> torch.Tensor:
    """Two samples: batch size 1 would let the exporter specialise the batch axis."""
    if sample.ndim < 1 or sample.shape[0] < 1:
        raise ExportError(
            f"sample batch must have a batch dim >= 1, got shape {tuple(sample.shape)}"
        )
    if sample.shape[0] >= 2:
        return sample[:2]
    return torch.cat([sample, sample], dim=0)


def _forward_arg_name(model: nn.Module) -> str:
    params = [
        p
        for p in inspect.signature(model.forward).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    if not params:
        raise ExportError(f"{type(model).__name__}.forward takes no positional argument")
    return params[0].name


def _run_exporter(
    model: nn.Module,
    x: torch.Tensor,
    path: Path,
    *,
    exporter: str,
    opset: int,
    input_name: str,
    output_name: str,
    large: bool,
) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.simplefilter("ignore", category=FutureWarning)
        warnings.simplefilter("ignore", category=UserWarning)
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
        if exporter == "legacy":
            torch.onnx.export(
                model,
                (x,),
                str(path),
                dynamo=False,
                opset_version=opset,
                input_names=[input_name],
                output_names=[output_name],
                dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}},
                do_constant_folding=True,
            )
        else:
            batch = torch.export.Dim("batch")
            torch.onnx.export(
                model,
                (x,),
                str(path),
                dynamo=True,
                external_data=large,
                opset_version=opset,
                input_names=[input_name],
                output_names=[output_name],
                dynamic_shapes={_forward_arg_name(model): {0: batch}},
                verbose=False,
            )


def export_onnx(
    model: nn.Module,
    sample_batch: torch.Tensor,
    path: str | os.PathLike,
    *,
    opset: int,
    input_name: str = "input",
    output_name: str = "logits",
    external_data_threshold_bytes: int = EXTERNAL_DATA_THRESHOLD,
    exporter: str = DEFAULT_EXPORTER,
) -> ExportInfo:
    """Export ``model`` (eval mode, no grad) to ``path`` with a dynamic batch axis.

    Above ``external_data_threshold_bytes`` of parameters the tensors go to
    ``<path>.data`` (``path.name + ".data"``, i.e. ``model.onnx.data``) as ONNX external data.
    """
    if exporter not in EXPORTERS:
        raise ExportError(f"exporter must be one of {', '.join(EXPORTERS)}, got {exporter!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data_path = path.with_name(path.name + ".data")
    nbytes = parameter_bytes(model)
    large = nbytes > external_data_threshold_bytes
    started = time.perf_counter()
    x = _trace_batch(sample_batch).to(_model_device(model))
    # Export into a private directory: exporters may write extra files (external tensors).
    scratch = Path(tempfile.mkdtemp(prefix=".export-", dir=path.parent))
    try:
        raw = scratch / "model.onnx"
        with _eval_mode(model):
            try:
                _run_exporter(
                    model,
                    x,
                    raw,
                    exporter=exporter,
                    opset=opset,
                    input_name=input_name,
                    output_name=output_name,
                    large=large,
                )
            except Exception as exc:
                raise ExportError(
                    f"{exporter} ONNX export of {type(model).__name__} failed: {exc}"
                ) from exc
        with contextlib.suppress(FileNotFoundError):
            data_path.unlink()  # onnx appends to an existing data file
        if large:
            proto = onnx.load(str(raw))  # pulls in whatever external files the exporter wrote
            onnx.save_model(
                proto,
                str(path),
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location=data_path.name,
            )
        else:
            os.replace(raw, path)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    inputs, outputs = specs_from_onnx(path)
    for spec in inputs + outputs:
        if not spec.shape or spec.shape[0] != -1:
            raise ExportError(
                f"exported {spec.name!r} has shape {spec.shape}: the batch axis is not dynamic"
            )
    seconds = time.perf_counter() - started
    log.info("exported %s with %s exporter in %.2fs", type(model).__name__, exporter, seconds)
    return ExportInfo(
        path=path,
        external_data=data_path if large else None,
        opset=opset,
        exporter=exporter,
        inputs=inputs,
        outputs=outputs,
        parameter_bytes=nbytes,
        seconds=seconds,
    )


def onnx_session(path: str | os.PathLike) -> Any:
    """An onnxruntime CPU session for ``path`` (external data is found next to it)."""
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def max_abs_diff(model: nn.Module, session: Any, batch: torch.Tensor) -> float:
    """``max |onnxruntime(batch) - model(batch)|`` (inf on a shape mismatch or a NaN)."""
    with _eval_mode(model):
        expected = model(batch.to(_model_device(model))).float().cpu().numpy()
    feed = {session.get_inputs()[0].name: batch.detach().cpu().numpy().astype(np.float32)}
    got = session.run(None, feed)[0]
    if got.shape != expected.shape:
        return math.inf
    diff = float(np.max(np.abs(got.astype(np.float64) - expected))) if got.size else 0.0
    return diff if math.isfinite(diff) else math.inf


def check_parity(
    model: nn.Module, onnx_path: str | os.PathLike, batch: torch.Tensor, *, atol: float
) -> float:
    """Max abs difference over ``batch`` and ``batch[:1]``; raises ExportParityError > atol."""
    session = onnx_session(onnx_path)
    diffs = [max_abs_diff(model, session, batch)]
    if batch.shape[0] > 1:
        diffs.append(max_abs_diff(model, session, batch[:1]))
    worst = max(diffs)
    if not worst <= atol:
        raise ExportParityError(worst, atol, f" (batch of {batch.shape[0]} and of 1)")
    return worst


def export_and_publish(
    model: nn.Module,
    sample_batch: torch.Tensor,
    repo: ModelRepository | StoreRepository,
    model_name: str,
    metadata: dict[str, Any],
    cfg: ExportConfig,
    *,
    exporter: str = DEFAULT_EXPORTER,
    best_metric: str = BEST_METRIC,
    external_data_threshold_bytes: int = EXTERNAL_DATA_THRESHOLD,
    version: int | None = None,
) -> ExportResult:
    """Export ``model``, check it on ``sample_batch`` (a real test batch), publish, retain.

    ``metadata`` carries ``global_version``, ``round``, ``metrics`` and ``config``; an ``export``
    section (exporter, opset, atol, max_abs_diff, versions) is added. Retention keeps the newest
    ``cfg.keep_last`` and, with ``cfg.keep_best``, the best ``metrics[best_metric]``.
    Nothing is published when export or the parity check fails. ``version``: the repository
    version to publish as (default: the next).
    """
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fedserve-export-") as tmp:
        info = export_onnx(
            model,
            sample_batch,
            Path(tmp) / "model.onnx",
            opset=cfg.opset,
            external_data_threshold_bytes=external_data_threshold_bytes,
            exporter=exporter,
        )
        exported = time.perf_counter()
        diff = check_parity(model, info.path, sample_batch, atol=cfg.atol)
        checked = time.perf_counter()
        meta = dict(metadata)
        meta["export"] = {
            "exporter": exporter,
            "opset": cfg.opset,
            "atol": cfg.atol,
            "max_abs_diff": diff,
            "parity_batch_size": int(sample_batch.shape[0]),
            "parameter_bytes": info.parameter_bytes,
            "torch": torch.__version__,
            "onnx": onnx.__version__,
        }
        version = repo.publish(
            model_name,
            info.path,
            inputs=info.inputs,
            outputs=info.outputs,
            metadata=meta,
            max_batch_size=cfg.max_batch_size,
            external_data=info.external_data,
            version=version,
        )
    removed = repo.apply_retention(
        model_name, cfg.keep_last, best_metric if cfg.keep_best else None
    )
    published = time.perf_counter()
    seconds = {
        "export": exported - started,
        "check": checked - exported,
        "publish": published - checked,
        "total": published - started,
    }
    log.info(
        "published %s version %d: max abs diff %.2e, export %.2fs, check %.2fs, publish %.2fs",
        model_name,
        version,
        diff,
        seconds["export"],
        seconds["check"],
        seconds["publish"],
    )
    return ExportResult(
        version=version,
        max_abs_diff=diff,
        seconds=seconds,
        exporter=exporter,
        external_data=info.external_data is not None,
        removed_versions=removed,
    )
