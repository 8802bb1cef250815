"""The loaded models: name -> version -> :class:`~serving.pool.EnginePool`.

Readers (the dataplane, per request) take no lock: the mapping is replaced, never mutated (copy on
write), so a lookup sees either the state before or after a swap. The default version of a model
is the newest loaded one. A pool removed from the registry is still referenced by requests already
dispatched to it; :meth:`EnginePool.close` lets them finish (the watcher closes it after removal).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping

from serving.errors import NotFound
from serving.layout import requested_version
from serving.pool import EnginePool


class ModelRegistry:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._models: Mapping[str, Mapping[int, EnginePool]] = {}
        self._default: Mapping[str, EnginePool] = {}

    def get(self, name: str, version: int | str | None = None) -> EnginePool:
        """The pool for ``name`` at ``version`` (default: the newest loaded); NotFound (404)."""
        if version is None or version == "":
            pool = self._default.get(name)
            if pool is None:
                raise NotFound(self._unknown_model(name))
            return pool
        versions = self._models.get(name)
        if versions is None:
            raise NotFound(self._unknown_model(name))
        v = requested_version(version)
        if v is None:
            raise NotFound(
                f"unknown version {version!r} of model '{name}'; loaded versions: "
                f"{sorted(versions)}"
            )
        pool = versions.get(v)
        if pool is None:
            raise NotFound(
                f"unknown version {v} of model '{name}'; loaded versions: {sorted(versions)}"
            )
        return pool

    def _unknown_model(self, name: str) -> str:
        loaded = ", ".join(sorted(self._models)) or "none"
        return f"unknown model '{name}'; loaded models: {loaded}"

    def add(self, pool: EnginePool) -> None:
        """Load ``pool``; it becomes the default when it is the newest version of its model."""
        with self._lock:
            models = {k: dict(v) for k, v in self._models.items()}
            models.setdefault(pool.name, {})[pool.version] = pool
            self._publish(models)

    def remove(self, name: str, version: int) -> EnginePool | None:
        """Unload one version (the caller closes the returned pool)."""
        with self._lock:
            models = {k: dict(v) for k, v in self._models.items()}
            pool = models.get(name, {}).pop(int(version), None)
            if name in models and not models[name]:
                del models[name]
            self._publish(models)
        return pool

    def _publish(self, models: dict[str, dict[int, EnginePool]]) -> None:
        defaults = {name: versions[max(versions)] for name, versions in models.items()}
        self._models = models
        self._default = defaults

    def __contains__(self, name: object) -> bool:
        """True while some version of model ``name`` is loaded."""
        return name in self._models

    def models(self) -> dict[str, list[int]]:
        return {name: sorted(v) for name, v in sorted(self._models.items())}

    def versions(self, name: str) -> list[int]:
        versions = self._models.get(name)
        if versions is None:
            raise NotFound(self._unknown_model(name))
        return sorted(versions)

    def pools(self) -> list[EnginePool]:
        return [p for versions in self._models.values() for p in versions.values()]
