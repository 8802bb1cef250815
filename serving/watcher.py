"""Polls the model repository and keeps the registry in step with it, swapping versions live.

Every ``poll_interval_s`` (default 0.05 s) the watcher stats the repository root and each model
directory (a few ``stat`` calls, ~20 us): a publish renames a version directory into its model
directory and retention renames one out, both of which change that directory's mtime, and a new
model changes the root's. When a stamp changed (or changed within the last 100 ms, so two changes
in one coarse clock tick are not missed), or at the latest every ``full_poll_s`` (default 1 s), it
polls the repository in full (as it does once, synchronously, in
:meth:`RepositoryWatcher.start`): each model's versions are listed. Which versions to serve
follows the model's ``config.pbtxt`` version policy (Triton's: ``latest {num_versions: k}`` by
default k=1, ``all``, or ``specific``) unless the ``versions`` argument overrides k. For a wanted
version that is not loaded yet the watcher

1. leases it (``ModelRepository.mark_in_use``) so retention cannot delete it while it is served,
2. verifies it (``ModelRepository.verify``: checksums, onnx checker),
3. builds its :class:`~serving.pool.EnginePool` (sessions loaded and warmed) off the request path,
4. adds it to the registry, where it becomes the default if it is the newest,

and only then unloads versions that fell out of the wanted set: removed from the registry first (new
requests go to the new pool), then closed (queued requests finish), then the lease is released.
Requests never see a gap, so a swap fails none. A version that fails to verify or load is logged,
remembered and skipped; whatever was serving keeps serving.

Each load is timed (train->serve latency, benchmarks/train_to_serve.py): :attr:`timings` and one
``swap timing {json}`` log line per version hold ``published_at`` (metadata ``created``),
``detected_at``, ``serving_at`` (wall-clock ``time.time()``), ``params_at`` (from the metadata's
``timing``, when the trainer recorded it) and ``verify_s``, ``load_s``, ``warm_s``, ``swap_s``.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any

from serving.model_config import version_policy
from serving.pool import EnginePool
from serving.registry import ModelRegistry
from serving.settings import ServingConfig
from serving.signature import ModelSignature

log = logging.getLogger(__name__)

PoolFactory = Callable[..., EnginePool]


class RepositoryWatcher:
    def __init__(
        self,
        repository: Any,
        registry: ModelRegistry,
        settings: ServingConfig | None = None,
        *,
        poll_interval_s: float = 0.05,
        full_poll_s: float = 1.0,
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
        self.settings = settings or ServingConfig()
        self.poll_interval_s = float(poll_interval_s)
        self.full_poll_s = max(float(full_poll_s), self.poll_interval_s)
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
        #: (model, version) -> load timing (see the module docstring)
        self.timings: dict[tuple[str, int], dict[str, float | None]] = {}
        self._stamp: Any = None

    # ---- lifecycle

    def start(self) -> None:
        """Load what the repository holds now, then keep polling in a background thread."""
        self._stamp = self._change_stamp()
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
        last_full = time.monotonic()
        while not self._stop.wait(self.poll_interval_s):
            try:
                stamp = self._change_stamp()
                now = time.monotonic()
                if (
                    stamp == self._stamp
                    and not _recent(stamp)
                    and now - last_full < self.full_poll_s
                ):
                    continue
                self._stamp = stamp  # taken before the poll: a change during it shows next time
                last_full = now
                self.poll_once()
            except Exception:  # noqa: BLE001 - the watcher must survive a bad poll
                log.exception("repository poll failed; retrying in %.1f s", self.poll_interval_s)

    def _change_stamp(self) -> Any:
        """mtime_ns of the repository root and of each directory in it (``object()``, i.e.
        "changed", for a repository without a ``root`` directory to stat)."""
        root = getattr(self.repository, "root", None)
        if root is None:
            return object()
        try:
            stamps = [("", os.stat(root).st_mtime_ns)]
            with os.scandir(root) as entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False):
                        stamps.append((entry.name, entry.stat(follow_symlinks=False).st_mtime_ns))
        except OSError:
            return object()
        return tuple(sorted(stamps))

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
            policy = version_policy(self.repository.read_config(model))
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
        detected_at = time.time()
        try:
            lease = repo.mark_in_use(model, version)
            t0 = time.perf_counter()
            repo.verify(model, version)
            verify_s = time.perf_counter() - t0
            meta = repo.load_metadata(model, version)
            max_batch = meta.get("max_batch_size")
            if max_batch is None:
                max_batch = repo.read_config(model).max_batch_size
            signature = ModelSignature.build(
                meta["inputs"],
                meta["outputs"],
                int(max_batch),
                allow_nonfinite=[*self.settings.allow_nonfinite, *meta.get("allow_nonfinite", [])],
            )
            t0 = time.perf_counter()
            pool = self.pool_factory(
                model,
                version,
                repo.model_path(model, version),
                signature,
                self.settings,
            )
            built_s = time.perf_counter() - t0
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
        t0 = time.perf_counter()
        self.registry.add(pool)
        swap_s = time.perf_counter() - t0
        log.info("serving %s version %d (providers %s)", model, version, pool.obtained_providers)
        warm_s = max(
            (getattr(getattr(w, "engine", None), "warmup_seconds", 0.0) for w in pool.workers),
            default=0.0,
        )
        trainer = meta.get("timing") if isinstance(meta.get("timing"), dict) else {}
        timing = {
            "params_at": _number(trainer.get("params_at")),
            "published_at": _epoch(meta.get("created")),
            "detected_at": detected_at,
            "serving_at": time.time(),
            "verify_s": verify_s,
            "load_s": max(0.0, built_s - warm_s),
            "warm_s": warm_s,
            "swap_s": swap_s,
        }
        self.timings[(model, version)] = timing
        log.info("swap timing %s", json.dumps({"model": model, "version": version, **timing}))
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


def _recent(stamp: Any, window_ns: int = 100_000_000) -> bool:
    """True when a directory in ``stamp`` changed within ``window_ns`` (mtimes are coarse: two
    changes in one clock tick leave the same mtime, so keep polling briefly after a change)."""
    if not isinstance(stamp, tuple) or not stamp:
        return True
    return time.time_ns() - max(m for _, m in stamp) < window_ns


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _epoch(iso: Any) -> float | None:
    """``time.time()`` of an ISO-8601 timestamp (metadata ``created``), None if absent/bad."""
    try:
        return datetime.fromisoformat(str(iso)).timestamp() if iso else None
    except (TypeError, ValueError):
        return None
