"""``fedserve-serve`` (``serving.cli.serve``) with engine e0 of every pool slowed: after each run
it sleeps (factor - 1) x the run time, so it is ``factor`` times slower without using more CPU.

    python -m benchmarks.serving.slow_server FACTOR CONFIG_JSON

``CONFIG_JSON`` is the serve config (``conf/serve.yaml``'s keys). Started by
:func:`benchmarks.serving.servers.slow_servers` for the dispatch-policy comparison.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import numpy as np

from serving import cli, watcher
from serving.engine import Engine
from serving.pool import EnginePool


def slow_pool(factor: float) -> type[EnginePool]:
    """An :class:`EnginePool` whose engine ``e0`` sleeps ``factor - 1`` x its run time."""

    class SlowPool(EnginePool):
        def _default_factory(self, name: str) -> Engine:
            engine = super()._default_factory(name)
            if name.endswith("/e0"):
                run = engine.run

                def slow_run(feeds: dict[str, np.ndarray]) -> Any:
                    t0 = time.perf_counter()
                    out = run(feeds)
                    time.sleep((factor - 1.0) * (time.perf_counter() - t0))
                    return out

                engine.run = slow_run  # type: ignore[method-assign]
            return engine

    return SlowPool


def main(argv: list[str]) -> None:
    pool = slow_pool(float(argv[0]))
    init = watcher.RepositoryWatcher.__init__

    def patched(self: watcher.RepositoryWatcher, *args: Any, **kwargs: Any) -> None:
        kwargs["pool_factory"] = pool
        init(self, *args, **kwargs)

    watcher.RepositoryWatcher.__init__ = patched  # type: ignore[method-assign]
    cli.serve(json.loads(argv[1]))


if __name__ == "__main__":
    main(sys.argv[1:])
