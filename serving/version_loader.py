"""Turn one repository version into a warmed engine pool, timed, or leave nothing behind.

:func:`load_version`:

1. leases the version (``repository.mark_in_use``) so retention cannot delete it while it is
   served,
2. verifies it (``repository.verify``: checksums, onnx checker), unless the caller knows it was
   verified already and has not changed since (``verified``: a reload after an eviction),
3. builds its :class:`~serving.signature.ModelSignature` from the metadata (or ``config.pbtxt``'s
   ``max_batch_size``),
4. builds its :class:`~serving.pool.EnginePool` (the session loaded, measured and warmed) inside
   ``gate`` (a :class:`BuildGate` side): only this step measures memory, so verification (120 ms
   of a ResNet-18's 250 ms first load) runs outside it and does not hold other builds back.

Any failure releases the lease and raises :class:`LoadError` with the reason; nothing stays
loaded. The returned :class:`LoadedVersion` carries the load's timing (train->serve latency,
benchmarks/serving/train_to_serve.py): ``published_at`` (metadata ``created``), ``detected_at``,
``serving_at`` (wall-clock ``time.time()``; the scheduler stamps ``serving_at`` and ``swap_s`` when
it swaps the version in), ``params_at`` (from the metadata's ``timing``, when the trainer recorded
it) and ``verify_s``, ``gate_s`` (waiting for the gate), ``load_s``, ``warm_s``; the scheduler adds
where its load waited before that (``queued_s`` for a loader thread, ``room_s``, ``engine_s``).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from serving.pool import EnginePool
from serving.settings import ServingConfig
from serving.signature import ModelSignature
from serving.statistics import ModelStatistics

log = logging.getLogger(__name__)

PoolFactory = Callable[..., EnginePool]


class BuildGate:
    """Builds that measure their memory run alone; builds of files measured before run together.

    A version's memory is the process heap's growth while it is built (:mod:`serving.memory_probe`),
    so a build next to another counts the other's allocations too: the first build of a version
    takes the gate :meth:`alone`. A build of files like ones measured before (a reload after an
    eviction, most loads of an on-demand server; a new round of a measured architecture) keeps that
    measurement and takes it :meth:`together` with other such builds: a 4 ms MLP rebuild does not
    queue behind a 180 ms ResNet-18 rebuild (session creation releases the GIL). A build waiting
    to go alone stops new rebuilds from starting, so it is not starved.
    """

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._together = 0
        self._alone = False
        self._waiting_alone = 0

    @contextlib.contextmanager
    def alone(self) -> Iterator[None]:
        with self._changed:
            self._waiting_alone += 1
            while self._alone or self._together:
                self._changed.wait()
            self._waiting_alone -= 1
            self._alone = True
        try:
            yield
        finally:
            with self._changed:
                self._alone = False
                self._changed.notify_all()

    @contextlib.contextmanager
    def together(self) -> Iterator[None]:
        with self._changed:
            while self._alone or self._waiting_alone:
                self._changed.wait()
            self._together += 1
        try:
            yield
        finally:
            with self._changed:
                self._together -= 1
                self._changed.notify_all()


class LoadError(Exception):
    """A version could not be loaded; the message says why (it names the version)."""


@dataclass
class LoadedVersion:
    pool: EnginePool
    lease: str | None
    timing: dict[str, float | None] = field(default_factory=dict)


def load_version(
    repository: Any,
    model: str,
    version: int,
    settings: ServingConfig,
    *,
    pool_factory: PoolFactory = EnginePool,
    engines: int | None = None,
    stats: ModelStatistics | None = None,
    verified: bool = False,
    gate: contextlib.AbstractContextManager[Any] | None = None,
) -> LoadedVersion:
    """Lease, verify and load ``model`` ``version`` (see the module docstring)."""
    detected_at = time.time()
    lease: str | None = None
    try:
        lease = repository.mark_in_use(model, version)
        t0 = time.perf_counter()
        if not verified:
            repository.verify(model, version)
        verify_s = time.perf_counter() - t0
        meta = repository.load_metadata(model, version)
        max_batch = meta.get("max_batch_size")
        if max_batch is None:
            max_batch = repository.read_config(model).max_batch_size
        signature = ModelSignature.build(
            meta["inputs"],
            meta["outputs"],
            int(max_batch),
            allow_nonfinite=[*settings.allow_nonfinite, *meta.get("allow_nonfinite", [])],
        )
        t0 = time.perf_counter()
        with gate if gate is not None else contextlib.nullcontext():
            gate_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            pool = pool_factory(
                model,
                version,
                repository.model_path(model, version),
                signature,
                settings,
                engines=engines,
                stats=stats,
            )
            built_s = time.perf_counter() - t0
    except Exception as exc:  # noqa: BLE001 - any failure: nothing stays loaded
        if lease is not None:
            release(repository, model, version, lease)
        raise LoadError(
            f"version {version} of model '{model}': {type(exc).__name__}: {exc}"
        ) from exc
    warm_s = float(getattr(pool, "warmup_seconds", 0.0))
    trainer = meta.get("timing") if isinstance(meta.get("timing"), dict) else {}
    timing: dict[str, float | None] = {
        "params_at": _number(trainer.get("params_at")),
        "published_at": _epoch(meta.get("created")),
        "detected_at": detected_at,
        "serving_at": None,
        "verify_s": verify_s,
        "gate_s": gate_s,
        "load_s": max(0.0, built_s - warm_s),
        "warm_s": warm_s,
        "swap_s": None,
    }
    return LoadedVersion(pool, lease, timing)


def release(repository: Any, model: str, version: int, lease: str | None) -> None:
    """Drop a lease, logging (not raising) a failure."""
    if lease is None:
        return
    try:
        repository.release(model, version, lease)
    except Exception:  # noqa: BLE001
        log.exception("cannot release lease on %s:%d", model, version)


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _epoch(iso: Any) -> float | None:
    """``time.time()`` of an ISO-8601 timestamp (metadata ``created``), None if absent/bad."""
    try:
        return datetime.fromisoformat(str(iso)).timestamp() if iso else None
    except (TypeError, ValueError):
        return None
