"""``fedserve-serve``: serve a model repository over KServe v2 HTTP and gRPC.

    fedserve-serve repository=<dir> port=<port> [host=127.0.0.1] [token=...] [serving.<key>=...]

A Hydra app on ``conf/serve.yaml`` against the schema :class:`~serving.settings.ServeConfig` (every
key, its type and default; unknown keys and wrong types exit 2 with one line). Loads every
model of the repository (verified, warmed), prints the URLs and what it serves, keeps watching the
repository for new versions, and serves HTTP (:mod:`serving.api`) and gRPC
(:mod:`serving.grpc_server`, ``serving.grpc_port``) from one event loop
(:mod:`serving.servers`), and from ``serving.frontends - 1`` front-end processes more.

SIGTERM or SIGINT: the front-end processes and then both servers stop accepting, the requests in
flight finish (at most ``serving.drain_timeout_s``), the watcher stops and closes every version
(its queue drains) and releases its lease, and the process exits 0. The signals are this
process's (:func:`serving.servers.run_servers`): uvicorn's own handler would re-raise the signal
after its shutdown and skip all of that.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from serving.config_schema import (
    check_bool_overrides,
    config_errors_exit,
    run_cli,
    typed_config,
)
from serving.errors import PortUnavailable
from serving.settings import ServeConfig

if TYPE_CHECKING:  # imported where used: `fedserve-serve --help` and bad configs stay fast
    from serving.store_mirror import StoreMirror
    from serving.watcher import RepositoryWatcher

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
SCHEMA_NAME = "serve_schema"
PROGRAM = "fedserve-serve"

log = logging.getLogger(__name__)


def serve(cfg: DictConfig | ServeConfig) -> None:
    """Run the server described by a composed ``serve`` config until SIGINT/SIGTERM, then shut
    down cleanly (see :func:`serving.servers.run_servers`) and return."""
    from serving.api import ApiSettings, create_app
    from serving.dataplane import DataPlane
    from serving.json_offload import JsonDecoder
    from serving.registry import ModelRegistry
    from serving.servers import event_loop_factory, run_servers
    from serving.store_mirror import open_served_repository
    from serving.watcher import RepositoryWatcher

    conf = cfg if isinstance(cfg, ServeConfig) else typed_config(cfg, ServeConfig)
    settings = conf.serving
    repository, mirror = open_served_repository(
        conf.repository, settings.store, versions=settings.versions, models=conf.models
    )
    registry = ModelRegistry()
    watcher = RepositoryWatcher(
        repository,
        registry,
        settings,
        poll_interval_s=settings.poll_interval_s,
        versions=settings.versions,
        models=conf.models,
        drain_timeout_s=settings.drain_timeout_s,
    )
    decoder = JsonDecoder(settings.json_offload_bytes, settings.json_offload_processes)
    dataplane = DataPlane(
        registry,
        ready=lambda: serving_ready(watcher, mirror),
        not_ready_reason=lambda: mirror.problem if mirror is not None else None,
        configs=repository.version_config,
        scheduler=watcher.scheduler,
    )
    app = create_app(
        dataplane, settings=ApiSettings.from_config(settings, conf.token), decoder=decoder
    )
    watcher.start()
    try:
        with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
            runner.run(
                run_servers(
                    conf, app, dataplane, banner=lambda grpc: _banner(conf, registry, grpc, mirror)
                )
            )
    finally:
        watcher.stop()  # closes every pool (each drains its queue) and releases its lease
        repository.release_all()  # this process's leases, whatever is left of them
        if mirror is not None:
            mirror.stop()
        decoder.close()
        print("fedserve stopped", flush=True)


def serving_ready(watcher: RepositoryWatcher, mirror: StoreMirror | None) -> bool:
    """Ready once the watcher loaded what the repository held at start; with a model store,
    once a poll that began after the mirror's first successful sync has finished: the versions
    that sync brought into the cache are then known, not 404s behind a 200 from ready."""
    if not watcher.ready:
        return False
    if mirror is None:
        return True
    return mirror.synced_at is not None and watcher.polled_at >= mirror.synced_at


def _banner(conf: ServeConfig, registry: Any, grpc_port: int | None, mirror: Any) -> None:
    host, port = conf.host, conf.port
    print(f"fedserve serving {conf.repository} at http://{host}:{port}/v2", flush=True)
    if mirror is not None and mirror.problem:
        print(f"  not ready: {mirror.problem}; retrying", flush=True)
    if grpc_port is not None:
        print(f"  gRPC (KServe v2 / Triton GRPCInferenceService) at {host}:{grpc_port}", flush=True)
    if conf.serving.frontends > 1:
        print(
            f"  {conf.serving.frontends} processes run the front ends on these ports "
            "(serving.frontends), one engine pool per version behind them",
            flush=True,
        )
    models = registry.models()
    if not models:
        print("  no models loaded yet; watching the repository", flush=True)
    for name, versions in models.items():
        pool = registry.get(name)
        print(
            f"  {name}: versions {versions} (default {pool.version}), "
            f"{pool.engine_count} engines on {','.join(pool.obtained_providers)}, "
            f"infer at http://{host}:{port}/v2/models/{name}/infer",
            flush=True,
        )


@hydra.main(config_path=CONF_DIR, config_name="serve", version_base=None)
def _hydra_main(cfg: DictConfig) -> None:
    with config_errors_exit(PROGRAM, (PortUnavailable,)):
        check_bool_overrides(list(HydraConfig.get().overrides.task), ServeConfig)
        conf = typed_config(cfg, ServeConfig)
        serve(conf)  # a budget the pins do not fit is a configuration error too


def main() -> None:
    """Console script entry point (``fedserve-serve``)."""
    ConfigStore.instance().store(name=SCHEMA_NAME, node=ServeConfig)
    run_cli(_hydra_main, PROGRAM)


if __name__ == "__main__":
    sys.exit(main())
