"""The read side of the model repository: paths, listing, metadata, best version, verification.

Reading needs no lock: a version directory appears by one atomic rename of a complete directory
and disappears by one rename away (see :mod:`serving.repository`), so a listing never includes a
half-written version. :class:`serving.repository.ModelRepository` adds the writers to this class.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import onnx

from serving.errors import RepositoryError
from serving.fsutil import sha256_file
from serving.layout import (
    CONFIG_FILE,
    METADATA_FILE,
    MODEL_FILE,
    VERSION_RE,
    is_finite_number,
    is_model_dir_name,
    validate_model_name,
    validate_version,
)
from serving.model_config import read_config
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
        """Models that have a ``config.pbtxt`` or at least one complete version."""
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
        """Complete versions, ascending: integer dirs holding model.onnx and metadata.json."""
        mdir = self.model_dir(model)
        if not mdir.is_dir():
            return []
        versions = []
        for entry in mdir.iterdir():
            if (
                VERSION_RE.match(entry.name)
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
            if not is_finite_number(value):
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
