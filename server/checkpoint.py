"""Atomic checkpoints of the server state.

``save_checkpoint`` writes with ``torch.save`` (plain pickle protocol underneath, so numpy arrays
and the numpy ``bit_generator.state`` dict round-trip bit-exactly) to a temporary file in the
target's directory, fsyncs it, ``os.replace``-s it over the target and fsyncs the directory: a
reader (or a crash) sees the old checkpoint or the new one, never half of one.
``load_checkpoint`` is ``torch.load(path, weights_only=False)``: only load checkpoints you wrote.

Integrity: every checkpoint carries ``sha256``, the digest of its content (:func:`content_digest`:
every key, value, array dtype, shape and byte, in order). ``load_checkpoint`` recomputes it and
refuses, with one line (:class:`CheckpointError`), a file that cannot be read (truncated,
overwritten) or whose content no longer matches (flipped bytes in a weight load without any
error from ``torch.load``). The file stays a plain ``torch.load``-able dict.

A training checkpoint (``<output_dir>/checkpoint.pt``) is a version's server state
(:meth:`server.strategy.state.ServerState.state_dict`: ``format``, ``arrays`` (name → ndarray),
``optimizer``, ``version``, ``round``, ``sampler`` / ``eval_sampler`` (RNG states), ``counters``,
``strategy``, ``seed``, ``average``) plus the run's ``history``
(:meth:`server.history.History.to_dict`) and ``config`` (``ExperimentConfig.to_dict()``), written
by :mod:`server.version_sink`.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINT_NAME = "checkpoint.pt"
#: the key of a checkpoint's content digest
CHECKSUM_KEY = "sha256"


class CheckpointError(ValueError):
    """A checkpoint cannot be used: unreadable, or its content does not match its checksum."""


def content_digest(state: Any) -> str:
    """SHA-256 over ``state``: dicts (keys in order), lists, tuples, numpy arrays and tensors
    (dtype, shape, bytes), numbers, strings, None; another type is a TypeError."""
    digest = hashlib.sha256()
    _feed(digest, state)
    return digest.hexdigest()


def _feed(digest: Any, value: Any) -> None:
    if isinstance(value, dict):
        digest.update(b"{%d" % len(value))
        for key, item in value.items():
            _feed(digest, key)
            _feed(digest, item)
    elif isinstance(value, list | tuple):
        digest.update(b"[%d" % len(value) if isinstance(value, list) else b"(%d" % len(value))
        for item in value:
            _feed(digest, item)
    elif isinstance(value, torch.Tensor):
        _feed(digest, value.detach().cpu().numpy())
    elif isinstance(value, np.ndarray):
        if value.dtype.hasobject:
            raise TypeError("cannot checksum an object array")
        digest.update(f"a{value.dtype.str}{value.shape}".encode())
        digest.update(memoryview(np.ascontiguousarray(value)).cast("B"))
    elif value is None or isinstance(value, bool | int | float | str | np.generic):
        digest.update(f"{type(value).__name__}:{value!r};".encode())
    else:
        raise TypeError(f"cannot checksum a {type(value).__name__} in a checkpoint")


def save_checkpoint(path: str | os.PathLike[str], state: dict[str, Any]) -> Path:
    """Write ``state`` plus its :data:`CHECKSUM_KEY` to ``path`` atomically; returns the path."""
    state = {**state, CHECKSUM_KEY: content_digest(state)}
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    _fsync_dir(target.parent)
    return target


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The saved state, its checksum verified (and removed), or None when ``path`` does not
    exist; :class:`CheckpointError` when it is damaged."""
    target = Path(path)
    if not target.exists():
        return None
    try:
        state = torch.load(target, weights_only=False, map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - whatever torch/pickle raise, the file is bad
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"checkpoint {target} cannot be read (truncated or not a checkpoint: {first}); "
            "restore it or start without resume=true"
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(
            f"checkpoint {target} holds a {type(state).__name__}, expected a dict"
        )
    saved = state.pop(CHECKSUM_KEY, None)
    if saved is None:
        raise CheckpointError(
            f"checkpoint {target} has no checksum (written by an older fedserve); start "
            "without resume=true"
        )
    try:
        actual = content_digest(state)
    except TypeError as exc:
        raise CheckpointError(f"checkpoint {target} is corrupt: {exc}") from None
    if actual != saved:
        raise CheckpointError(
            f"checkpoint {target} is corrupt: its content does not match its sha256 "
            f"({actual[:12]}... != {str(saved)[:12]}...); restore it or start without "
            "resume=true"
        )
    return state


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
