"""Polls the model repository and tells the scheduler what it holds, so versions swap live.

Every ``poll_interval_s`` (default 0.05 s) the watcher stats the repository root and each model
directory (a few ``stat`` calls, ~20 us): a publish renames a version directory into its model
directory and retention renames one out, both of which change that directory's mtime, and a new
model changes the root's. When a stamp changed (or changed within the last 100 ms, so two changes
in one coarse clock tick are not missed), or at the latest every ``full_poll_s`` (default 1 s), it
polls the repository in full (as it does once, synchronously, in
:meth:`RepositoryWatcher.start`): each model's versions are listed, and which of them may be
served follows the model's ``config.pbtxt`` version policy (Triton's: ``latest {num_versions: k}``
by default k=1, ``all``, or ``specific``) unless the ``versions`` argument overrides k.

Each model's candidates and count go to the :class:`~serving.scheduler.Scheduler`
(:meth:`~serving.scheduler.Scheduler.update`), which loads what its mode wants (verified, warmed,
within the budget) and then unloads what the new versions supersede; models that left the
repository are unloaded. A version that failed to load is retried when its directory changes
(the scheduler keeps the failure with a stamp of the directory; a full poll compares it).
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Iterable
from typing import Any

from serving.errors import BadRequest, NotFound, RepositoryError
from serving.model_config import check_onnx_model, version_policy
from serving.pool import EnginePool
from serving.registry import ModelRegistry
from serving.scheduler import Scheduler
from serving.settings import ServingConfig
from serving.version_loader import PoolFactory

log = logging.getLogger(__name__)


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
        scheduler: Scheduler | None = None,
    ) -> None:
        if poll_interval_s <= 0:
            raise ValueError(f"serving.poll_interval_s must be > 0, got {poll_interval_s}")
        if versions is not None and versions < 1:
            raise ValueError(
                f"serving.versions must be >= 1 or null (config policy), got {versions}"
            )
        self.repository = repository
        self.registry = registry
        self.scheduler = scheduler or Scheduler(
            repository,
            registry,
            settings,
            drain_timeout_s=drain_timeout_s,
            pool_factory=pool_factory,
        )
        self.scheduler.rescan = self._rescan
        self.poll_interval_s = float(poll_interval_s)
        self.full_poll_s = max(float(full_poll_s), self.poll_interval_s)
        self.versions = versions
        self.models = set(models) if models else None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._poll_lock = threading.Lock()
        self.ready = False
        #: ``time.monotonic()`` when the latest completed poll started
        self.polled_at = -math.inf
        self._stamp: Any = None

    # ---- what the scheduler knows, for callers of the watcher

    @property
    def failed(self) -> dict[tuple[str, int], str]:
        """(model, version) -> why it is not served, for versions that failed to load."""
        return {(v.model, v.version): v.failure for v in self.scheduler.versions() if v.failure}

    @property
    def timings(self) -> dict[tuple[str, int], dict[str, float | None]]:
        return self.scheduler.timings

    @property
    def swaps(self) -> int:
        return self.scheduler.swaps

    # ---- lifecycle

    def start(self) -> None:
        """Read the repository, load what the scheduler's mode and pins want, then keep polling
        in a background thread."""
        self._stamp = self._change_stamp()
        with self._poll_lock:
            self._poll(load=False)
        self._warn_absent_models()
        try:
            self.scheduler.start()
        except BaseException:
            self.scheduler.stop()  # unload what was loaded, release its leases
            raise
        self.ready = True
        self._thread = threading.Thread(target=self._run, name="repository-watcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop polling; unload every version (draining) and release its lease."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)
        with self._poll_lock:
            self.scheduler.stop()
        self.ready = False

    def _warn_absent_models(self) -> None:
        """A model named in ``models`` that the repository lacks is served once published under
        that name; say so at start, with what the repository holds (a misspelt name served
        nothing, in silence)."""
        if self.models is None:
            return
        present = set(self.repository.list_models())
        absent = sorted(self.models - present)
        if absent:
            log.warning(
                "models=%s: the repository holds no model %s yet (it holds: %s); serving each "
                "once it is published",
                sorted(self.models),
                ", ".join(absent),
                ", ".join(sorted(present)) or "none",
            )

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
            return self._poll(load=True)

    def _poll(self, load: bool) -> bool:
        started = time.monotonic()
        changed = False
        present = set(self.repository.list_models())
        if self.models is not None:
            present &= self.models
        for model in sorted(present):
            try:
                candidates, count = self._wanted(model, self.repository.list_versions(model))
                changed |= self.scheduler.update(model, candidates, count, load=load)
            except Exception:  # noqa: BLE001 - one broken model must not stop the others
                log.exception("cannot sync model %s", model)
        changed |= self.scheduler.forget_others(present)
        self.polled_at = started
        return changed

    def _rescan(self, model: str) -> None:
        """Tell the scheduler what the repository holds of ``model`` now (loads nothing): what
        an explicit load does first. Unlike a poll, which logs a bad config.pbtxt and serves the
        newest version, it answers for the config as Triton's load does: BadRequest naming the
        file and its fault when it is unreadable, invalid, names another model or is for
        another platform; NotFound for a model the repository does not hold (any more: its
        loaded versions go at the next poll, so a load must not answer that it is served)."""
        present = [
            name
            for name in self.repository.list_models()
            if self.models is None or name in self.models
        ]
        if model not in present:
            raise NotFound(
                f"unknown model '{model}'; models in the repository: {', '.join(present) or 'none'}"
            )
        try:
            check_onnx_model(self.repository.read_config(model), f"{model}/config.pbtxt")
        except RepositoryError as exc:
            raise BadRequest(f"failed to load model '{model}': {exc}") from None
        candidates, count = self._wanted(model, self.repository.list_versions(model))
        self.scheduler.update(model, candidates, count, load=False)

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


def _recent(stamp: Any, window_ns: int = 100_000_000) -> bool:
    """True when a directory in ``stamp`` changed within ``window_ns`` (mtimes are coarse: two
    changes in one clock tick leave the same mtime, so keep polling briefly after a change)."""
    if not isinstance(stamp, tuple) or not stamp:
        return True
    return time.time_ns() - max(m for _, m in stamp) < window_ns
