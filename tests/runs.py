"""Run ``fedserve-train`` in a subprocess for end-to-end tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from server.launcher import FLWR_ENV

TRAIN = str(Path(sys.executable).parent / "fedserve-train")


def fedserve_train(run_dir: Path, *overrides: str, timeout: float = 300) -> dict:
    """Train with ``overrides`` into ``run_dir``; return its history.json (raises on failure)."""
    result = subprocess.run(
        [TRAIN, *overrides, f"hydra.run.dir={run_dir}"],
        cwd=run_dir.parent,
        env={**os.environ, **FLWR_ENV},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return json.loads((run_dir / "history.json").read_text())


def onnx_weights(path: Path) -> dict[str, np.ndarray]:
    """The initializers of an exported model: the global parameters as published."""
    model = onnx.load(str(path))
    return {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
