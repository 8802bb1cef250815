"""A version to publish: the ONNX file checked, its files and metadata written into a directory.

Both writers (:class:`serving.repository.ModelRepository` on a local directory and
:class:`serving.store_repository.StoreRepository` on an object store) validate with
:func:`prepare_version` before they touch the repository, write the version's files with
:func:`write_version` into a private directory, and compute the model's next ``config.pbtxt``
with :func:`updated_config`; only how the directory becomes visible differs.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Required, TypedDict, Unpack

import onnx
from tritonclient.grpc.model_config_pb2 import ModelConfig

from serving.errors import RepositoryError
from serving.fsutil import copy_hash_fsync, fsync_dir, sha256_file, write_fsync
from serving.layout import DATA_FILE, METADATA_FILE, MODEL_FILE, jsonable, validate_model_name
from serving.model_config import merge_published, new_config, parse_config, render_config
from serving.onnx_external import external_locations, relocate_external
from serving.onnx_specs import check_specs, specs_from_onnx
from serving.tensor_spec import TensorSpec


class PublishOptions(TypedDict, total=False):
    """What both repository kinds' ``publish`` take besides the model name and the ONNX file.

    ``inputs``/``outputs`` default to the graph's own; given, they must agree with it.
    ``external_data`` is the file the graph's external tensors refer to; it is stored as
    ``model.onnx.data`` (the graph's references are rewritten if named otherwise).
    ``metadata``: see :func:`write_version`. ``num_versions`` (default 1; None = all versions:
    Triton's version policy), ``instance_count`` (1) and ``max_queue_delay_microseconds`` (100)
    only shape the ``config.pbtxt`` of a new model.
    """

    inputs: Sequence[TensorSpec] | None
    outputs: Sequence[TensorSpec] | None
    metadata: dict[str, Any] | None
    max_batch_size: Required[int]
    external_data: str | os.PathLike | None
    num_versions: int | None
    instance_count: int
    max_queue_delay_microseconds: int


@dataclass
class PreparedVersion:
    """A checked ONNX file and everything its version's files are made of."""

    name: str
    source: Path
    proto: onnx.ModelProto  # without external data
    external_data: Path | None
    relocate: bool  # the graph's external tensors must be pointed at model.onnx.data
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    metadata: dict[str, Any]
    max_batch_size: int
    config: ModelConfig  # the config.pbtxt of a model published for the first time


def prepare_version(
    model_name: str, onnx_path: str | os.PathLike, **options: Unpack[PublishOptions]
) -> PreparedVersion:
    """Check what a repository's ``publish`` was given; RepositoryError names the problem
    (TypeError for an option that does not exist, as a misspelt keyword argument would)."""
    unknown = sorted(options.keys() - PublishOptions.__annotations__.keys())
    if unknown:
        raise TypeError(f"publish() got unexpected options {unknown}")
    if "max_batch_size" not in options:
        raise TypeError("publish() is missing the option max_batch_size")
    inputs, outputs = options.get("inputs"), options.get("outputs")
    metadata, external_data = options.get("metadata"), options.get("external_data")
    max_batch_size = options["max_batch_size"]
    name = validate_model_name(model_name)
    src = Path(onnx_path)
    if not src.is_file():
        raise RepositoryError(f"ONNX file to publish not found: {src}")
    data_src = Path(external_data) if external_data is not None else None
    if data_src is not None and not data_src.is_file():
        raise RepositoryError(f"external data file to publish not found: {data_src}")
    try:
        proto = onnx.load(str(src), load_external_data=False)
    except Exception as exc:
        raise RepositoryError(f"{src} is not a readable ONNX model: {exc}") from None
    graph_inputs, graph_outputs = specs_from_onnx(proto)
    inputs = list(graph_inputs if inputs is None else inputs)
    outputs = list(graph_outputs if outputs is None else outputs)
    check_specs("input", inputs, graph_inputs)
    check_specs("output", outputs, graph_outputs)
    locations = external_locations(proto)
    if locations and data_src is None:
        raise RepositoryError(
            f"{src} keeps tensors in external data {sorted(locations)}; pass external_data="
        )
    if data_src is not None and not locations:
        raise RepositoryError(
            f"external_data={str(data_src)!r} given, but {src} has no external tensors"
        )
    if len(locations) > 1:
        raise RepositoryError(
            f"{src} spreads external data over {sorted(locations)}; save all tensors to one "
            "file (onnx.save_model(..., all_tensors_to_one_file=True))"
        )
    try:
        config = new_config(
            name,
            inputs,
            outputs,
            max_batch_size=max_batch_size,
            num_versions=options.get("num_versions", 1),
            instance_count=options.get("instance_count", 1),
            max_queue_delay_microseconds=options.get("max_queue_delay_microseconds", 100),
        )
    except ValueError as exc:
        raise RepositoryError(f"cannot write config.pbtxt for {name!r}: {exc}") from None
    return PreparedVersion(
        name=name,
        source=src,
        proto=proto,
        external_data=data_src,
        relocate=bool(locations) and locations != {DATA_FILE},
        inputs=inputs,
        outputs=outputs,
        metadata=jsonable(dict(metadata or {})),
        max_batch_size=int(max_batch_size),
        config=config,
    )


def write_version(prepared: PreparedVersion, directory: Path, version: int) -> dict[str, str]:
    """Write ``model.onnx`` (+ ``model.onnx.data``) and, last, ``metadata.json`` into the empty
    directory ``directory``, each fsync'ed, then the directory; returns {file: sha256}.

    ``metadata`` supplies ``global_version``, ``round``, ``metrics``, ``config`` and any extra
    keys; ``version``, ``files``, ``inputs``, ``outputs``, ``opset``, ``max_batch_size`` and
    ``created`` are filled in here.
    """
    files: dict[str, str] = {}
    if prepared.relocate:
        proto = onnx.ModelProto()
        proto.CopyFrom(prepared.proto)
        relocate_external(proto, DATA_FILE)
        write_fsync(directory / MODEL_FILE, proto.SerializeToString())
        files[MODEL_FILE] = sha256_file(directory / MODEL_FILE)
    else:
        files[MODEL_FILE] = copy_hash_fsync(prepared.source, directory / MODEL_FILE)
    if prepared.external_data is not None:
        files[DATA_FILE] = copy_hash_fsync(prepared.external_data, directory / DATA_FILE)
    meta = dict(prepared.metadata)
    meta.setdefault("global_version", None)
    meta.setdefault("round", None)
    meta.setdefault("metrics", {})
    meta.setdefault("config", {})
    opset = next(
        (o.version for o in prepared.proto.opset_import if o.domain in ("", "ai.onnx")), None
    )
    meta.update(
        version=version,
        files=files,
        inputs=[s.to_dict() for s in prepared.inputs],
        outputs=[s.to_dict() for s in prepared.outputs],
        opset=opset,
        max_batch_size=prepared.max_batch_size,
        created=datetime.now(UTC).isoformat(timespec="milliseconds"),
    )
    payload = json.dumps(meta, indent=2, sort_keys=True, allow_nan=False).encode()
    write_fsync(directory / METADATA_FILE, payload + b"\n")
    fsync_dir(directory)
    return files


def updated_config(existing: str | None, prepared: PreparedVersion, source: str) -> str | None:
    """The model's next ``config.pbtxt`` text, or None when the file is to stay as it is.

    A new model gets :attr:`PreparedVersion.config`; an existing file keeps every field but the
    model-derived ones (:func:`~serving.model_config.merge_published`), and is left byte for byte
    when those already agree. A file protobuf rejects refuses the publish (RepositoryError).
    """
    if existing is None:
        return render_config(prepared.config)
    current = parse_config(existing, source)
    merged = merge_published(current, prepared.config)
    return None if merged == current else render_config(merged)
