"""The model repository's on-disk names, and the checks on what may go into them.

File and directory names follow Triton's layout (see :mod:`serving.repository`); the dot-names
are ours and ignored by Triton. Everything here is pure: no file is touched.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable
from typing import Any

import numpy as np

from serving.errors import RepositoryError

MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
MODEL_NAME_RE = re.compile(MODEL_NAME_PATTERN)
#: version directories: Triton ignores those whose name starts with 0 (``\Z``: ``$`` would
#: also match before a trailing newline, and int("1\n") is 1)
VERSION_RE = re.compile(r"^[1-9][0-9]*\Z")
#: temp entries ``.tmp-<pid>-<id>[-<name>]``; group 1 is the writer's pid
TMP_RE = re.compile(r"^\.tmp-(\d+)-")

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
METADATA_FILE = "metadata.json"
CONFIG_FILE = "config.pbtxt"
STATE_FILE = ".fedserve_state.json"
LOCK_FILE = ".lock"
#: where leases lived before they moved to the root (Triton took it for a version directory)
LEGACY_LEASE_DIR = ".in_use"
TMP_PREFIX = ".tmp-"


def is_model_dir_name(name: str) -> bool:
    """True if ``name`` could be a model directory (the rule of :func:`validate_model_name`)."""
    return bool(MODEL_NAME_RE.fullmatch(name)) and ".." not in name


def validate_model_name(name: Any) -> str:
    """Return ``name`` if it is a safe model directory name, else raise RepositoryError."""
    if not isinstance(name, str) or not MODEL_NAME_RE.fullmatch(name) or ".." in name:
        raise RepositoryError(
            f"invalid model name {name!r}: it must match {MODEL_NAME_PATTERN} (1-64 characters: "
            "letters, digits, '_', '.', '-', starting with a letter or digit; no '/', spaces) "
            "and must not contain '..'"
        )
    return name


def requested_version(version: str | int) -> int | None:
    """The version a request names: an int, or a string of ASCII digits; None for anything
    else. ``int()`` alone also takes ``'1_0'`` (10), ``' 1'``, ``'+1'`` and non-ASCII digits,
    so ``versions/1_0`` was answered by version 10."""
    if isinstance(version, int) and not isinstance(version, bool):
        return version
    if isinstance(version, str) and version.isascii() and version.isdigit():
        try:
            return int(version)
        except ValueError:  # more digits than int() converts: no version has them
            return None
    return None


def validate_version(version: Any) -> int:
    """Return ``version`` as an int if it is an integer >= 1 (not a bool), else raise."""
    if isinstance(version, bool) or not isinstance(version, (int, np.integer)) or version < 1:
        raise RepositoryError(f"version must be an integer >= 1, got {version!r}")
    return int(version)


def jsonable(value: Any) -> Any:
    """Plain JSON values: numpy scalars/arrays unwrapped, non-finite floats -> None, Path -> str.

    Raises RepositoryError naming the value for anything else (objects, sets, bytes, ...).
    """
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, np.generic):
        return jsonable(value.item())
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


def is_finite_number(value: Any) -> bool:
    """True for a finite int or float (bools excluded)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def best_version(values: Iterable[tuple[int, Any]], mode: str) -> int | None:
    """The version whose value is highest (``mode="max"``) or lowest (``"min"``) among
    (version, value) pairs in ascending version order; ties go to the newest, values that are not
    finite numbers are skipped."""
    if mode not in ("max", "min"):
        raise RepositoryError(f"mode must be 'max' or 'min', got {mode!r}")
    best, best_value = None, None
    for version, value in values:
        if not is_finite_number(value):
            continue
        if best_value is None or (value >= best_value if mode == "max" else value <= best_value):
            best, best_value = version, value
    return best
