"""``fedserve-serve``: serve a model repository over HTTP (KServe v2 / Open Inference Protocol).

    fedserve-serve repository=<dir> port=<port> [host=127.0.0.1] [token=...] [serving.<key>=...]

A Hydra app on ``conf/serve.yaml`` against the schema :class:`~serving.settings.ServeConfig` (every
key, its type and default; unknown keys and wrong types exit 2 with one line). Loads every
model of the repository (verified, warmed), prints the URL and what it serves, keeps watching the
repository for new versions, and serves until SIGINT/SIGTERM (uvicorn handles both), then drains and
releases its leases.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from serving.config_schema import (
    ConfigError,
    check_bool_overrides,
    config_errors_exit,
    run_cli,
    typed_config,
)
from serving.settings import ServeConfig

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
SCHEMA_NAME = "serve_schema"
PROGRAM = "fedserve-serve"


def serve(cfg: DictConfig | ServeConfig) -> None:
    """Run the server described by a composed ``serve`` config (blocks until SIGINT/SIGTERM)."""
    import uvicorn

    from serving.api import ApiSettings, create_app
    from serving.dataplane import DataPlane
    from serving.registry import ModelRegistry
    from serving.repository import ModelRepository
    from serving.watcher import RepositoryWatcher

    conf = cfg if isinstance(cfg, ServeConfig) else typed_config(cfg, ServeConfig)
    settings = conf.serving
    root = Path(conf.repository).expanduser()
    if not root.is_dir():
        raise ConfigError(
            f"repository={root} is not a directory; pass repository=<path to a model repository>"
        )
    repository = ModelRepository(root)
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
    api = ApiSettings(body_limit_bytes=settings.body_limit_bytes, token=conf.token or None)
    dataplane = DataPlane(registry, ready=lambda: watcher.ready, scheduler=watcher.scheduler)
    app = create_app(dataplane, settings=api)
    watcher.start()
    host, port = conf.host, conf.port
    try:
        print(f"fedserve serving {root} at http://{host}:{port}/v2", flush=True)
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
        uvicorn.run(
            app,
            host=host,
            port=port,
            log_level=conf.log_level,
            access_log=False,
        )
    finally:
        watcher.stop()
        print("fedserve stopped", flush=True)


@hydra.main(config_path=CONF_DIR, config_name="serve", version_base=None)
def _hydra_main(cfg: DictConfig) -> None:
    with config_errors_exit(PROGRAM):
        check_bool_overrides(list(HydraConfig.get().overrides.task), ServeConfig)
        conf = typed_config(cfg, ServeConfig)
        serve(conf)  # a budget the pins do not fit is a configuration error too


def main() -> None:
    """Console script entry point (``fedserve-serve``)."""
    ConfigStore.instance().store(name=SCHEMA_NAME, node=ServeConfig)
    run_cli(_hydra_main, PROGRAM)


if __name__ == "__main__":
    sys.exit(main())
