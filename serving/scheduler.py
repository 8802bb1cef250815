"""The scheduler center: which model versions are loaded, and how many engines each one has.

Every loaded version shares one budget (:mod:`serving.scheduler_budget`): ``serving.budget.engines``
(concurrent runs; each loaded version holds at least one engine, so it also bounds how many are
resident) and ``serving.budget.memory_bytes`` (what the loaded versions hold, measured as each
loads: :meth:`EnginePool.memory_bytes <serving.pool.EnginePool.memory_bytes>`).

What exists comes from the repository watcher (:meth:`Scheduler.update`: each model's candidate
versions, newest first, and how many its version policy serves). What is loaded is decided here:

* **eager** (``serving.load=eager``): a model's wanted versions are loaded at start and when they
  are published, as far as the budget allows without evicting anything;
* **on demand**: a version is loaded at its first request (:meth:`Scheduler.acquire`). Concurrent
  first requests share one load (one future per version); a request waits up to
  ``serving.load_timeout_s``, then gets 503 with ``Retry-After`` while the load goes on. Requests
  load non-resident versions in eager mode too.
* **hot swap**: a model with a loaded version is in use, so a version published for it (or fixed
  after a failure) that is newer than its loaded ones is loaded at once (both modes); then the
  versions it supersedes under the policy are unloaded (drained, nothing fails). Never is a newer
  loaded version dropped for an older one.
* **pins** (``serving.pin``): loaded at start and never evicted.

A request without a version goes to the newest loaded version of the model (Triton's rule); when
none is loaded, the newest version the policy serves is loaded for it.

Making room: a load first reserves what the version is expected to hold: the largest of its
measurements, else the largest measurement of the same model, else its files' size times
``FIRST_LOAD_MARGIN`` plus the largest run memory measured so far (a session holds its weights
plus an arena region for its runs: measured here 0.3 / 6.8 / 45.1 MB sessions for 0.2 / 6.7 /
44.7 MB files, and 1.1-3.3 MB of run memory), so the reservation errs upwards; it is capped at the
budget. When that would exceed the memory budget, or no engine is left for it, the least recently
used version that is not pinned and has nothing in flight (no request queued or running) is
unloaded, then the next, until it fits. A version with requests in flight is never evicted; if
only in-flight versions (or loads in progress that hold their room) are left, the load waits
for one to go idle (up to the load timeout), then gives up with 503. A swap may instead retire
the version it replaces (new requests then wait for the new version; in-flight ones finish).
After the load, the measured size replaces the reservation; a version larger than the whole
budget is unloaded again and refused, with a message naming both sizes, and remembered as such.

Engines follow demand (``serving.instances`` unset): a new version gets one engine (taken from
the version holding the most when none is free); every ``serving.budget.rebalance_s`` and after
loads and unloads (at most every ``REBALANCE_MIN_S``) the engines are re-spread by measured
demand with hysteresis, each version getting what its demand needs, the rest left free
(:mod:`serving.scheduler_allocation`). A moved engine is drained first: its queued requests go to
the version's other engines, its running batch finishes, then it starts on the other version.
With ``serving.instances`` set, every loaded version has that many engines, fixed.

Failures: a version that fails to load (verification, session, budget) is remembered with a stamp
of its directory (names, sizes and mtimes of its files) and not tried again until that stamp
changes (a non-atomic copy completing, a fixed file). The model control API (:meth:`load_model`,
:meth:`unload_model`, :meth:`index`) is Triton's explicit model control: a model unloaded through it
stays unloaded, and is not loaded on demand, until it is loaded through it again.

Locking: one lock guards the state; up to ``LOAD_THREADS`` loads run at once on loader threads:
some make room (picking and unloading victims is one at a time, waiting for a busy version is
not) while others build. A version's first build (its session loaded and warmed; verification
runs before, outside the gate) runs alone: the memory measurement is the process heap's growth
(:mod:`serving.memory_probe`), so a build next to another counts the other's allocations too
(measured here: a ResNet-18 at 72.7 MB next to a CNN load, 48.3 MB alone; a 1.4 MB MLP at 10.1
MB), which inflated reservations, evicted versions for nothing and refused a version as larger
than the budget. Builds of files like ones measured before run together
(:class:`~serving.version_loader.BuildGate`) and keep the earlier measurement when theirs is
larger: a reload of the same files, or a new version whose model files have the same names and
sizes as a measured version of the same model (a new round of the same architecture; the
metadata, and so a different ``max_batch_size``, is not compared, which matters on CUDA only,
where the warm-up runs at the largest batch). What remains (request buffers, other sessions'
runs, another load's verification) only adds, so a version keeps the smallest of its
measurements as its estimate and is refused as too large only when even that exceeds the
budget. Pools are built, closed and drained outside the state lock.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from serving.config_schema import ConfigError
from serving.errors import BadRequest, NotFound, ServingError, Unavailable
from serving.layout import METADATA_FILE, requested_version
from serving.memory_probe import MemorySample
from serving.pool import EnginePool
from serving.registry import ModelRegistry
from serving.scheduler_allocation import DemandMeter, allocate
from serving.scheduler_budget import Budget
from serving.settings import ServingConfig
from serving.statistics import ModelStatistics
from serving.version_loader import BuildGate, LoadError, PoolFactory, load_version, release

log = logging.getLogger(__name__)

READY, LOADING, UNLOADING, UNAVAILABLE = "READY", "LOADING", "UNLOADING", "UNAVAILABLE"
#: seconds; the cold-start histogram's buckets (first request to a non-resident version -> ready)
COLD_START_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
#: how often a load waiting for an in-flight version to go idle looks again
ROOM_POLL_S = 0.02
#: the least time between two rounds of engine reassignment
REBALANCE_MIN_S = 0.2
#: loads in progress at once. A load waiting for room (a busy version to go idle, another load's
#: reservation) or for the build gate holds its thread but no CPU; with 4 threads, the cold starts
#: of small versions queued 150-300 ms (p99) behind ResNet-18 loads that waited for each other
LOAD_THREADS = 16
#: a never-measured model's reservation: its files' size times this, plus the largest run memory
#: measured so far
FIRST_LOAD_MARGIN = 1.25


class Refused(Exception):
    """An eager load that does not fit without evicting something: not an error, not tried."""


@dataclass
class _Version:
    model: str
    version: int
    stats: ModelStatistics
    state: str = UNAVAILABLE
    reason: str = "not loaded"
    pool: EnginePool | None = None
    lease: str | None = None
    #: the load in progress (shared by every request waiting for it)
    future: Future | None = None
    #: the load may evict others (a request, a swap, a pin, the control API)
    evict: bool = False
    #: bytes reserved while loading (0 once the pool measured itself)
    reserved: int = 0
    #: monotonic time the first request started waiting for it (cold start), 0 if none waits
    waiting_since: float = 0.0
    #: smallest measured size (0 before the first load): the closest to what it holds
    measured: int = 0
    #: largest measured size: what a reload reserves, so that one measuring a little more than
    #: the last does not take the memory over the budget until it re-checks its room
    largest: int = 0
    #: the (session, run) samples of its smallest measurement: what a rebuild built next to
    #: others holds instead of its own, larger, measurement
    samples: tuple[MemorySample, MemorySample] | None = None
    failure: str | None = None
    failure_stamp: Any = None
    #: the directory stamp it was last verified at (a reload with the same stamp skips verify)
    verified_stamp: Any = None
    last_load_s: float = 0.0
    #: where the load in progress spent its time before its build (seconds; see _load)
    stages: dict[str, float] = field(default_factory=dict)
    #: perf_counter when the load in progress was handed to a loader thread
    submitted_at: float = 0.0

    @property
    def key(self) -> str:
        return f"{self.model}:{self.version}"


@dataclass
class _Model:
    #: versions the repository holds that its policy may serve, newest first
    candidates: list[int] = field(default_factory=list)
    #: how many of them to serve
    count: int = 1
    versions: dict[int, _Version] = field(default_factory=dict)
    #: unloaded through the model control API: not loaded again until loaded through it
    unloaded: bool = False
    loads: int = 0
    evictions: int = 0
    cold_starts: list[int] = field(default_factory=lambda: [0] * (len(COLD_START_BUCKETS) + 1))
    cold_start_sum: float = 0.0


@dataclass(frozen=True)
class VersionView:
    """One known version as the index, the statistics and the metrics see it."""

    model: str
    version: int
    state: str
    reason: str
    engines: int
    memory_bytes: int
    pinned: bool
    stats: ModelStatistics
    #: why it failed to load (it is retried when its directory changes), else None
    failure: str | None


@dataclass(frozen=True)
class ModelCounters:
    loads: int
    evictions: int
    #: cumulative counts per COLD_START_BUCKETS bound, then +Inf
    cold_start_buckets: tuple[int, ...]
    cold_start_sum: float


class Scheduler:
    """Loads, evicts and assigns engines under one budget (see the module docstring)."""

    def __init__(
        self,
        repository: Any,
        registry: ModelRegistry,
        settings: ServingConfig | None = None,
        *,
        drain_timeout_s: float = 30.0,
        pool_factory: PoolFactory = EnginePool,
        budget: Budget | None = None,
    ) -> None:
        self.repository = repository
        self.registry = registry
        self.settings = settings = settings or ServingConfig()
        self.budget = budget or Budget.resolve(settings)
        self.on_demand = settings.load == "on_demand"
        self.load_timeout_s = float(settings.load_timeout_s)
        self.drain_timeout_s = float(drain_timeout_s)
        self.pool_factory = pool_factory
        self._pins = _parse_pins(settings.pin)
        self._lock = threading.RLock()
        #: held while engines are moved or a new version takes its first: the engine count
        #: never exceeds the budget because two of these race
        self._engines_lock = threading.Lock()
        #: engines claimed by loads in progress (not yet in a published pool)
        self._claimed = 0
        #: held while a load picks and unloads its victims, so two loads never evict for the
        #: same shortage twice
        self._room_lock = threading.Lock()
        #: a version's first build runs alone, so the heap growth it measures is its own;
        #: rebuilds run together (see the module docstring)
        self._builds = BuildGate()
        self._models: dict[str, _Model] = {}
        self._loader = ThreadPoolExecutor(LOAD_THREADS, thread_name_prefix="scheduler-load")
        self._demand = DemandMeter(settings.budget.rebalance_s)
        self._kick = threading.Event()
        self._stop = threading.Event()
        self._rebalancer: threading.Thread | None = None
        #: re-reads one model from the repository (set by the watcher): what an explicit load
        #: does first, as Triton's load re-reads the model
        self.rescan: Callable[[str], None] | None = None
        #: (model, version) -> load timing (see :mod:`serving.version_loader`)
        self.timings: dict[tuple[str, int], dict[str, float | None]] = {}
        self.swaps = 0
        self.peak_memory_bytes = 0
        #: the most working memory (what runs leave in the arena) a loaded version has measured
        self._largest_run_bytes = 0
        log.info("scheduler budget: %s", self.budget.describe())

    # ---- the repository's view (fed by the watcher)

    def update(self, model: str, candidates: list[int], count: int, *, load: bool = True) -> bool:
        """The repository holds ``candidates`` of ``model`` (newest first) and its policy serves
        ``count`` of them. Loads what the mode wants (waiting for it), then unloads what the
        newly loaded versions supersede. True when anything was loaded or unloaded.

        What is loaded: a pinned version always; in eager mode every served version that fits
        without evicting anything; in both modes, for a model in use (a version loaded), a
        served version that is new (published, or fixed after a failure, since the last update)
        and newer than its newest loaded one: a hot swap, evicting if needed."""
        with self._lock:
            m = self._models.setdefault(model, _Model())
            previous = set(m.candidates)
            m.candidates, m.count = list(candidates), int(count)
            for v in candidates:
                if v not in m.versions:
                    m.versions[v] = _Version(model, v, ModelStatistics(model, v))
            for v in [v for v, ver in m.versions.items() if v not in candidates]:
                if m.versions[v].state == UNAVAILABLE and m.versions[v].future is None:
                    del m.versions[v]
            fresh = (set(candidates) - previous) | self._retry_changed(m)
            in_use = [v for v, ver in m.versions.items() if ver.state in (READY, LOADING)]
            newest_in_use = max(in_use, default=0)
            loaded_before = [v for v, ver in m.versions.items() if ver.state == READY]
        if not load:
            return False
        keep: list[int] = []
        changed = False
        for v in candidates:
            if len(keep) >= count:
                break
            ver = m.versions[v]
            if ver.state == READY:
                keep.append(v)
                continue
            if ver.failure is not None or m.unloaded:
                continue
            swap = bool(in_use) and v in fresh and v > newest_in_use
            pinned = self._pinned(ver)
            if not (pinned or swap or not self.on_demand):
                continue
            try:
                self._ensure_loading(ver, evict=pinned or swap).result()
            except (LoadError, Refused, ServingError):
                continue
            keep.append(v)
            changed = True
        with self._lock:
            loaded = [v for v, ver in m.versions.items() if ver.state == READY]
        for v in sorted(set(loaded) - set(keep)):
            if keep and v > min(keep) and v in candidates:
                continue  # never drop a newer loaded version for an older one
            if not keep and v in candidates:
                continue  # nothing took its place
            superseded = f"superseded by version {max(keep)}" if keep else "removed"
            self._unload(m.versions[v], superseded)
            changed = True
        if changed and loaded_before:
            self.swaps += 1
        return changed

    def forget_others(self, present: Iterable[str]) -> bool:
        """Models not in ``present`` left the repository: unload and forget them."""
        present = set(present)
        with self._lock:
            gone = [name for name in self._models if name not in present]
        for name in gone:
            with self._lock:
                versions = list(self._models[name].versions.values())
            for ver in versions:
                self._unload(ver, "removed from the repository")
            with self._lock:
                self._models.pop(name, None)
        return bool(gone)

    # ---- lifecycle

    def start(self) -> None:
        """Load the pins (refusing to start when they do not fit the budget), then, in eager
        mode, every model's wanted versions; start reassigning engines by demand."""
        pinned = self._pinned_versions()
        fitting = self.budget.versions_fitting()
        if fitting is not None and len(pinned) > fitting:
            per = self.budget.engines_per_version or 1
            raise ConfigError(
                f"serving.pin keeps {len(pinned)} versions resident ({_keys(pinned)}), each with "
                f">= {per} engine(s), but serving.budget.engines={self.budget.engines}; raise "
                f"serving.budget.engines to >= {len(pinned) * per} or pin fewer"
            )
        for ver in pinned:
            try:
                self._ensure_loading(ver, evict=True).result()
            except (LoadError, ServingError) as exc:
                message = exc.message if isinstance(exc, ServingError) else str(exc)
                raise ConfigError(f"pinned version {ver.key} cannot be loaded: {message}") from exc
        if not self.on_demand:
            with self._lock:
                models = sorted(self._models.items())
            for name, m in models:
                self.update(name, m.candidates, m.count)
        if self.budget.engines_per_version is None and self._rebalancer is None:
            self._rebalancer = threading.Thread(
                target=self._rebalance_loop, name="scheduler-rebalance", daemon=True
            )
            self._rebalancer.start()
            self._kick.set()

    def stop(self) -> None:
        """Stop loading and rebalancing; unload every version (draining) and release its lease."""
        self._stop.set()
        self._kick.set()
        if self._rebalancer is not None:
            self._rebalancer.join(30)
        self._loader.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            versions = [v for m in self._models.values() for v in m.versions.values()]
            for ver in versions:  # loads cancelled before they started: answer their waiters
                fut, ver.future = ver.future, None
                if fut is not None and not fut.done():
                    ver.state, ver.reason, ver.reserved = UNAVAILABLE, "server stopped", 0
                    fut.set_exception(Unavailable("the server is stopping"))
        for ver in versions:
            self._unload(ver, "server stopped")

    # ---- requests

    def request(self, model: str, version: int | str | None = None) -> Future:
        """The pool for ``model`` at ``version`` (None/"": the newest one its policy serves), as
        a future: done when loaded, else the (shared) load. Raises NotFound for what is not
        served."""
        with self._lock:
            if self._stop.is_set():
                raise Unavailable("the server is stopping")
            m = self._models.get(model)
            if m is None:
                known = ", ".join(sorted(self._models)) or "none"
                raise NotFound(f"unknown model '{model}'; models in the repository: {known}")
            if m.unloaded:
                raise NotFound(
                    f"model '{model}' was unloaded through the model control API; "
                    f"POST /v2/repository/models/{model}/load to load it"
                )
            wanted = self._wanted(m)
            if version is None or version == "":
                if not wanted:
                    raise NotFound(f"model '{model}' has no loadable version{self._failures(m)}")
                ver = m.versions[wanted[0]]
            else:
                v = requested_version(version)
                ver = m.versions.get(v) if v is not None else None
                if ver is None or v not in m.candidates[: max(m.count, len(wanted))]:
                    raise NotFound(
                        f"unknown version {version!r} of model '{model}'; versions served: "
                        f"{sorted(wanted)}"
                    )
                if ver.failure is not None:
                    raise NotFound(
                        f"version {v} of model '{model}' cannot be served: {ver.failure}"
                    )
            if ver.state != READY and not ver.waiting_since:
                ver.waiting_since = time.monotonic()
            return self._ensure_loading(ver, evict=True)

    async def acquire(self, model: str, version: int | str | None = None) -> EnginePool:
        """Await the pool for ``model`` at ``version``, loading it if needed (see
        :meth:`request`): 503 + Retry-After past ``serving.load_timeout_s``; when the newest
        version fails to load, the next one the policy allows is tried."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.load_timeout_s
        while True:
            fut = self.request(model, version)
            try:
                if fut.done():
                    return fut.result()
                wait = asyncio.shield(asyncio.wrap_future(fut))
                return await asyncio.wait_for(wait, max(0.0, deadline - loop.time()))
            except TimeoutError:
                raise Unavailable(
                    f"model '{model}' is still loading after serving.load_timeout_s="
                    f"{self.load_timeout_s:g} s; retry",
                    retry_after_s=self._expected_load_s(model),
                ) from None
            except Refused as exc:
                raise Unavailable(str(exc)) from None
            except LoadError as exc:
                if version not in (None, ""):
                    raise Unavailable(str(exc)) from None
                if loop.time() >= deadline:
                    raise Unavailable(str(exc)) from None
                # the failure is recorded: the next request() picks the next version

    # ---- model control (Triton's explicit mode)

    def load_model(self, model: str) -> None:
        """Load ``model``'s wanted versions now (also after an explicit unload). NotFound for a
        model the repository lacks; BadRequest naming the reason when a version fails to load
        (what was loaded stays loaded). The model is read from the repository again first."""
        if self.rescan is not None:
            self.rescan(model)
        with self._lock:
            m = self._models.get(model)
            if m is None:
                known = ", ".join(sorted(self._models)) or "none"
                raise NotFound(f"unknown model '{model}'; models in the repository: {known}")
            m.unloaded = False
            self._retry_changed(m)
            wanted = self._wanted(m)
            if not wanted:
                raise BadRequest(
                    f"failed to load model '{model}': no loadable version{self._failures(m)}"
                )
            futures = [self._ensure_loading(m.versions[v], evict=True) for v in wanted]
        errors = []
        for fut in futures:
            try:
                fut.result()
            except (LoadError, Refused) as exc:
                errors.append(str(exc))
            except ServingError as exc:
                errors.append(exc.message)
        if errors:
            raise BadRequest(f"failed to load model '{model}': {'; '.join(errors)}")

    def unload_model(self, model: str) -> None:
        """Unload every version of ``model`` (in-flight requests finish) and keep it unloaded
        until :meth:`load_model`. NotFound for a model the repository lacks."""
        with self._lock:
            m = self._models.get(model)
            if m is None:
                known = ", ".join(sorted(self._models)) or "none"
                raise NotFound(f"unknown model '{model}'; models in the repository: {known}")
            m.unloaded = True
            versions = list(m.versions.values())
            for ver in versions:
                if ver.state == UNAVAILABLE and ver.failure is None:
                    ver.reason = "unloaded through the model control API"
        for ver in versions:
            fut = ver.future
            if fut is not None:
                try:
                    fut.result()
                except Exception:  # noqa: BLE001 - a failed load leaves nothing to unload
                    pass
            self._unload(ver, "unloaded through the model control API")

    def index(self, ready_only: bool = False) -> list[dict[str, str]]:
        """Triton's repository index: every version the repository serves, with its state."""
        entries = []
        for view in self.versions():
            if ready_only and view.state != READY:
                continue
            entries.append(
                {
                    "name": view.model,
                    "version": str(view.version),
                    "state": view.state,
                    "reason": view.reason,
                }
            )
        return entries

    def statistics(
        self, model: str | None = None, version: int | str | None = None
    ) -> list[ModelStatistics]:
        """Statistics of the loaded versions (of ``model``), or of one known ``version``."""
        with self._lock:
            if model is None:
                return [
                    ver.stats
                    for _, m in sorted(self._models.items())
                    for _, ver in sorted(m.versions.items())
                    if ver.state == READY
                ]
            m = self._models.get(model)
            if m is None:
                raise NotFound(f"unknown model '{model}'")
            if version is None or version == "":
                return [ver.stats for _, ver in sorted(m.versions.items()) if ver.state == READY]
            v = requested_version(version)
            ver = m.versions.get(v) if v is not None else None
            if ver is None:
                raise NotFound(
                    f"unknown version {version!r} of model '{model}'; known versions: "
                    f"{sorted(m.versions)}"
                )
            return [ver.stats]

    # ---- introspection

    def versions(self) -> list[VersionView]:
        """Every version the repository serves, loaded or not, by model and version."""
        with self._lock:
            views = []
            for name, m in sorted(self._models.items()):
                for v in sorted(m.versions):
                    ver = m.versions[v]
                    pool = ver.pool
                    views.append(
                        VersionView(
                            name,
                            v,
                            ver.state,
                            ver.reason,
                            pool.engine_count if pool is not None else 0,
                            pool.memory_bytes() if pool is not None else 0,
                            self._pinned(ver),
                            ver.stats,
                            ver.failure,
                        )
                    )
            return views

    def counters(self) -> dict[str, ModelCounters]:
        """Loads, evictions and cold starts per model."""
        with self._lock:
            out = {}
            for name, m in sorted(self._models.items()):
                cumulative, running = [], 0
                for c in m.cold_starts:
                    running += c
                    cumulative.append(running)
                out[name] = ModelCounters(m.loads, m.evictions, tuple(cumulative), m.cold_start_sum)
            return out

    def memory_used(self) -> int:
        """Bytes the loaded versions hold plus what loads in progress reserved."""
        with self._lock:
            return self._used()

    # ---- loading

    def _ensure_loading(self, ver: _Version, *, evict: bool) -> Future:
        """The version's pool as a future: done when loaded, else its load (started here if
        none runs). Called with or without the lock held."""
        with self._lock:
            if ver.state == READY and ver.pool is not None:
                done: Future = Future()
                done.set_result(ver.pool)
                return done
            if ver.future is not None:
                ver.evict = ver.evict or evict
                return ver.future
            if ver.failure is not None:
                failed: Future = Future()
                failed.set_exception(LoadError(ver.failure))
                return failed
            if self._stop.is_set():
                raise Unavailable("the server is stopping")
            ver.future = Future()
            ver.evict = evict
            ver.submitted_at = time.perf_counter()
            if ver.state != UNLOADING:  # else the load starts once the unload is done
                ver.state, ver.reason = LOADING, "loading"
            fut = ver.future
        try:
            self._loader.submit(self._load_job, ver)
        except RuntimeError:  # the loader was shut down
            with self._lock:
                ver.future, ver.state, ver.reason = None, UNAVAILABLE, "server stopped"
            raise Unavailable("the server is stopping") from None
        return fut

    def _load_job(self, ver: _Version) -> None:
        fut = ver.future
        assert fut is not None
        try:
            pool = self._load(ver)
        except BaseException as exc:  # noqa: BLE001 - handed to every waiter
            with self._lock:
                ver.future = None
                ver.reserved = 0
                ver.waiting_since = 0.0
                if ver.state == LOADING:
                    ver.state = UNAVAILABLE
                    ver.reason = str(exc) if ver.failure is None else ver.failure
            fut.set_exception(exc)
            return
        with self._lock:
            ver.future = None
        fut.set_result(pool)
        self._kick.set()

    def _load(self, ver: _Version) -> EnginePool:
        """Make room, load, measure, publish (runs on the loader thread). Stamps where the time
        before the build went (``ver.stages``): waiting for a loader thread, making room, taking
        an engine; the build adds its wait for the build gate."""
        started = time.perf_counter()
        ver.stages = {"queued_s": started - ver.submitted_at}
        deadline = time.monotonic() + self.drain_timeout_s + 1.0
        while True:  # requested again while its unload drains: let the unload finish
            with self._lock:
                if ver.state != UNLOADING:
                    ver.state, ver.reason = LOADING, "loading"
                    break
            if time.monotonic() > deadline:
                raise Unavailable(f"{ver.key} is still being unloaded; retry")
            time.sleep(ROOM_POLL_S)
        need, floor = self._estimate(ver)
        budget = self.budget.memory_bytes
        if floor > budget:
            self._record_failure(
                ver,
                f"version {ver.version} of model '{ver.model}' needs at least {floor} bytes "
                f"(its files), more than serving.budget.memory_bytes={budget}",
            )
            raise LoadError(ver.failure)
        t0 = time.perf_counter()
        self._make_room(ver, min(need, budget))
        t1 = time.perf_counter()
        engines = self.budget.engines_per_version or 1
        with self._engines_lock:  # its engines are claimed: no rebalance hands them elsewhere
            if self.budget.engines_per_version is None:
                self._free_an_engine()
            self._claimed += engines
        ver.stages["room_s"] = t1 - t0
        ver.stages["engine_s"] = time.perf_counter() - t1
        try:
            return self._load_reserved(ver, engines)
        finally:
            with self._engines_lock:
                self._claimed -= engines

    def _load_reserved(self, ver: _Version, engines: int) -> EnginePool:
        """Load a version that holds its reservation and its engines, measure it, publish it."""
        budget = self.budget.memory_bytes
        t0 = time.perf_counter()
        stamp = self._stamp(ver)
        # files loaded before and unchanged (a reload after an eviction): verified already
        verified = stamp is not None and stamp == ver.verified_stamp
        # a measurement of the same files, or of a version of the same model whose files have the
        # same names and sizes (a new round of the same architecture): no new measurement needed
        reference = self._measured_like(ver, stamp)
        try:
            loaded = load_version(
                self.repository,
                ver.model,
                ver.version,
                self.settings,
                pool_factory=self.pool_factory,
                engines=engines,
                stats=ver.stats,
                verified=verified,
                gate=self._builds.together() if reference else self._builds.alone(),
            )
        except LoadError as exc:
            with self._lock:
                ver.reserved = 0
            self._record_failure(ver, str(exc))
            log.error("skipping %s version %d: %s", ver.model, ver.version, exc)
            raise
        pool = loaded.pool
        if reference is not None and pool.memory_bytes() > reference[0]:
            pool.adopt_memory(*reference[1])
        measured = pool.memory_bytes()
        with self._lock:
            ver.pool, ver.lease, ver.reserved = pool, loaded.lease, 0
            ver.verified_stamp = stamp
            if reference is None:
                self._largest_run_bytes = max(self._largest_run_bytes, pool.working_bytes())
            # concurrent loads can only add to a measurement: the smallest is the closest
            if not ver.measured or measured <= ver.measured:
                ver.samples = (pool.session_memory, pool.run_memory)
            ver.measured = min(measured, ver.measured) if ver.measured else measured
            ver.largest = max(measured, ver.largest)
            ver.last_load_s = time.perf_counter() - t0
        if ver.measured > budget:  # its smallest measurement: one inflated by noise is no verdict
            self._discard(ver)
            self._record_failure(
                ver,
                f"version {ver.version} of model '{ver.model}' holds {ver.measured} bytes "
                f"(measured at load), more than serving.budget.memory_bytes={budget}",
            )
            raise LoadError(ver.failure)
        try:
            self._make_room(ver, 0)  # the measurement may exceed the reservation
        except (Refused, ServingError):
            self._discard(ver)
            raise
        self._publish(ver, loaded.timing)
        return pool

    def _publish(self, ver: _Version, timing: dict[str, float | None]) -> None:
        pool = ver.pool
        assert pool is not None
        cold = ""
        with self._lock:
            m = self._models.get(ver.model)
            gone = m is None or m.versions.get(ver.version) is not ver
            if m is not None and not gone:
                ver.state, ver.reason = READY, ""
                m.loads += 1
                if ver.waiting_since:
                    seconds = time.monotonic() - ver.waiting_since
                    self._observe_cold_start(m, seconds)
                    cold = f", cold start {seconds:.3f} s"
                ver.waiting_since = 0.0
                self.peak_memory_bytes = max(self.peak_memory_bytes, self._used())
        if gone:  # the model left the repository while this version loaded
            self._discard(ver)
            raise LoadError(f"{ver.key} was removed from the repository while it loaded")
        t0 = time.perf_counter()
        self.registry.add(pool)
        timing.update(ver.stages)
        timing["swap_s"] = time.perf_counter() - t0
        timing["serving_at"] = time.time()
        self.timings[(ver.model, ver.version)] = timing
        log.info(
            "serving %s version %d (providers %s, %.1f MB%s)",
            ver.model,
            ver.version,
            pool.obtained_providers,
            pool.memory_bytes() / 1e6,
            cold,
        )
        log.info("swap timing %s", _json({"model": ver.model, "version": ver.version, **timing}))

    def _discard(self, ver: _Version) -> None:
        """Drop a pool that was built but never published."""
        with self._lock:
            pool, lease = ver.pool, ver.lease
            ver.pool = ver.lease = None
            ver.reserved = 0
        if pool is not None:
            pool.close(self.drain_timeout_s)
        release(self.repository, ver.model, ver.version, lease)

    def _record_failure(self, ver: _Version, reason: str) -> None:
        with self._lock:
            ver.failure = reason
            ver.failure_stamp = self._stamp(ver)
            ver.state, ver.reason = UNAVAILABLE, reason

    def _retry_changed(self, m: _Model) -> set[int]:
        """Forget failures whose version directory changed since; returns those versions (lock
        held)."""
        cleared = set()
        for ver in m.versions.values():
            if ver.failure is not None and self._stamp(ver) != ver.failure_stamp:
                log.info("%s changed since it failed to load; trying it again", ver.key)
                ver.failure = ver.failure_stamp = None
                ver.state, ver.reason = UNAVAILABLE, "not loaded"
                cleared.add(ver.version)
        return cleared

    def _stamp(self, ver: _Version) -> Any:
        """Names, sizes and mtimes of the version directory's files (None if unreadable)."""
        try:
            vdir = self.repository.version_dir(ver.model, ver.version)
            with os.scandir(vdir) as entries:
                files = sorted(
                    (e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in entries if e.is_file()
                )
            return (os.stat(vdir).st_mtime_ns, tuple(files))
        except (OSError, AttributeError, ValueError):
            return None

    def _measured_like(
        self, ver: _Version, stamp: Any
    ) -> tuple[int, tuple[MemorySample, MemorySample]] | None:
        """(bytes, samples) of the smallest measurement of files like ``ver``'s (``stamp``): its
        own, or another version's of the same model with the same file names and sizes; None
        when there is none and its build must measure alone."""
        if stamp is None:
            return None
        shape = _file_shape(stamp)
        with self._lock:
            m = self._models.get(ver.model)
            like = [
                (o.measured, o.samples)
                for o in (m.versions.values() if m is not None else ())
                if o.samples is not None
                and o.verified_stamp is not None
                and _file_shape(o.verified_stamp) == shape
            ]
        return min(like, key=lambda item: item[0]) if like else None

    def _estimate(self, ver: _Version) -> tuple[int, int]:
        """(bytes to reserve, bytes it holds at least) before a version is measured (see the
        module docstring); the floor is 0 when its files cannot be read."""
        try:
            path = self.repository.model_path(ver.model, ver.version)
            files = sum(p.stat().st_size for p in path.parent.iterdir() if p.is_file())
        except (OSError, AttributeError):
            files = 0
        if ver.largest:
            return ver.largest, files
        with self._lock:
            m = self._models.get(ver.model)
            same_model = [o.largest for o in m.versions.values() if o.largest] if m else []
        if same_model:
            return max(same_model), files
        return int(files * FIRST_LOAD_MARGIN) + self._largest_run_bytes, files

    # ---- making room

    def _used(self) -> int:
        """Bytes held by loaded (and unloading) versions plus reservations (lock held)."""
        total = 0
        for m in self._models.values():
            for ver in m.versions.values():
                if ver.pool is not None:
                    total += ver.pool.memory_bytes()
                else:
                    total += ver.reserved
        return total

    def _resident(self) -> int:
        """Versions holding (or about to hold) engines (lock held)."""
        return sum(
            1
            for m in self._models.values()
            for ver in m.versions.values()
            if ver.pool is not None or ver.reserved or ver.state == UNLOADING
        )

    def _make_room(self, ver: _Version, need: int) -> None:
        """Reserve ``need`` bytes and a resident slot for ``ver``, evicting as allowed (see the
        module docstring). Raises Refused (no eviction allowed) or Unavailable (gave up).

        The room lock is held while victims are picked and unloaded, never while waiting for a
        busy version to go idle: a load that has finished building and only re-checks its room
        (``need`` 0) must be able to publish meanwhile, and it is often that very load whose
        publication frees the room the waiter needs (its requests end, it becomes evictable)."""
        deadline = time.monotonic() + self.load_timeout_s
        while True:
            with self._room_lock:
                shortage = self._claim_room(ver, need)
            if shortage is None:
                return
            if self._stop.is_set():
                raise Unavailable("the server is stopping")
            if time.monotonic() > deadline:
                raise Unavailable(self._no_room(ver, shortage))
            time.sleep(ROOM_POLL_S)

    def _claim_room(self, ver: _Version, need: int) -> str | None:
        """One attempt of :meth:`_make_room` (room lock held): reserve, evicting idle versions
        as needed. None when reserved; else the shortage only waiting can cure (a version that
        could make room has requests in flight). Raises Refused or Unavailable."""
        fitting = self.budget.versions_fitting()
        while True:
            with self._lock:
                holds_slot = ver.pool is not None or ver.reserved > 0
                over_bytes = self._used() + need - self.budget.memory_bytes
                over_slots = (
                    0 if fitting is None else self._resident() + (0 if holds_slot else 1) - fitting
                )
                if over_bytes <= 0 and over_slots <= 0:
                    if ver.pool is None:
                        ver.reserved = max(need, 1)
                    return None
                shortage = self._shortage(over_bytes, over_slots, fitting)
                if not ver.evict:
                    ver.state, ver.reason = UNAVAILABLE, f"not loaded: {shortage}"
                    raise Refused(f"version {ver.version} of model '{ver.model}': {shortage}")
                victims = self._victims(ver, over_bytes, over_slots) or []
                retired = [o for o in victims if self._superseded(o, ver)]
                waitable = not victims and self._waitable(ver)
            if not victims:
                if not waitable:
                    raise Unavailable(self._no_room(ver, shortage))
                return shortage
            for victim in victims:
                if victim in retired:
                    self._unload(victim, f"superseded by version {ver.version}")
                else:
                    reason = f"evicted (least recently used) to load {ver.key}"
                    self._unload(victim, reason, eviction=True)

    @staticmethod
    def _no_room(ver: _Version, shortage: str) -> str:
        return (
            f"cannot load version {ver.version} of model '{ver.model}': {shortage}; "
            "every other version is pinned or has requests in flight"
        )

    def _shortage(self, over_bytes: int, over_slots: int, fitting: int | None) -> str:
        parts = []
        if over_bytes > 0:
            parts.append(
                f"{over_bytes} bytes over serving.budget.memory_bytes="
                f"{self.budget.memory_bytes} ({self._used()} held)"
            )
        if over_slots > 0:
            parts.append(
                f"serving.budget.engines={self.budget.engines} holds {fitting} loaded versions"
            )
        return " and ".join(parts)

    def _victims(self, ver: _Version, over_bytes: int, over_slots: int) -> list[_Version] | None:
        """The least recently used idle versions whose unloading covers both shortages; else,
        for a swap, those and the older loaded versions of ``ver``'s model; else None (lock
        held)."""
        idle = sorted(
            (
                o
                for m in self._models.values()
                for o in m.versions.values()
                if o.state == READY
                and o.pool is not None
                and o is not ver
                and not self._pinned(o)
                and o.pool.outstanding == 0
            ),
            key=lambda o: o.pool.last_used if o.pool is not None else 0.0,
        )
        chosen = self._cover(idle, over_bytes, over_slots)
        if chosen is not None:
            return chosen
        older = (
            [
                o
                for o in self._models[ver.model].versions.values()
                if o.state == READY
                and o.pool is not None
                and o.version < ver.version
                and o not in idle
            ]
            if ver.model in self._models
            else []
        )
        return self._cover([*idle, *older], over_bytes, over_slots)

    def _superseded(self, victim: _Version, ver: _Version) -> bool:
        """Whether unloading ``victim`` to load ``ver`` retires it (a newer version of its model
        takes its place and its policy no longer serves it) rather than evicts it (lock held)."""
        m = self._models.get(victim.model)
        return (
            victim.model == ver.model
            and victim.version < ver.version
            and m is not None
            and victim.version not in self._wanted(m)
        )

    @staticmethod
    def _cover(options: list[_Version], over_bytes: int, over_slots: int) -> list[_Version] | None:
        chosen, freed = [], 0
        for o in options:
            if freed >= over_bytes and len(chosen) >= over_slots:
                break
            chosen.append(o)
            freed += o.pool.memory_bytes() if o.pool is not None else 0
        if freed >= over_bytes and len(chosen) >= over_slots:
            return chosen
        return None

    def _waitable(self, ver: _Version) -> bool:
        """Whether waiting can make room: another unpinned version holds room it gives up once
        idle: loaded (busy now), being unloaded, or loading with its room reserved (lock
        held)."""
        return any(
            o is not ver
            and not self._pinned(o)
            and (
                o.state in (READY, UNLOADING)
                or (o.state == LOADING and (o.reserved > 0 or o.pool is not None))
            )
            for m in self._models.values()
            for o in m.versions.values()
        )

    def _unload(self, ver: _Version, reason: str, *, eviction: bool = False) -> None:
        """Unload ``ver`` if loaded: out of the registry, drained, lease released."""
        with self._lock:
            if ver.state != READY or ver.pool is None:
                return
            ver.state = UNLOADING
            pool, lease = ver.pool, ver.lease
            m = self._models.get(ver.model)
            if eviction and m is not None:
                m.evictions += 1
        self.registry.remove(ver.model, ver.version)
        try:
            pool.close(self.drain_timeout_s)
        finally:
            release(self.repository, ver.model, ver.version, lease)
            with self._lock:
                if ver.pool is pool:
                    ver.pool = ver.lease = None
                if ver.state == UNLOADING:
                    ver.state, ver.reason = UNAVAILABLE, reason
            self._kick.set()
        log.info("unloaded %s version %d (%s)", ver.model, ver.version, reason)

    # ---- engines

    def _free_an_engine(self) -> None:
        """Before a new version takes its first engine: if the budget's engines are all held,
        drain one from the version holding the most (it keeps >= 1)."""
        engines = self.budget.engines
        if engines is None:
            return
        with self._lock:
            pools = [
                ver.pool
                for m in self._models.values()
                for ver in m.versions.values()
                if ver.state == READY and ver.pool is not None
            ]
        for pool in pools:
            pool.reap()
        held = sum(p.engine_count + len(p.draining) for p in pools) + self._claimed
        if held < engines or not pools:
            return
        richest = max(pools, key=lambda p: p.engine_count)
        worker = richest.remove_engine()
        if worker is not None:
            worker.join(self.drain_timeout_s)
            richest.reap()

    def _rebalance_loop(self) -> None:
        period = self.settings.budget.rebalance_s
        while not self._stop.is_set():
            self._kick.wait(period)
            # loads and unloads kick it; under churn, one round per REBALANCE_MIN_S is enough
            if self._stop.wait(min(REBALANCE_MIN_S, period)):
                return
            self._kick.clear()
            try:
                self.rebalance()
            except Exception:  # noqa: BLE001 - the rebalancer must survive a bad round
                log.exception("rebalancing engines failed")

    def rebalance(self) -> dict[str, int]:
        """Re-spread the engine budget over the loaded versions by demand (see the module
        docstring); returns the engines per version ("model:version") afterwards."""
        total = self.budget.engines
        with self._lock:
            pools = {
                ver.key: ver.pool
                for m in self._models.values()
                for ver in m.versions.values()
                if ver.state == READY and ver.pool is not None
            }
        if self.budget.engines_per_version is not None or total is None or not pools:
            return {k: p.engine_count for k, p in pools.items()}
        with self._engines_lock:
            return self._rebalance(pools, total - self._claimed)

    def _rebalance(self, pools: dict[str, EnginePool], total: int) -> dict[str, int]:
        now = time.monotonic()
        demand = {}
        for key, pool in pools.items():
            pool.reap()
            demand[key] = self._demand.sample(
                key, pool.arrived_rows, pool.outstanding_seconds(), pool.row_seconds(), now
            )
        self._demand.forget(set(pools))
        held = {k: p.engine_count for k, p in pools.items()}
        target = allocate(demand, held, total)
        for key, pool in pools.items():  # drain first, so the budget is never exceeded
            while pool.engine_count > target[key]:
                worker = pool.remove_engine()
                if worker is None:
                    break
                worker.join(self.drain_timeout_s)
                pool.reap()
        for key, pool in pools.items():
            while pool.engine_count < target[key] and not pool.closed:
                if not self._can_grow(pool):
                    break
                try:
                    pool.add_engine()
                except ServingError:
                    break
        with self._lock:
            self.peak_memory_bytes = max(self.peak_memory_bytes, self._used())
        after = {k: p.engine_count for k, p in pools.items()}
        if after != held:
            log.info("engines by demand: %s (demand %s)", after, _rounded(demand))
        return after

    def _can_grow(self, pool: EnginePool) -> bool:
        """Whether one more engine's working memory fits the budget."""
        with self._lock:
            extra = pool.memory_bytes(pool.engine_count + 1) - pool.memory_bytes()
            return self._used() + extra <= self.budget.memory_bytes

    # ---- helpers (lock held)

    def _wanted(self, m: _Model) -> list[int]:
        """The versions to serve: the first ``count`` candidates that have not failed."""
        return [v for v in m.candidates if m.versions[v].failure is None][: m.count]

    @staticmethod
    def _in_use(m: _Model) -> bool:
        return any(ver.state in (READY, LOADING) for ver in m.versions.values())

    def _pinned(self, ver: _Version) -> bool:
        if ver.model not in self._pins:
            return False
        versions = self._pins[ver.model]
        if versions is None:
            m = self._models.get(ver.model)
            return m is not None and ver.version in self._wanted(m)
        return ver.version in versions

    def _pinned_versions(self) -> list[_Version]:
        with self._lock:
            pinned = []
            for name, versions in sorted(self._pins.items()):
                m = self._models.get(name)
                if m is None:
                    known = ", ".join(sorted(self._models)) or "none"
                    raise ConfigError(
                        f"serving.pin names model '{name}', which the repository does not hold "
                        f"(models: {known})"
                    )
                chosen = self._wanted(m) if versions is None else sorted(versions)
                for v in chosen:
                    if v not in m.versions:
                        raise ConfigError(
                            f"serving.pin names {name}:{v}, which the repository does not serve "
                            f"(versions: {sorted(m.versions)})"
                        )
                    pinned.append(m.versions[v])
            return pinned

    def _failures(self, m: _Model) -> str:
        reasons = [ver.failure for _, ver in sorted(m.versions.items()) if ver.failure]
        return f": {'; '.join(reasons)}" if reasons else ""

    def _observe_cold_start(self, m: _Model, seconds: float) -> None:
        i = next((i for i, b in enumerate(COLD_START_BUCKETS) if seconds <= b), -1)
        m.cold_starts[i] += 1
        m.cold_start_sum += seconds

    def _expected_load_s(self, model: str) -> float:
        with self._lock:
            m = self._models.get(model)
            times = [v.last_load_s for v in m.versions.values() if v.last_load_s] if m else []
        return max(times, default=1.0)


def _file_shape(stamp: Any) -> tuple[tuple[str, int], ...]:
    """The names and sizes of a version directory's model files (not its metadata, whose
    metrics vary in length), from its stamp (see _stamp): what decides the memory it takes."""
    return tuple((name, size) for name, size, _ in stamp[1] if name != METADATA_FILE)


def _parse_pins(pins: Iterable[str]) -> dict[str, set[int] | None]:
    """``["a", "b:3"]`` -> ``{"a": None, "b": {3}}`` (None: the model's served versions)."""
    parsed: dict[str, set[int] | None] = {}
    for pin in pins:
        name, _, version = str(pin).partition(":")
        if not version:
            parsed[name] = None
        elif parsed.get(name, set()) is not None:
            parsed.setdefault(name, set()).add(int(version))  # type: ignore[union-attr]
    return parsed


def _keys(versions: list[_Version]) -> str:
    return ", ".join(v.key for v in versions)


def _rounded(values: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 2) for k, v in values.items()}


def _json(doc: dict[str, Any]) -> str:
    return json.dumps(doc)
