"""Shared fixtures."""

from __future__ import annotations

import os
from collections.abc import Iterator

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
