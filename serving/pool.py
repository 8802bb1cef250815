"""A pool of N engines serving one model version, with failover and replacement.

Threads, not processes. Each engine is an onnxruntime session driven by its own Python thread
(:class:`~serving.worker.Worker`); onnxruntime releases the GIL inside ``run``, so N one-thread
sessions use N cores from one process with zero-copy handoff of numpy arrays. Measured on this
2-core machine with the FedAvg CNN (1.66M params, 28x28, 1 intra-op thread per session, 1 s each),
images/s:

    ===========  ========  =================================  ===============================
    batch rows   engines   threads (this pool)                processes (pipe + pickle)
    ===========  ========  =================================  ===============================
    1            1         6,030                              4,057
    1            2         11,048                             9,025
    64           1         8,613                              8,260
    64           2         16,143                             15,761
    ===========  ========  =================================  ===============================

Threads scale as well as processes (GIL released) and win by 20-50 % on small requests, where a
process pays two pickles and two pipe hops per call; processes would also duplicate the HTTP-side
memory and complicate hot swap. So the pool uses threads. (Each cell: a 1 s loop of back-to-back
``run`` calls per engine; threads share sessions in-process, processes get the array over a
``multiprocessing`` pipe and send the logits back; one run on a shared machine, so +-10 %.)

Engines: ``engines`` (the scheduler's share, :mod:`serving.scheduler`), else ``instances`` (default
:func:`~serving.providers.default_instances`: one per usable core on CPU, 2 on a GPU), each with
``intra_op_threads`` (default 1) and spinning off. The version's session is loaded once (its first
engine); every further engine is a :meth:`clone <serving.engine.Engine.clone>` on the same session,
so :meth:`EnginePool.add_engine` costs a thread and :meth:`EnginePool.remove_engine` hands the
removed engine's queue to the others and lets it finish its running batch (drain) before it goes.
Memory (:meth:`EnginePool.memory_bytes`): the session's measured size plus the warm-up's measured
working memory; on CUDA, where the arena is not shrunk after a run, that working memory once per
engine the pool has had at once (see :mod:`serving.engine`).

Failure (:mod:`serving.worker`): a request the model fails on is answered 400 and the engine stays;
an engine that also fails its known-good input is taken out of the dispatch set at once. The
unanswered requests of its running batch are retried once on another engine, its queued requests
are moved to other engines; a request that already had its retry, or that finds no live engine,
fails with 503 (``Unavailable``). A replacement engine (a clone, or a fresh session when the
shared one fails the known-good input too) then joins the set.

Timeouts: a watchdog thread checks the engines every ``min(1 s, run_timeout_s / 4)``, and every
half inline bound while inline runs happen (:mod:`serving.dispatcher`); a run past its limit is
stopped, its requests answered 504 (never retried).

Statistics: every request dispatched here carries :attr:`EnginePool.stats`
(:class:`~serving.statistics.ModelStatistics`), and every worker records its batches there.

Close: :meth:`EnginePool.close` stops accepting (new submissions raise ``PoolClosed``, on which the
dataplane looks the model up again), lets every queued request finish, then drops the sessions.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from serving.batching import Request
from serving.dispatcher import Dispatcher
from serving.engine import Engine
from serving.errors import PoolClosed, ServingError, Unavailable
from serving.graph_cache import GraphCache
from serving.memory_probe import MemorySample
from serving.providers import CUDA, default_instances, resolve_providers
from serving.settings import ServingConfig
from serving.signature import ModelSignature
from serving.statistics import ModelStatistics
from serving.worker import Worker

log = logging.getLogger(__name__)


EngineFactory = Callable[[str], Engine]


def _resolve_later(
    loop: asyncio.AbstractEventLoop, fut: asyncio.Future
) -> Callable[[Request], None]:
    def callback(req: Request) -> None:
        if not loop.is_closed():
            loop.call_soon_threadsafe(_set, fut, req)

    return callback


def _set(fut: asyncio.Future, req: Request) -> None:
    if not fut.done():
        fut.set_result(req)


class EnginePool:
    """The engines of one model version plus the dispatcher that spreads requests over them."""

    def __init__(
        self,
        model_name: str,
        version: int,
        model_path: str | Path,
        signature: ModelSignature,
        settings: ServingConfig | None = None,
        *,
        engine_factory: EngineFactory | None = None,
        engines: int | None = None,
        stats: ModelStatistics | None = None,
    ) -> None:
        self.name = model_name
        self.version = int(version)
        self.model_path = Path(model_path)
        self.signature = signature
        self.settings = settings = settings or ServingConfig()
        self.providers = resolve_providers(settings.providers)
        self.instances = engines or settings.instances or default_instances(self.providers)
        self.batch_limit = (
            min(settings.max_batch_size, signature.max_batch_size)
            if signature.max_batch_size > 0
            else 1
        )
        self.stats = stats or ModelStatistics(model_name, version)
        self._custom_factory = engine_factory is not None
        self._factory = engine_factory or self._default_factory
        self._primary: Engine | None = None
        self.dispatcher = Dispatcher(
            settings.policy,
            max_queue_items=settings.max_queue_items,
            inline_max_s=settings.inline_max_ms / 1000.0,
        )
        self._lock = threading.Lock()
        self._seq = itertools.count()
        self.closed = False
        self.engine_failures = 0
        self.replacements = 0
        #: when a request was last dispatched here (``time.monotonic``), for LRU eviction
        self.last_used = time.monotonic()
        #: rows dispatched here so far (the scheduler samples it for the arrival rate)
        self.arrived_rows = 0
        self._stop = threading.Event()
        self._inline_alarm = threading.Event()
        t0 = time.perf_counter()
        engines_made = [self._factory(self._next_name()) for _ in range(self.instances)]
        self.load_seconds = time.perf_counter() - t0
        self.workers: list[Worker] = [self._make_worker(e) for e in engines_made]
        #: engines removed from the dispatch set that still finish their running batch
        self.draining: list[Worker] = []
        self.peak_engines = len(self.workers)
        first = engines_made[0]
        self.obtained_providers = first.providers
        self.warmup_seconds = float(getattr(first, "warmup_seconds", 0.0))
        zero = MemorySample(0, None)
        self.session_memory: MemorySample = getattr(first, "session_memory", zero)
        self.run_memory: MemorySample = getattr(first, "run_memory", zero)
        self._per_engine_runs = not getattr(first, "arena_shrinks", True)
        self._report_memory()
        self._watchdog: threading.Thread | None = None
        if settings.run_timeout_s > 0 or self.dispatcher.inline_max_s > 0:
            self._watchdog = threading.Thread(
                target=self._watch, name=f"watchdog-{self.key}", daemon=True
            )
            self._watchdog.start()
        log.info(
            "loaded %s: %d engines on %s in %.2f s, %.1f MB",
            self.key,
            self.instances,
            self.obtained_providers,
            self.load_seconds,
            self.memory_bytes() / 1e6,
        )

    # ---- construction

    @property
    def key(self) -> str:
        return f"{self.name}:{self.version}"

    def _next_name(self) -> str:
        return f"{self.key}/e{next(self._seq)}"

    def _default_factory(self, name: str) -> Engine:
        """The first call loads the version's session; later calls clone it."""
        if self._primary is not None:
            return self._primary.clone(name)
        s = self.settings
        self._primary = Engine(
            self.model_path,
            self.signature,
            providers=self.providers,
            intra_op_threads=s.intra_op_threads,
            allow_spinning=s.allow_spinning,
            cudnn_conv_algo_search=s.cudnn_conv_algo_search,
            pad_batches=s.pad_batches,
            warmup=s.warmup,
            name=name,
            graph_cache=GraphCache.default(),
        )
        return self._primary

    def _make_worker(self, engine: Engine) -> Worker:
        return Worker(
            engine,
            max_batch_size=self.batch_limit,
            max_queue_delay_s=self.settings.max_queue_delay_ms / 1000.0,
            on_failure=self._on_failure,
            name=engine.name,
            run_timeout_s=self.settings.run_timeout_s,
            stats=self.stats,
            inline_alarm=self._inline_alarm,
        )

    # ---- requests

    def submit(self, req: Request, *, inline: bool = False) -> bool:
        """Dispatch a validated request; True when it completed inline in this thread.

        Raises Overloaded (429), PoolClosed / Unavailable (503).
        """
        if self.closed:
            raise PoolClosed(f"{self.key} is being unloaded")
        self.last_used = time.monotonic()
        self.arrived_rows += req.n
        req.stats = self.stats
        return self.dispatcher.submit(self.workers, req, inline=inline)

    def infer(
        self, feeds: Mapping[str, np.ndarray], timeout: float | None = 30.0
    ) -> dict[str, np.ndarray]:
        """Blocking inference (validates ``feeds``)."""
        n = self.signature.validate(feeds)
        req = Request(feeds, n)
        self.submit(req)
        return req.wait(timeout)

    async def infer_async(self, feeds: Mapping[str, np.ndarray], n: int) -> Request:
        """Awaitable inference of validated feeds; returns the completed :class:`Request` (check
        ``.error``). Never blocks the loop except for a bounded inline run of a model far below
        ``inline_max_ms`` on an idle engine."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        req = Request(feeds, n, _resolve_later(loop, fut))
        if self.submit(req, inline=True):
            return req
        return await fut

    # ---- engines (the scheduler's moves)

    @property
    def engine_count(self) -> int:
        """Engines taking requests."""
        return sum(1 for w in self.workers if w.accepting)

    def add_engine(self) -> Worker:
        """One more engine (a clone on the version's session); PoolClosed if closing."""
        worker = self._make_worker(self._factory(self._next_name()))
        with self._lock:
            if self.closed:
                worker.drain()
                raise PoolClosed(f"{self.key} is being unloaded")
            self.workers = [*self.workers, worker]
            grown = len(self.workers) > self.peak_engines
            self.peak_engines = max(self.peak_engines, len(self.workers))
        if grown:
            self._report_memory()
        return worker

    def remove_engine(self) -> Worker | None:
        """Take the least loaded engine out (None when only one is left): its queued requests go
        to the others now, its running batch finishes on it. :meth:`reap` forgets it once its
        thread has exited."""
        with self._lock:
            live = [w for w in self.workers if w.accepting]
            if self.closed or len(live) <= 1:
                return None
            victim = min(live, key=lambda w: w.outstanding)
            self.workers = [w for w in self.workers if w is not victim]
            self.draining.append(victim)
        for req in victim.close():
            try:
                self.dispatcher.submit(self.workers, req, force=True)
            except ServingError as err:
                req.finish(error=err)
        return victim

    def reap(self) -> int:
        """Forget drained engines; returns how many still drain."""
        with self._lock:
            self.draining = [w for w in self.draining if not w.join(0)]
            return len(self.draining)

    # ---- load, memory

    def outstanding_seconds(self) -> float:
        """Work queued or running here, in seconds: rows x each engine's per-row EWMA."""
        return sum(w.outstanding * w.ewma_item_s for w in [*self.workers, *self.draining])

    @property
    def outstanding(self) -> int:
        """Rows queued or running (draining engines included)."""
        return sum(w.outstanding for w in [*self.workers, *self.draining])

    def row_seconds(self) -> float:
        """Measured run time per row (mean over engines that ran something; 0 before any)."""
        measured = [w.ewma_item_s for w in self.workers if w.batches]
        return sum(measured) / len(measured) if measured else 0.0

    @property
    def on_gpu(self) -> bool:
        return (
            self.obtained_providers[:1] == [CUDA] and self.session_memory.device_bytes is not None
        )

    def memory_bytes(self, engines: int | None = None) -> int:
        """Memory this version holds in the budget's kind (device memory on CUDA, else host) with
        ``engines`` engines (default: the most it has had at once, when each engine's runs keep
        their own activations; see the module docstring)."""
        k = max(engines or 0, self.peak_engines) if self._per_engine_runs else 1
        if self.on_gpu:
            session = self.session_memory.device_bytes or 0
            run = self.run_memory.device_bytes or 0
        else:
            session, run = self.session_memory.host_bytes, self.run_memory.host_bytes
        return session + k * run

    def working_bytes(self) -> int:
        """One engine's run memory in the budget's kind (what a warm-up left in the arena)."""
        run = self.run_memory
        return (run.device_bytes or 0) if self.on_gpu else run.host_bytes

    def memory_usage(self) -> list[tuple[str, int, int]]:
        """(kind, device, bytes) held: host memory always, device memory on CUDA."""
        k = self.peak_engines if self._per_engine_runs else 1
        usage = [("CPU", 0, self.session_memory.host_bytes + k * self.run_memory.host_bytes)]
        if self.on_gpu:
            usage.append(("GPU", 0, self.memory_bytes()))
        return usage

    def adopt_memory(self, session: MemorySample, run: MemorySample) -> None:
        """Hold what an earlier load of the same files measured: this one was built next to
        others, so its own measurement counts their allocations too."""
        self.session_memory, self.run_memory = session, run
        self._report_memory()

    def _report_memory(self) -> None:
        """What the version holds, into its statistics (``memory_usage``)."""
        for kind, device, nbytes in self.memory_usage():
            self.stats.set_memory(kind, device, nbytes)

    # ---- failures

    def _on_failure(
        self, worker: Worker, running: list[Request], queued: list[Request], exc: BaseException
    ) -> None:
        with self._lock:
            self.workers = [w for w in self.workers if w is not worker]
            self.draining = [w for w in self.draining if w is not worker]
            self.engine_failures += 1
        for req in running:
            req.attempts += 1
        for req in [*running, *queued]:
            if req.attempts > 1:
                self._fail(req, f"engine {worker.name} failed on its retry: {exc}")
                continue
            try:
                self.dispatcher.submit(self.workers, req, force=True)
            except ServingError as err:
                self._fail(req, f"engine {worker.name} failed ({exc}) and {err}")
        if not self.closed and not worker.closing:
            threading.Thread(
                target=self._replace, args=(worker,), name=f"replace-{worker.name}", daemon=True
            ).start()

    def _fail(self, req: Request, message: str) -> None:
        req.finish(error=Unavailable(message))

    def _replacement(self, name: str) -> Engine:
        """A new engine; a fresh session when a clone of the current one fails the known-good
        input too (the session itself is broken)."""
        engine = self._factory(name)
        if self._custom_factory:
            return engine
        try:
            engine.probe()
        except Exception as exc:  # noqa: BLE001 - reload below
            log.warning(
                "%s: the shared session fails its known-good input (%s); reloading", name, exc
            )
            self._primary = None
            engine = self._factory(name)
        return engine

    def _replace(self, dead: Worker) -> None:
        for attempt in range(1, self.settings.replace_attempts + 1):
            if self.closed:
                return
            try:
                engine = self._replacement(self._next_name())
            except Exception as exc:  # noqa: BLE001
                log.error("replacement for %s failed (attempt %d): %s", dead.name, attempt, exc)
                time.sleep(0.5 * attempt)
                continue
            worker = self._make_worker(engine)
            with self._lock:
                if self.closed:
                    worker.drain()
                    return
                self.workers = [*self.workers, worker]
                self.replacements += 1
            log.info("engine %s replaced by %s", dead.name, worker.name)
            return
        log.error(
            "giving up replacing %s; %s runs with %d engines",
            dead.name,
            self.key,
            len(self.workers),
        )

    def _watch(self) -> None:
        timeout = float(self.settings.run_timeout_s)
        slow = min(1.0, timeout / 4) if timeout > 0 else 1.0
        # while inline runs happen: their bound, and no slower than run_timeout_s needs
        fast = min(self.dispatcher.inline_bound_s / 2, slow)
        alarm = self._inline_alarm
        while not self._stop.is_set():
            if alarm.is_set():
                self._stop.wait(fast)
                latest = max((w.last_inline for w in self.workers), default=0.0)
                if time.perf_counter() - latest > 1.0:
                    alarm.clear()  # no inline run for a second: back to the slow period
            else:
                alarm.wait(slow)  # an inline run sets it: watch closely at once
            now = time.perf_counter()
            for w in [*self.workers, *self.draining]:
                w.check_deadline(now)

    # ---- lifecycle

    def close(self, drain_timeout: float = 30.0) -> None:
        """Stop accepting, finish queued requests (up to ``drain_timeout``), drop the sessions."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            workers = [*self.workers, *self.draining]
        for w in workers:
            w.drain()
        deadline = time.monotonic() + drain_timeout
        for w in workers:
            if not w.join(max(0.0, deadline - time.monotonic())):
                w.abandon(TimeoutError(f"{self.key} did not drain within {drain_timeout} s"))
        self._stop.set()
        self._inline_alarm.set()
        for w in workers:
            w.engine.close()
        self.stats.clear_memory()
        log.info("closed %s", self.key)

    # ---- introspection

    @property
    def ready(self) -> bool:
        return not self.closed and any(w.accepting for w in self.workers)
