"""Atomic checkpoints of the server state.

``save_checkpoint`` writes with ``torch.save`` (plain pickle protocol underneath, so numpy arrays
and the numpy ``bit_generator.state`` dict round-trip bit-exactly) to a temporary file in the
target's directory, fsyncs it, ``os.replace``-s it over the target and fsyncs the directory: a
reader (or a crash) sees the old checkpoint or the new one, never half of one.
``load_checkpoint`` is ``torch.load(path, weights_only=False)``: only load checkpoints you wrote.

A training checkpoint (``<output_dir>/checkpoint.pt``) is a version's server state
(:meth:`server.strategy.state.ServerState.state_dict`: ``format``, ``arrays`` (name → ndarray),
``optimizer``, ``version``, ``round``, ``sampler`` / ``eval_sampler`` (RNG states), ``counters``,
``strategy``, ``seed``, ``average``) plus the run's ``history``
(:meth:`server.history.History.to_dict`) and ``config`` (``ExperimentConfig.to_dict()``), written
by :mod:`server.version_sink`.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_NAME = "checkpoint.pt"


def save_checkpoint(path: str | os.PathLike[str], state: dict[str, Any]) -> Path:
    """Write ``state`` to ``path`` atomically; returns the path."""
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
    """The saved state, or None when ``path`` does not exist."""
    target = Path(path)
    if not target.exists():
        return None
    state = torch.load(target, weights_only=False, map_location="cpu")
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {target} holds a {type(state).__name__}, expected a dict")
    return state


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
