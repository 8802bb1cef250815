"""Polls the model repository and keeps the registry in step with it, swapping versions live.

Every ``poll_interval_s`` (and once, synchronously, in :meth:`RepositoryWatcher.start`) each model's
versions are listed. Which versions to serve follows the model's ``config.pbtxt`` version policy
(Triton's: ``latest {num_versions: k}`` by default k=1, ``all``, or ``specific``) unless the
``versions`` argument overrides k. For a wanted version that is not loaded yet the watcher

1. leases it (``ModelRepository.mark_in_use``) so retention cannot delete it while it is served,
2. verifies it (``ModelRepository.verify``: checksums, onnx checker),
3. builds its :class:`~serving.pool.EnginePool` (sessions loaded and warmed) off the request path,
4. adds it to the registry, where it becomes the default if it is the newest,

and only then unloads versions that fell out of the wanted set: removed from the registry first (new
requests go to the new pool), then closed (queued requests finish), then the lease is released.
Requests never see a gap, so a swap fails none. A version that fails to verify or load is logged,
remembered and skipped; whatever was serving keeps serving.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from typing import Any

from serving.engine import ModelSignature
from serving.pool import EnginePool, PoolSettings
from serving.registry import ModelRegistry

log = logging.getLogger(__name__)

PoolFactory = Callable[..., EnginePool]


class RepositoryWatcher:
    def __init__(
        self,
        repository: Any,
        registry: ModelRegistry,
        settings: PoolSettings | None = None,
        *,
        poll_interval_s: float = 0.5,
        versions: int | None = None,
        models: Iterable[str] | None = None,
        drain_timeout_s: float = 30.0,
        pool_factory: PoolFactory = EnginePool,
    ) -> None:
        if poll_interval_s <= 0:
            raise ValueError(f"serving.poll_interval_s must be > 0, got {poll_interval_s}")
        if versions is not None and versions < 1:
            raise ValueError(
                f"serving.versions must be >= 1 or null (config policy), got {versions}"
            )
        self.repository = repository
        self.registry = registry
        self.settings = settings or PoolSettings()
        self.poll_interval_s = float(poll_interval_s)
        self.versions = versions
        self.models = set(models) if models else None
        self.drain_timeout_s = drain_timeout_s
        self.pool_factory = pool_factory
        #: (model, version) -> why it was skipped
        self.failed: dict[tuple[str, int], str] = {}
        self._loaded: dict[tuple[str, int], tuple[EnginePool, str | None]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._poll_lock = threading.Lock()
        self.ready = False
        self.swaps = 0

    # ---- lifecycle

    def start(self) -> None:
        """Load what the repository holds now, then keep polling in a background thread."""
        self.poll_once()
        self.ready = True
        self._thread = threading.Thread(target=self._run, name="repository-watcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop polling; unload every version (draining) and release its lease."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)
        with self._poll_lock:
            for model, version in list(self._loaded):
                self._unload(model, version)
        self.ready = False

    def _run(self) -> None:
        while not self._stop.wait(self.poll_interval_s):
            try:
                self.poll_once()
            except Exception:  # noqa: BLE001 - the watcher must survive a bad poll
                log.exception("repository poll failed; retrying in %.1f s", self.poll_interval_s)

    # ---- one poll

    def poll_once(self) -> bool:
        """One pass over the repository; True when anything was loaded or unloaded."""
        with self._poll_lock:
            changed = False
            present = set(self.repository.list_models())
            if self.models is not None:
                present &= self.models
            for model in sorted(present):
                try:
                    changed |= self._sync_model(model)
                except Exception:  # noqa: BLE001 - one broken model must not stop the others
                    log.exception("cannot sync model %s", model)
            for model, version in list(self._loaded):
                if model not in present:
                    self._unload(model, version)
                    changed = True
            return changed

    def _wanted(self, model: str, available: list[int]) -> tuple[list[int], int]:
        """Candidate versions, newest first, and how many of them to serve."""
        newest_first = sorted(available, reverse=True)
        if self.versions is not None:
            return newest_first, self.versions
        try:
            policy = self.repository.read_config(model).get("version_policy") or {}
        except Exception as exc:  # noqa: BLE001
            log.warning(
                "model %s: unreadable config.pbtxt (%s); serving the newest version", model, exc
            )
            policy = {}
        if "all" in policy:
            return newest_first, len(newest_first)
        if "specific" in policy:
            chosen = {int(v) for v in (policy["specific"] or {}).get("versions", [])}
            picked = [v for v in newest_first if v in chosen]
            return picked, len(picked)
        latest = policy.get("latest") or {}
        return newest_first, max(1, int(latest.get("num_versions", 1)))

    def _sync_model(self, model: str) -> bool:
        available = self.repository.list_versions(model)
        candidates, count = self._wanted(model, available)
        loaded = {v for (m, v) in self._loaded if m == model}
        keep: list[int] = []
        changed = False
        for version in candidates:
            if len(keep) >= count:
                break
            if version in loaded:
                keep.append(version)
                continue
            if (model, version) in self.failed:
                continue
            if self._load(model, version):
                keep.append(version)
                changed = True
        for version in sorted(loaded - set(keep)):
            if keep and version > min(keep) and version in available:
                continue  # never drop a newer loaded version for an older one
            self._unload(model, version)
            changed = True
        if changed and loaded:
            self.swaps += 1
        return changed

    def _load(self, model: str, version: int) -> bool:
        repo = self.repository
        lease: str | None = None
        try:
            lease = repo.mark_in_use(model, version)
            repo.verify(model, version)
            meta = repo.load_metadata(model, version)
            max_batch = meta.get("max_batch_size")
            if max_batch is None:
                max_batch = repo.read_config(model)["max_batch_size"]
            signature = ModelSignature.build(
                meta["inputs"],
                meta["outputs"],
                int(max_batch),
                allow_nonfinite=[*self.settings.allow_nonfinite, *meta.get("allow_nonfinite", [])],
            )
            pool = self.pool_factory(
                model,
                version,
                repo.model_path(model, version),
                signature,
                self.settings,
                metadata=meta,
            )
        except Exception as exc:  # noqa: BLE001 - any failure: skip this version, keep serving
            if lease is not None:
                try:
                    repo.release(model, version, lease)
                except Exception:  # noqa: BLE001
                    log.exception("cannot release lease on %s:%d", model, version)
            self.failed[(model, version)] = f"{type(exc).__name__}: {exc}"
            log.error("skipping %s version %d: %s: %s", model, version, type(exc).__name__, exc)
            return False
        self._loaded[(model, version)] = (pool, lease)
        self.registry.add(pool)
        log.info("serving %s version %d (providers %s)", model, version, pool.obtained_providers)
        return True

    def _unload(self, model: str, version: int) -> None:
        pool, lease = self._loaded.pop((model, version))
        self.registry.remove(model, version)
        try:
            pool.close(self.drain_timeout_s)
        finally:
            if lease is not None:
                try:
                    self.repository.release(model, version, lease)
                except Exception:  # noqa: BLE001
                    log.exception("cannot release lease on %s:%d", model, version)
        log.info("unloaded %s version %d", model, version)

    def loaded(self) -> list[tuple[str, int]]:
        return sorted(self._loaded)
