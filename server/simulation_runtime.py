"""``flwr-simulation`` that can run every simulated client at once.

flwr 1.42's Simulation Engine (``flwr/server/superlink/fleet/vce/vce_api.py``, ``run_api``) submits
one worker per backend actor to a ``ThreadPoolExecutor()``. Its default size is
``min(32, cpu_count + 4)`` and each worker loops for the whole run, so the workers beyond that
size never start: on a 2-core machine at most 6 ClientApps run at once, however many actors Ray
was given (``RAY_OVERRIDE_RESOURCES``, or ``client-resources-num-cpus=0.1``). With emulated device
times (``heterogeneity.device_factor``: clients mostly sleep) a federation of 20 devices then
behaves like one of 6, and a slow device holds one of those 6 for its whole update.

:func:`server.launcher.local_superlink` puts :func:`write_wrapper`'s script first on the
SuperLink's ``PATH`` as ``flwr-simulation`` (the SuperLink starts the simulation process by that
name). The script sizes the executor so that every submitted worker gets a thread (threads are
created per submitted task, so that is one per actor) and runs flwr's own entry point. ``flwr run
.`` against a SuperLink started by hand keeps flwr's limit.
"""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

COMMAND = "flwr-simulation"
# An upper bound, not a pool size: ThreadPoolExecutor starts a thread per submitted task.
MAX_WORKERS = 1024


class EveryWorkerExecutor(ThreadPoolExecutor):
    """A ``ThreadPoolExecutor`` whose default size fits every task submitted to it."""

    def __init__(self, max_workers: int | None = None, *args: Any, **kwargs: Any) -> None:
        super().__init__(max_workers or MAX_WORKERS, *args, **kwargs)


def patch_simulation_engine() -> None:
    """Give the Simulation Engine's worker loops one thread each."""
    from flwr.server.superlink.fleet.vce import vce_api

    vce_api.ThreadPoolExecutor = EveryWorkerExecutor  # type: ignore[misc]


def write_wrapper(directory: Path) -> Path:
    """Write the ``flwr-simulation`` script into ``directory``; return its path."""
    directory.mkdir(parents=True, exist_ok=True)
    script = directory / COMMAND
    root = Path(__file__).resolve().parent.parent
    script.write_text(
        f"#!{sys.executable}\n"
        "import sys\n"
        f"sys.path.insert(0, {str(root)!r})\n"
        "from server.simulation_runtime import main\n"
        "sys.exit(main())\n"
    )
    script.chmod(0o755)
    return script


def main() -> int | None:
    """Patch the engine, then run flwr's ``flwr-simulation`` (it reads our argv)."""
    patch_simulation_engine()
    from flwr.simulation.app import flwr_simulation

    return flwr_simulation()  # type: ignore[func-returns-value]
