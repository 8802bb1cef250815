"""Run ``fedserve-train`` in a subprocess for end-to-end tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from server.launcher import FLWR_ENV

TRAIN = str(Path(sys.executable).parent / "fedserve-train")


def run_train(args: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    """``fedserve-train *args``; on timeout SIGTERM it first, so it stops its SuperLink tree
    (a SIGKILL, what ``subprocess.run(timeout=...)`` sends, would orphan it)."""
    process = subprocess.Popen(
        [TRAIN, *args],
        cwd=cwd,
        env={**os.environ, **FLWR_ENV},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGTERM)
        try:
            process.communicate(timeout=60)
        finally:
            process.kill()
        raise
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def fedserve_train(run_dir: Path, *overrides: str, timeout: float = 300) -> dict:
    """Train with ``overrides`` into ``run_dir``; return its history.json (raises on failure)."""
    result = run_train([*overrides, f"hydra.run.dir={run_dir}"], run_dir.parent, timeout)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return json.loads((run_dir / "history.json").read_text())


def onnx_weights(path: Path) -> dict[str, np.ndarray]:
    """The initializers of an exported model: the global parameters as published."""
    model = onnx.load(str(path))
    return {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
