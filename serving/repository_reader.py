"""The read side of the model repository: paths, listing, metadata, configs, verification.

Reading needs no lock: a version directory appears by one atomic rename of a complete directory
and disappears by one rename away (see :mod:`serving.repository`), so a listing never includes a
half-written version. :class:`serving.repository.ModelRepository` adds the writers to this class.

Any Triton-layout ONNX repository reads: a version is a directory ``<model>/<n>/`` holding
``model.onnx``. Our ``metadata.json`` beside it adds checksums, metrics and the specs recorded at
publish; a version without it (a repository made by hand, or by another tool) is described by the
model's ``config.pbtxt``, completed from the ONNX graph as Triton's auto-complete does
(:meth:`RepositoryReader.load_metadata` returns that description in the metadata's shape).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import onnx
from tritonclient.grpc.model_config_pb2 import ModelConfig

from serving.errors import RepositoryError
from serving.fsutil import sha256_file
from serving.layout import (
    CONFIG_FILE,
    METADATA_FILE,
    MODEL_FILE,
    VERSION_RE,
    best_version,
    is_model_dir_name,
    validate_model_name,
    validate_version,
)
from serving.model_config import check_onnx_model, complete_config, parse_config, tensor_specs
from serving.onnx_specs import check_specs, specs_from_onnx
from serving.tensor_spec import TensorSpec

log = logging.getLogger(__name__)


class RepositoryReader:
    """Read-only view of a Triton-layout model repository rooted at ``root``."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise RepositoryError(
                f"model repository path {str(self.root)!r} is a file, not a directory; "
                "pass a directory path (it is created if missing)"
            )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.root)!r})"

    # ---- paths

    def model_dir(self, model: str) -> Path:
        return self.root / validate_model_name(model)

    def version_dir(self, model: str, version: int) -> Path:
        return self.model_dir(model) / str(validate_version(version))

    def model_path(self, model: str, version: int) -> Path:
        """Path of ``model.onnx`` of a version (its external data, if any, lies beside it)."""
        return self.version_dir(model, version) / MODEL_FILE

    def config_path(self, model: str) -> Path:
        return self.model_dir(model) / CONFIG_FILE

    # ---- listing and reading

    def list_models(self) -> list[str]:
        """Models that have a ``config.pbtxt`` or at least one version."""
        if not self.root.is_dir():
            return []
        names = []
        for entry in self.root.iterdir():
            if not entry.is_dir() or not is_model_dir_name(entry.name):
                continue
            if (entry / CONFIG_FILE).is_file() or self.list_versions(entry.name):
                names.append(entry.name)
        return sorted(names)

    def list_versions(self, model: str) -> list[int]:
        """Versions, ascending: integer directories holding ``model.onnx``."""
        mdir = self.model_dir(model)
        if not mdir.is_dir():
            return []
        versions = []
        for entry in mdir.iterdir():
            if VERSION_RE.match(entry.name) and (entry / MODEL_FILE).is_file():
                versions.append(int(entry.name))
        return sorted(versions)

    def latest(self, model: str) -> int | None:
        versions = self.list_versions(model)
        return versions[-1] if versions else None

    def has_metadata(self, model: str, version: int) -> bool:
        """True for a version published by fedserve (it has our ``metadata.json``)."""
        return (self.version_dir(model, version) / METADATA_FILE).is_file()

    def load_metadata(self, model: str, version: int) -> dict[str, Any]:
        """The version's ``metadata.json``; for a version without one, the same keys described
        by its completed config (:meth:`version_config`): ``version``, ``max_batch_size``,
        ``inputs``, ``outputs``, empty ``metrics`` and ``files``, and ``"source": "config"``."""
        if not self.has_metadata(model, version):
            if not self.model_path(model, version).is_file():
                raise RepositoryError(
                    f"version {version} of model {model!r} does not exist "
                    f"({self.version_dir(model, version)})"
                )
            config = self.version_config(model, version)
            inputs, outputs = tensor_specs(config, str(self.config_path(model)))
            return {
                "version": version,
                "max_batch_size": config.max_batch_size,
                "inputs": [s.to_dict() for s in inputs],
                "outputs": [s.to_dict() for s in outputs],
                "metrics": {},
                "files": {},
                "source": "config",
            }
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
        """(inputs, outputs) of a version (see :meth:`load_metadata`)."""
        meta = self.load_metadata(model, version)
        return (
            [TensorSpec.from_dict(s) for s in meta.get("inputs", [])],
            [TensorSpec.from_dict(s) for s in meta.get("outputs", [])],
        )

    def read_config(self, model: str) -> ModelConfig:
        """The model's ``config.pbtxt`` as Triton's ModelConfig; an empty one (Triton
        auto-completes it) when the file is missing. RepositoryError for a file protobuf rejects
        or whose ``name`` is not the directory's."""
        path = self.config_path(model)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return ModelConfig()
        except (OSError, UnicodeDecodeError) as exc:
            raise RepositoryError(f"cannot read {path}: {exc}") from None
        config = parse_config(text, str(path))
        if config.name and config.name != model:
            raise RepositoryError(
                f"{path} names the model {config.name!r}, but it lies in directory {model!r}; "
                "Triton requires them to agree: fix the name or the directory"
            )
        return config

    def version_config(self, model: str, version: int) -> ModelConfig:
        """The model's config completed for ``version``: name and platform filled in, and the
        inputs/outputs the file omits taken from the version's metadata or ONNX graph."""
        config = self.read_config(model)
        check_onnx_model(config, str(self.config_path(model)))
        if self.has_metadata(model, version):
            inputs, outputs = self.tensor_specs(model, version)
            if not config.input and not config.output and config.max_batch_size == 0:
                config.max_batch_size = int(self.load_metadata(model, version)["max_batch_size"])
        else:
            inputs, outputs = self._graph_specs(model, version)
        return complete_config(config, model, inputs, outputs)

    def best(self, model: str, metric: str, mode: str = "max") -> int | None:
        """The version whose ``metadata["metrics"][metric]`` is highest (``mode="max"``) or lowest
        (``"min"``); ties go to the newest. Versions without a finite value are skipped."""
        values = (
            (version, self._metric(model, version, metric))
            for version in self.list_versions(model)
            if self.has_metadata(model, version)  # no metrics without
        )
        return best_version(values, mode)

    def _metric(self, model: str, version: int, metric: str) -> Any:
        try:
            return (self.load_metadata(model, version).get("metrics") or {}).get(metric)
        except RepositoryError as exc:
            log.warning("skipping version %s of %s in best(): %s", version, model, exc)
            return None

    def verify(self, model: str, version: int) -> None:
        """Check a version before it is served: with our metadata, its files exist and their
        sha256 match; without, the config's tensor specs fit the ONNX graph; always, onnx's
        checker passes. Raises RepositoryError naming the file, tensor or both hashes."""
        vdir = self.version_dir(model, version)
        if not (vdir / MODEL_FILE).is_file():
            raise RepositoryError(
                f"version {version} of model {model!r} has no {MODEL_FILE} ({vdir})"
            )
        if self.has_metadata(model, version):
            self._verify_checksums(model, version)
        else:
            inputs, outputs = self.tensor_specs(model, version)
            graph_inputs, graph_outputs = self._graph_specs(model, version)
            where = f"{self.config_path(model)} (version {version})"
            try:
                check_specs("input", inputs, graph_inputs)
                check_specs("output", outputs, graph_outputs)
            except RepositoryError as exc:
                raise RepositoryError(
                    f"{where} does not describe {vdir / MODEL_FILE}: {exc} (fedserve feeds "
                    "requests to the graph as they are: a config 'reshape' is not applied)"
                ) from None
        try:
            onnx.checker.check_model(str(vdir / MODEL_FILE))
        except Exception as exc:  # onnx raises ValidationError and plain C++ exceptions
            raise RepositoryError(
                f"onnx checker rejects version {version} of model {model!r}: {exc}"
            ) from None

    def _verify_checksums(self, model: str, version: int) -> None:
        vdir = self.version_dir(model, version)
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

    def _graph_specs(self, model: str, version: int) -> tuple[list[TensorSpec], list[TensorSpec]]:
        path = self.model_path(model, version)
        try:
            return specs_from_onnx(path)
        except RepositoryError:
            raise
        except Exception as exc:  # onnx raises DecodeError, OSError, ...
            raise RepositoryError(f"{path} is not a readable ONNX model: {exc}") from None
