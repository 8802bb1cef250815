"""Shared fixtures."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")


@pytest.fixture
def flower_task_identity() -> Iterator[None]:
    """Flower 1.42 stamps run/node ids on every Message it builds; set them outside a runtime."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 11, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


@pytest.fixture
def process_marker(monkeypatch: pytest.MonkeyPatch) -> str:
    """A marker every process this test starts inherits (see :mod:`process_marker`)."""
    from process_marker import VARIABLE, new_marker

    from server.processes import marker_env

    marker = new_marker()
    for name, value in marker_env(marker, VARIABLE).items():
        monkeypatch.setenv(name, value)
    return marker


@pytest.fixture
def make_pool(tmp_path: Path) -> Iterator:
    """``make(version, seed, max_batch_size=64)``: an engine pool (one CPU engine, nothing run
    inline) of the test classifier ``clf`` (serving_helpers), closed after the test."""
    from serving_helpers import CLASSES, IN_FEATURES, make_classifier

    from serving.pool import EnginePool
    from serving.settings import ServingConfig
    from serving.signature import ModelSignature
    from serving.tensor_spec import TensorSpec

    pools: list[EnginePool] = []

    def make(version: int, seed: int, max_batch_size: int = 64) -> EnginePool:
        path = make_classifier(tmp_path / f"clf-{version}.onnx", seed=seed)
        settings = ServingConfig(instances=1, providers="cpu", inline_max_ms=0)
        signature = ModelSignature.build(
            [TensorSpec("x", "FP32", (-1, IN_FEATURES))],
            [TensorSpec("logits", "FP32", (-1, CLASSES))],
            max_batch_size,
        )
        pool = EnginePool("clf", version, path, signature, settings)
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        pool.close(5)
