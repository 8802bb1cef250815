"""``fedserve-serve``: serve a model repository over HTTP (KServe v2 / Open Inference Protocol).

    fedserve-serve repository=<dir> port=<port> [host=127.0.0.1] [token=...] [serving.<key>=...]

A Hydra app on ``conf/serve.yaml`` (group ``serving``: ``conf/serving/default.yaml``). Loads every
model of the repository (verified, warmed), prints the URL and what it serves, keeps watching the
repository for new versions, and serves until SIGINT/SIGTERM (uvicorn handles both), then drains and
releases its leases.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def serve(cfg: DictConfig | dict[str, Any]) -> None:
    """Run the server described by a composed ``serve`` config (blocks until SIGINT/SIGTERM)."""
    import uvicorn

    from serving.api import ApiSettings, create_app
    from serving.dataplane import DataPlane
    from serving.pool import PoolSettings
    from serving.registry import ModelRegistry
    from serving.repository import ModelRepository
    from serving.watcher import RepositoryWatcher

    conf = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    serving = dict(conf.get("serving") or {})
    root = Path(str(conf["repository"])).expanduser()
    if not root.is_dir():
        raise SystemExit(
            f"repository={root} is not a directory; pass repository=<path to a model repository>"
        )
    repository = ModelRepository(root)
    registry = ModelRegistry()
    settings = PoolSettings.from_mapping(serving)
    watcher = RepositoryWatcher(
        repository,
        registry,
        settings,
        poll_interval_s=float(serving.get("poll_interval_s", 0.5)),
        versions=serving.get("versions"),
        models=conf.get("models"),
        drain_timeout_s=float(serving.get("drain_timeout_s", 30.0)),
    )
    api = ApiSettings(
        body_limit_bytes=int(serving.get("body_limit_bytes", 64 * 1024 * 1024)),
        token=conf.get("token") or None,
    )
    app = create_app(DataPlane(registry, ready=lambda: watcher.ready), settings=api)
    watcher.start()
    host, port = str(conf.get("host", "127.0.0.1")), int(conf.get("port", 8000))
    try:
        print(f"fedserve serving {root} at http://{host}:{port}/v2", flush=True)
        models = registry.models()
        if not models:
            print("  no models loaded yet; watching the repository", flush=True)
        for name, versions in models.items():
            pool = registry.get(name)
            print(
                f"  {name}: versions {versions} (default {pool.version}), "
                f"{len(pool.workers)} engines on {','.join(pool.obtained_providers)}, "
                f"infer at http://{host}:{port}/v2/models/{name}/infer",
                flush=True,
            )
        uvicorn.run(
            app,
            host=host,
            port=port,
            log_level=str(conf.get("log_level", "info")),
            access_log=False,
        )
    finally:
        watcher.stop()
        print("fedserve stopped", flush=True)


@hydra.main(config_path=CONF_DIR, config_name="serve", version_base=None)
def _hydra_main(cfg: DictConfig) -> None:
    serve(cfg)


def main() -> None:
    """Console script entry point (``fedserve-serve``)."""
    _hydra_main()


if __name__ == "__main__":
    sys.exit(main())
