"""A versioned ONNX model repository in NVIDIA Triton's layout.

Layout (Triton loads it unchanged; the dot-names are ignored by Triton)::

    <root>/<model>/config.pbtxt                 Triton ModelConfig (protobuf text format)
    <root>/<model>/<version>/model.onnx         version = 1, 2, 3, ... (never reused)
    <root>/<model>/<version>/model.onnx.data    only for models saved with ONNX external data
    <root>/<model>/<version>/metadata.json      ours: version, round, metrics, sha256 of files, ...
    <root>/<model>/.fedserve_state.json         highest version ever published
    <root>/<model>/.in_use/<version>.<pid>.<id> a reader's lease on a version
    <root>/<model>/.lock                        flock(2) serialising writers of this model
    <root>/<model>/.tmp-<pid>-<id>              a version being written, or being deleted

Guarantees:

* **Atomic publish.** A version is written completely into a ``.tmp-*`` directory inside the
  model directory, every file and the directory are fsync'ed, and it appears by one
  ``rename(2)`` to ``<version>`` (then the parent is fsync'ed). A reader never sees half of a
  version. A crash before the rename leaves only the ``.tmp-*`` directory; the next publish (which
  holds the model's lock, so no live writer can own it) deletes it.
* **Versions only grow.** The next version is ``max(existing, highest ever recorded) + 1``;
  retention deleting the newest-ever version does not let its number be reused.
* **Leases.** :meth:`ModelRepository.mark_in_use` records a lease file; retention never deletes a
  version with a live lease. Leases of dead processes (same host) are ignored and cleaned.
* **Failures change nothing already published.** Bad names, bad files, a checksum mismatch or a
  crash mid-publish leave existing versions and their files intact.

This module needs only the standard library, numpy and onnx (no torch, no flwr).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from serving.errors import RepositoryError
from serving.model_config import (
    NUMPY_TO_V2,
    ONNX_TO_V2,
    V2_DATATYPES,
    V2_TO_NUMPY,
    V2_TO_ONNX,
    onnx_to_v2,
    read_config,
    render_config,
    triton_to_v2,
    v2_to_triton,
)

__all__ = [
    "CONFIG_FILE",
    "DATA_FILE",
    "METADATA_FILE",
    "MODEL_FILE",
    "MODEL_NAME_PATTERN",
    "NUMPY_TO_V2",
    "ONNX_TO_V2",
    "V2_DATATYPES",
    "V2_TO_NUMPY",
    "V2_TO_ONNX",
    "ModelRepository",
    "RepositoryError",
    "TensorSpec",
    "onnx_to_v2",
    "specs_from_onnx",
    "triton_to_v2",
    "v2_to_triton",
    "validate_model_name",
]

log = logging.getLogger(__name__)

MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
_MODEL_NAME_RE = re.compile(MODEL_NAME_PATTERN)
_VERSION_RE = re.compile(r"^[1-9][0-9]*$")  # Triton ignores version dirs starting with 0
_TMP_RE = re.compile(r"^\.tmp-(\d+)-")

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
METADATA_FILE = "metadata.json"
CONFIG_FILE = "config.pbtxt"
STATE_FILE = ".fedserve_state.json"
LOCK_FILE = ".lock"
LEASE_DIR = ".in_use"
TMP_PREFIX = ".tmp-"

_CHUNK = 1 << 20


# ---------------------------------------------------------------- tensor specs


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


def _check_specs(kind: str, given: Sequence[TensorSpec], graph: Sequence[TensorSpec]) -> None:
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


# ---------------------------------------------------------------- validation helpers


def validate_model_name(name: Any) -> str:
    """Return ``name`` if it is a safe model directory name, else raise RepositoryError."""
    if not isinstance(name, str) or not _MODEL_NAME_RE.match(name) or ".." in name:
        raise RepositoryError(
            f"invalid model name {name!r}: it must match {MODEL_NAME_PATTERN} (1-64 characters: "
            "letters, digits, '_', '.', '-', starting with a letter or digit; no '/', spaces) "
            "and must not contain '..'"
        )
    return name


def _validate_version(version: Any) -> int:
    if isinstance(version, bool) or not isinstance(version, (int, np.integer)) or version < 1:
        raise RepositoryError(f"version must be an integer >= 1, got {version!r}")
    return int(version)


def _jsonable(value: Any) -> Any:
    """Plain JSON values: numpy scalars/arrays unwrapped, non-finite floats -> None, Path -> str."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        return _jsonable(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise RepositoryError(
        f"metadata value {value!r} of type {type(value).__name__} is not JSON-serialisable; "
        "pass numbers, strings, lists and dicts"
    )


def _is_finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ---------------------------------------------------------------- file system helpers


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _copy_hash_fsync(src: Path, dst: Path) -> str:
    """Copy ``src`` to a new file ``dst`` in one pass, returning its sha256; fsync ``dst``."""
    digest = hashlib.sha256()
    with open(src, "rb") as fin, open(dst, "xb") as fout:
        while chunk := fin.read(_CHUNK):
            digest.update(chunk)
            fout.write(chunk)
        fout.flush()
        os.fsync(fout.fileno())
    return digest.hexdigest()


def _write_fsync(path: Path, data: bytes) -> None:
    with open(path, "xb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``path`` by temp file + fsync + rename + fsync(dir): old or new, never half."""
    tmp = path.parent / f"{TMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex}-{path.name}"
    try:
        _write_fsync(tmp, data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


def _rename_into_place(src: Path, dst: Path) -> None:
    """The commit point of a publish (a separate function so a crash test can stop here)."""
    os.rename(src, dst)


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _all_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _all_tensors(attr.g)
            for sub in attr.graphs:
                yield from _all_tensors(sub)


def _external_locations(model: onnx.ModelProto) -> set[str]:
    locations = set()
    for tensor in _all_tensors(model.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            for entry in tensor.external_data:
                if entry.key == "location":
                    locations.add(entry.value)
    return locations


def _relocate_external(model: onnx.ModelProto, location: str) -> None:
    for tensor in _all_tensors(model.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = location


# ---------------------------------------------------------------- the repository


class ModelRepository:
    """A Triton-layout model repository rooted at ``root`` (created on first publish).

    Writers (``publish``, ``apply_retention``) of one model are serialised by ``flock`` on
    ``<model>/.lock``; readers need no lock, except ``mark_in_use`` which takes it briefly so a
    lease can never race a deletion.
    """

    def __init__(self, root: str | os.PathLike, *, stale_tmp_seconds: float = 3600.0) -> None:
        self.root = Path(root)
        self.stale_tmp_seconds = stale_tmp_seconds
        if self.root.exists() and not self.root.is_dir():
            raise RepositoryError(
                f"model repository path {str(self.root)!r} is a file, not a directory; "
                "pass a directory path (it is created if missing)"
            )

    def __repr__(self) -> str:
        return f"ModelRepository({str(self.root)!r})"

    # ---- paths

    def model_dir(self, model: str) -> Path:
        return self.root / validate_model_name(model)

    def version_dir(self, model: str, version: int) -> Path:
        return self.model_dir(model) / str(_validate_version(version))

    def model_path(self, model: str, version: int) -> Path:
        """Path of ``model.onnx`` of a version (its external data, if any, lies beside it)."""
        return self.version_dir(model, version) / MODEL_FILE

    def config_path(self, model: str) -> Path:
        return self.model_dir(model) / CONFIG_FILE

    # ---- listing and reading

    def list_models(self) -> list[str]:
        """Models that have a ``config.pbtxt`` or at least one complete version."""
        if not self.root.is_dir():
            return []
        names = []
        for entry in self.root.iterdir():
            if not entry.is_dir() or not _MODEL_NAME_RE.match(entry.name) or ".." in entry.name:
                continue
            if (entry / CONFIG_FILE).is_file() or self.list_versions(entry.name):
                names.append(entry.name)
        return sorted(names)

    def list_versions(self, model: str) -> list[int]:
        """Complete versions, ascending: integer dirs holding model.onnx and metadata.json."""
        mdir = self.model_dir(model)
        if not mdir.is_dir():
            return []
        versions = []
        for entry in mdir.iterdir():
            if (
                _VERSION_RE.match(entry.name)
                and entry.is_dir()
                and (entry / MODEL_FILE).is_file()
                and (entry / METADATA_FILE).is_file()
            ):
                versions.append(int(entry.name))
        return sorted(versions)

    def latest(self, model: str) -> int | None:
        versions = self.list_versions(model)
        return versions[-1] if versions else None

    def load_metadata(self, model: str, version: int) -> dict[str, Any]:
        path = self.version_dir(model, version) / METADATA_FILE
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        except FileNotFoundError:
            raise RepositoryError(
                f"version {version} of model {model!r} has no {METADATA_FILE} at {path}"
            ) from None
        except (OSError, json.JSONDecodeError) as exc:
            raise RepositoryError(f"cannot read {path}: {exc}") from None
        if not isinstance(data, dict):
            raise RepositoryError(f"{path} must hold a JSON object, got {type(data).__name__}")
        return data

    def tensor_specs(self, model: str, version: int) -> tuple[list[TensorSpec], list[TensorSpec]]:
        """(inputs, outputs) recorded in a version's metadata."""
        meta = self.load_metadata(model, version)
        return (
            [TensorSpec.from_dict(s) for s in meta.get("inputs", [])],
            [TensorSpec.from_dict(s) for s in meta.get("outputs", [])],
        )

    def read_config(self, model: str) -> dict[str, Any]:
        """The model's ``config.pbtxt`` parsed into a dict (see :func:`read_config`)."""
        path = self.config_path(model)
        try:
            return read_config(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise RepositoryError(f"model {model!r} has no {CONFIG_FILE} at {path}") from None

    def best(self, model: str, metric: str, mode: str = "max") -> int | None:
        """The version whose ``metadata["metrics"][metric]`` is highest (``mode="max"``) or lowest
        (``"min"``); ties go to the newest. Versions without a finite value are skipped."""
        if mode not in ("max", "min"):
            raise RepositoryError(f"mode must be 'max' or 'min', got {mode!r}")
        best_version, best_value = None, None
        for version in self.list_versions(model):
            try:
                value = (self.load_metadata(model, version).get("metrics") or {}).get(metric)
            except RepositoryError as exc:
                log.warning("skipping version %s of %s in best(): %s", version, model, exc)
                continue
            if not _is_finite_number(value):
                continue
            better = (
                best_value is None
                or (mode == "max" and value >= best_value)
                or (mode == "min" and value <= best_value)
            )
            if better:
                best_version, best_value = version, value
        return best_version

    def verify(self, model: str, version: int) -> None:
        """Check a version: its files exist, their sha256 match metadata, onnx's checker passes.

        Raises RepositoryError naming the file and both hashes on a mismatch.
        """
        vdir = self.version_dir(model, version)
        if not vdir.is_dir():
            raise RepositoryError(f"version {version} of model {model!r} does not exist ({vdir})")
        meta = self.load_metadata(model, version)
        if meta.get("version") != version:
            raise RepositoryError(
                f"{vdir / METADATA_FILE} records version {meta.get('version')!r}, "
                f"but lies in directory {version}"
            )
        files = meta.get("files")
        if not isinstance(files, dict) or MODEL_FILE not in files:
            raise RepositoryError(
                f"{vdir / METADATA_FILE} must list the sha256 of {MODEL_FILE} under 'files'"
            )
        for rel, expected in files.items():
            rel_path = Path(rel)
            if rel_path.is_absolute() or ".." in rel_path.parts:
                raise RepositoryError(f"metadata of version {version} names an unsafe path {rel!r}")
            path = vdir / rel_path
            if not path.is_file():
                raise RepositoryError(
                    f"version {version} of model {model!r} is missing {rel} ({path})"
                )
            actual = sha256_file(path)
            if actual != expected:
                raise RepositoryError(
                    f"checksum mismatch for {path}: expected sha256 {expected}, got {actual}"
                )
        try:
            onnx.checker.check_model(str(vdir / MODEL_FILE))
        except Exception as exc:  # onnx raises ValidationError and plain C++ exceptions
            raise RepositoryError(
                f"onnx checker rejects version {version} of model {model!r}: {exc}"
            ) from None

    # ---- writing

    def publish(
        self,
        model_name: str,
        onnx_path: str | os.PathLike,
        *,
        inputs: Sequence[TensorSpec] | None = None,
        outputs: Sequence[TensorSpec] | None = None,
        metadata: dict[str, Any] | None = None,
        max_batch_size: int,
        external_data: str | os.PathLike | None = None,
        num_versions: int | None = 1,
        instance_count: int = 1,
        max_queue_delay_microseconds: int = 100,
    ) -> int:
        """Publish an ONNX file as the next version of ``model_name``; return the version.

        ``inputs``/``outputs`` default to the graph's own; given, they must agree with it.
        ``external_data`` is the file the graph's external tensors refer to; it is stored as
        ``model.onnx.data`` (the graph's references are rewritten if named otherwise).
        ``metadata`` supplies ``global_version``, ``round``, ``metrics``, ``config`` and any
        extra keys; ``version``, ``files``, ``inputs``, ``outputs``, ``opset``,
        ``max_batch_size`` and ``created`` are filled in here. ``config.pbtxt`` is (re)written
        with ``num_versions`` (None = all versions) for Triton's version policy.
        """
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
        _check_specs("input", inputs, graph_inputs)
        _check_specs("output", outputs, graph_outputs)
        locations = _external_locations(proto)
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
            config_text = render_config(
                name,
                inputs,
                outputs,
                max_batch_size=max_batch_size,
                num_versions=num_versions,
                instance_count=instance_count,
                max_queue_delay_microseconds=max_queue_delay_microseconds,
            )
        except ValueError as exc:
            raise RepositoryError(f"cannot write config.pbtxt for {name!r}: {exc}") from None
        meta = _jsonable(dict(metadata or {}))
        opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)

        self._ensure_root()
        mdir = self.root / name
        if mdir.exists() and not mdir.is_dir():
            raise RepositoryError(
                f"{mdir} exists and is not a directory; remove it or pick another model name"
            )
        mdir.mkdir(exist_ok=True)
        with self._lock(name):
            self._clean_tmp(mdir)
            version = self._next_version(name)
            tmp = mdir / f"{TMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex}"
            tmp.mkdir()
            try:
                files: dict[str, str] = {}
                if locations and locations != {DATA_FILE}:
                    _relocate_external(proto, DATA_FILE)
                    _write_fsync(tmp / MODEL_FILE, proto.SerializeToString())
                    files[MODEL_FILE] = sha256_file(tmp / MODEL_FILE)
                else:
                    files[MODEL_FILE] = _copy_hash_fsync(src, tmp / MODEL_FILE)
                if data_src is not None:
                    files[DATA_FILE] = _copy_hash_fsync(data_src, tmp / DATA_FILE)
                meta.setdefault("global_version", None)
                meta.setdefault("round", None)
                meta.setdefault("metrics", {})
                meta.setdefault("config", {})
                meta.update(
                    version=version,
                    files=files,
                    inputs=[s.to_dict() for s in inputs],
                    outputs=[s.to_dict() for s in outputs],
                    opset=opset,
                    max_batch_size=int(max_batch_size),
                    created=datetime.now(UTC).isoformat(timespec="milliseconds"),
                )
                payload = json.dumps(meta, indent=2, sort_keys=True, allow_nan=False).encode()
                _write_fsync(tmp / METADATA_FILE, payload + b"\n")
                _fsync_dir(tmp)
                _atomic_write(mdir / CONFIG_FILE, config_text.encode())
                _rename_into_place(tmp, mdir / str(version))
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            _fsync_dir(mdir)
            self._write_state(mdir, version)
        log.info("published %s version %d (%s)", name, version, ", ".join(sorted(files)))
        return version

    def mark_in_use(self, model: str, version: int) -> str:
        """Lease a version so retention keeps it; returns the lease id for :meth:`release`."""
        mdir = self.model_dir(model)
        version = _validate_version(version)
        if not mdir.is_dir():
            raise RepositoryError(f"model {model!r} does not exist in {self.root}")
        with self._lock(model):
            if version not in self.list_versions(model):
                raise RepositoryError(f"version {version} of model {model!r} does not exist")
            lease_dir = mdir / LEASE_DIR
            lease_dir.mkdir(exist_ok=True)
            lease = f"{version}.{os.getpid()}.{uuid.uuid4().hex}"
            info = {"pid": os.getpid(), "host": socket.gethostname(), "created": time.time()}
            _write_fsync(lease_dir / lease, json.dumps(info).encode())
        return lease

    def release(self, model: str, version: int, lease: str | None = None) -> None:
        """Drop one lease (``lease``) or every lease this process holds on ``version``."""
        version = _validate_version(version)
        lease_dir = self.model_dir(model) / LEASE_DIR
        if lease is not None:
            if not lease.startswith(f"{version}.") or "/" in lease or lease.startswith("."):
                raise RepositoryError(f"lease {lease!r} is not a lease on version {version}")
            targets = [lease_dir / lease]
        else:
            targets = (
                list(lease_dir.glob(f"{version}.{os.getpid()}.*")) if lease_dir.is_dir() else []
            )
        for path in targets:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    @contextlib.contextmanager
    def in_use(self, model: str, version: int) -> Iterator[str]:
        """``with repo.in_use(model, v):`` leases ``v`` for the block."""
        lease = self.mark_in_use(model, version)
        try:
            yield lease
        finally:
            self.release(model, version, lease)

    def leased_versions(self, model: str) -> set[int]:
        """Versions with at least one live lease."""
        return {v for v, _ in self._leases(model, drop_dead=False)}

    def apply_retention(
        self,
        model: str,
        keep_last: int,
        keep_best_metric: str | None = None,
        *,
        mode: str = "max",
    ) -> list[int]:
        """Delete versions except the newest ``keep_last``, the best by ``keep_best_metric``
        (``mode`` max/min) and every leased one; return the deleted versions.

        Each deleted version is first renamed to a ``.tmp-*`` dir (so it vanishes atomically
        for readers), then removed.
        """
        if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1:
            raise RepositoryError(f"keep_last must be an integer >= 1, got {keep_last!r}")
        mdir = self.model_dir(model)
        if not mdir.is_dir():
            return []
        removed: list[int] = []
        with self._lock(model):
            versions = self.list_versions(model)
            keep = set(versions[-keep_last:])
            if keep_best_metric is not None:
                best = self.best(model, keep_best_metric, mode)
                if best is not None:
                    keep.add(best)
            keep |= {v for v, _ in self._leases(model, drop_dead=True)}
            for version in versions:
                if version in keep:
                    continue
                trash = mdir / f"{TMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex}"
                os.rename(mdir / str(version), trash)
                _fsync_dir(mdir)
                shutil.rmtree(trash, ignore_errors=True)
                removed.append(version)
        if removed:
            log.info("retention removed %s versions %s", model, removed)
        return removed

    # ---- internals

    def _ensure_root(self) -> None:
        if self.root.exists() and not self.root.is_dir():
            raise RepositoryError(
                f"model repository path {str(self.root)!r} is a file, not a directory"
            )
        self.root.mkdir(parents=True, exist_ok=True)

    @contextlib.contextmanager
    def _lock(self, model: str) -> Iterator[None]:
        fd = os.open(self.model_dir(model) / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _read_state(self, mdir: Path) -> dict[str, Any]:
        try:
            return json.loads((mdir / STATE_FILE).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable %s: %s", mdir / STATE_FILE, exc)
            return {}

    def _write_state(self, mdir: Path, version: int) -> None:
        state = self._read_state(mdir)
        state["max_version"] = max(int(state.get("max_version", 0)), version)
        _atomic_write(mdir / STATE_FILE, json.dumps(state).encode())

    def _next_version(self, model: str) -> int:
        mdir = self.model_dir(model)
        numbers = [int(e.name) for e in mdir.iterdir() if _VERSION_RE.match(e.name)]
        recorded = self._read_state(mdir).get("max_version", 0)
        recorded = recorded if isinstance(recorded, int) else 0
        return max([0, recorded, *numbers]) + 1

    def _clean_tmp(self, mdir: Path) -> None:
        """Remove leftovers of crashed publishes/deletions. Called with the model's lock held,
        so no live writer owns a temp entry; the pid/age checks are a second safety net."""
        now = time.time()
        for entry in mdir.iterdir():
            match = _TMP_RE.match(entry.name)
            if not match:
                continue
            pid = int(match.group(1))
            try:
                age = now - entry.lstat().st_mtime
            except FileNotFoundError:
                continue
            if pid == os.getpid() or not _pid_alive(pid) or age > self.stale_tmp_seconds:
                log.info("removing leftover %s", entry)
                _remove_path(entry)

    def _leases(self, model: str, *, drop_dead: bool) -> list[tuple[int, str]]:
        lease_dir = self.model_dir(model) / LEASE_DIR
        if not lease_dir.is_dir():
            return []
        host = socket.gethostname()
        live = []
        for entry in lease_dir.iterdir():
            parts = entry.name.split(".")
            if len(parts) != 3 or not parts[0].isdigit() or not parts[1].isdigit():
                continue
            try:
                info = json.loads(entry.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                info = {"pid": int(parts[1]), "host": host}
            dead = info.get("host") == host and not _pid_alive(int(info.get("pid", parts[1])))
            if dead:
                if drop_dead:
                    with contextlib.suppress(FileNotFoundError):
                        entry.unlink()
                continue
            live.append((int(parts[0]), entry.name))
        return live
