"""Triton's ``config.pbtxt``: read and written as Triton's own ``ModelConfig`` protobuf message.

The message class is the one Triton publishes (``model_config.proto``, generated code shipped by
``tritonclient``), parsed and printed with protobuf's ``text_format``: every valid Triton config
loads, and an invalid one (``max_batch_sise``, ``KIND_GPUU``) is refused with protobuf's message,
which names the line and the field. What Triton does not define is here:

* :func:`new_config`: the config fedserve writes for a model it publishes first;
* :func:`merge_published`: a republish changes only the fields derived from the model (name,
  platform, ``max_batch_size``, the inputs' and outputs' ``data_type`` and ``dims``) and keeps
  every other field of a config a person edited;
* :func:`tensor_specs` / :func:`complete_config`: tensor specs from a config, and Triton's
  auto-complete for ONNX models (specs from the graph when the config omits them).

Shapes: a :class:`~serving.tensor_spec.TensorSpec` shape includes the batch dimension (``-1`` is
dynamic). Triton's ``dims`` exclude it whenever ``max_batch_size > 0``; with ``max_batch_size: 0``
the dims are the full shape.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from google.protobuf import json_format, text_format
from tritonclient.grpc.model_config_pb2 import DataType, ModelConfig, ModelInstanceGroup

from serving.datatypes import triton_to_v2, v2_to_triton
from serving.errors import RepositoryError
from serving.tensor_spec import TensorSpec

ONNX_PLATFORM = "onnxruntime_onnx"
ONNX_BACKEND = "onnxruntime"
#: what Triton's auto-complete sets ``max_batch_size`` to for a model that can batch
#: (tritonserver's ``--backend-config=default-max-batch-size``, 4 unless changed)
AUTO_MAX_BATCH_SIZE = 4


def parse_config(text: str, source: str) -> ModelConfig:
    """``text`` as a ModelConfig; RepositoryError with protobuf's message (line, field)."""
    try:
        return text_format.Parse(text, ModelConfig())
    except text_format.ParseError as exc:
        raise RepositoryError(f"{source} is not a valid Triton ModelConfig: {exc}") from None


def render_config(config: ModelConfig) -> str:
    """Protobuf text format of ``config`` (map entries sorted: the same config, the same text)."""
    return text_format.MessageToString(config)


def triton_dims(shape: Sequence[int], max_batch_size: int) -> list[int]:
    """Triton ``dims`` for a full shape (batch included): drop the batch dim when batching."""
    shape = [int(d) for d in shape]
    if max_batch_size > 0:
        if not shape:
            raise ValueError("a tensor of a batching model (max_batch_size > 0) needs a batch dim")
        if shape[0] != -1:
            raise ValueError(
                f"max_batch_size={max_batch_size} needs a dynamic batch dim (-1) first, "
                f"got shape {shape}; export with a dynamic batch axis or set max_batch_size=0"
            )
        return shape[1:]
    return shape


def new_config(
    name: str,
    inputs: Iterable[TensorSpec],
    outputs: Iterable[TensorSpec],
    *,
    max_batch_size: int,
    max_queue_delay_microseconds: int = 100,
    instance_count: int = 1,
    instance_kind: str = "KIND_AUTO",
    num_versions: int | None = 1,
) -> ModelConfig:
    """The config fedserve writes for a new ONNX model (ValueError naming a bad argument).

    ``inputs``/``outputs`` shapes include the batch dim. ``num_versions=None`` serves all
    versions (``version_policy { all {} }``), otherwise the newest ``num_versions``. Dynamic
    batching is only written when batching.
    """
    if max_batch_size < 0:
        raise ValueError(f"max_batch_size must be >= 0, got {max_batch_size}")
    if instance_count < 1:
        raise ValueError(f"instance_count must be >= 1, got {instance_count}")
    if num_versions is not None and num_versions < 1:
        raise ValueError(f"num_versions must be >= 1 or None (all), got {num_versions}")
    if instance_kind not in ModelInstanceGroup.Kind.keys():
        raise ValueError(
            f"instance_kind must be one of {', '.join(ModelInstanceGroup.Kind.keys())}, "
            f"got {instance_kind!r}"
        )
    inputs, outputs = list(inputs), list(outputs)
    if not inputs or not outputs:
        raise ValueError("a model needs at least one input and one output")
    config = ModelConfig(name=name, platform=ONNX_PLATFORM, max_batch_size=int(max_batch_size))
    _set_tensors(config, inputs, outputs)
    if max_batch_size > 0:
        config.dynamic_batching.max_queue_delay_microseconds = int(max_queue_delay_microseconds)
    config.instance_group.add(count=int(instance_count), kind=instance_kind)
    if num_versions is None:
        config.version_policy.all.SetInParent()
    else:
        config.version_policy.latest.num_versions = int(num_versions)
    return config


def merge_published(existing: ModelConfig, fresh: ModelConfig) -> ModelConfig:
    """``existing`` with the model-derived fields of ``fresh``: name, ``max_batch_size``, the
    platform (unless ``existing`` names a platform or backend) and each tensor's ``data_type`` and
    ``dims`` (the tensor list follows ``fresh``; other fields of a tensor with the same name, such
    as ``reshape`` or ``optional``, are kept). Every other field of ``existing`` is kept."""
    merged = ModelConfig()
    merged.CopyFrom(existing)
    merged.name = fresh.name
    merged.max_batch_size = fresh.max_batch_size
    if not merged.platform and not merged.backend:
        merged.platform = fresh.platform
    for field in ("input", "output"):
        old = {t.name: t for t in getattr(existing, field)}
        target = getattr(merged, field)
        del target[:]
        for tensor in getattr(fresh, field):
            entry = target.add()
            if tensor.name in old:
                entry.CopyFrom(old[tensor.name])
            entry.name = tensor.name
            entry.data_type = tensor.data_type
            del entry.dims[:]
            entry.dims.extend(tensor.dims)
    return merged


def version_policy(config: ModelConfig) -> dict[str, Any]:
    """The config's ``version_policy`` as a dict: ``{}`` (unset: Triton serves the newest),
    ``{"latest": {"num_versions": k}}``, ``{"all": {}}`` or ``{"specific": {"versions": [..]}}``
    (version numbers as ints)."""
    policy = json_format.MessageToDict(config.version_policy, preserving_proto_field_name=True)
    if "specific" in policy:
        policy["specific"]["versions"] = [int(v) for v in policy["specific"].get("versions", [])]
    return policy


def check_onnx_model(config: ModelConfig, source: str) -> None:
    """Refuse a config for another backend: fedserve serves ONNX models with onnxruntime."""
    if config.platform not in ("", ONNX_PLATFORM) or config.backend not in ("", ONNX_BACKEND):
        given = config.platform or config.backend
        raise RepositoryError(
            f"{source} is for {given!r}; fedserve serves ONNX models only "
            f"(platform {ONNX_PLATFORM!r} or backend {ONNX_BACKEND!r})"
        )


def tensor_specs(config: ModelConfig, source: str) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """(inputs, outputs) declared by ``config``, shapes with the batch dim (-1) when batching."""
    batch = [-1] if config.max_batch_size > 0 else []
    specs: dict[str, list[TensorSpec]] = {}
    for field in ("input", "output"):
        specs[field] = []
        for tensor in getattr(config, field):
            if tensor.data_type == DataType.TYPE_INVALID:
                raise RepositoryError(f"{source}: {field} {tensor.name!r} has no data_type")
            try:
                datatype = triton_to_v2(DataType.Name(tensor.data_type))
            except ValueError as exc:
                raise RepositoryError(f"{source}: {field} {tensor.name!r}: {exc}") from None
            specs[field].append(TensorSpec(tensor.name, datatype, [*batch, *tensor.dims]))
    return specs["input"], specs["output"]


def complete_config(
    config: ModelConfig,
    name: str,
    graph_inputs: Sequence[TensorSpec],
    graph_outputs: Sequence[TensorSpec],
) -> ModelConfig:
    """Triton's auto-complete for an ONNX model: a copy of ``config`` with the name and platform
    filled in and, where the config declares no inputs (outputs), the graph's.

    A config that declares neither and leaves ``max_batch_size`` 0 gets
    :data:`AUTO_MAX_BATCH_SIZE` and dynamic batching when every graph tensor has a dynamic first
    dim, as Triton's onnxruntime backend does.
    """
    done = ModelConfig()
    done.CopyFrom(config)
    done.name = done.name or name
    if not done.platform and not done.backend:
        done.platform = ONNX_PLATFORM
    declared_in, declared_out = len(done.input) > 0, len(done.output) > 0
    if not declared_in and not declared_out and done.max_batch_size == 0:
        tensors = [*graph_inputs, *graph_outputs]
        if tensors and all(s.shape and s.shape[0] == -1 for s in tensors):
            done.max_batch_size = AUTO_MAX_BATCH_SIZE
            if not done.HasField("sequence_batching"):
                done.dynamic_batching.SetInParent()
    try:
        _set_tensors(
            done,
            [] if declared_in else graph_inputs,
            [] if declared_out else graph_outputs,
        )
    except ValueError as exc:
        raise RepositoryError(f"model {name!r}: cannot complete its config: {exc}") from None
    return done


def _set_tensors(
    config: ModelConfig, inputs: Iterable[TensorSpec], outputs: Iterable[TensorSpec]
) -> None:
    for field, specs in (("input", inputs), ("output", outputs)):
        for spec in specs:
            getattr(config, field).add(
                name=spec.name,
                data_type=DataType.Value(v2_to_triton(spec.datatype)),
                dims=triton_dims(spec.shape, config.max_batch_size),
            )
