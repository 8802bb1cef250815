"""Our ``flwr-simulation`` wrapper: every Simulation Engine worker gets a thread of its own."""

from __future__ import annotations

import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from server import simulation_runtime
from server.simulation_runtime import EveryWorkerExecutor, patch_simulation_engine, write_wrapper

# More than ThreadPoolExecutor's default cap, min(32, cpu_count + 4), on any machine.
WORKERS = 40


def _all_started(executor_type: type[ThreadPoolExecutor]) -> bool:
    """Submit WORKERS loops that each wait for all to have started, as the engine's workers do."""
    barrier = threading.Barrier(WORKERS, timeout=5.0)
    with executor_type() as executor:
        futures = [executor.submit(barrier.wait) for _ in range(WORKERS)]
        try:
            for future in futures:
                future.result()
        except threading.BrokenBarrierError:
            barrier.abort()
            return False
    return True


def test_every_worker_runs_at_once() -> None:
    assert _all_started(EveryWorkerExecutor)


def test_flwr_default_executor_would_not() -> None:
    """The limit the wrapper removes: the default pool never starts workers beyond its size."""
    assert not _all_started(ThreadPoolExecutor)


def test_patch_targets_the_simulation_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.server.superlink.fleet.vce import vce_api

    monkeypatch.setattr(vce_api, "ThreadPoolExecutor", ThreadPoolExecutor)
    patch_simulation_engine()
    assert vce_api.ThreadPoolExecutor is EveryWorkerExecutor


def test_wrapper_runs_flwr_simulation(tmp_path: Path) -> None:
    script = write_wrapper(tmp_path / "bin")
    assert script.name == simulation_runtime.COMMAND
    done = subprocess.run(
        [str(script), "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "--runtime-api-address" in done.stdout  # flwr-simulation's own usage
