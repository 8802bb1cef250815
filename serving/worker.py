"""One engine's batching worker: a bounded FIFO and a thread that forms dynamic batches.

:class:`Worker` wraps one :class:`~serving.engine.Engine`. Its thread takes the oldest request,
then keeps taking queued requests while the batch has at most ``max_batch_size`` rows, waiting up
to ``max_queue_delay`` (counted from the oldest request's arrival) for more; it concatenates them
along axis 0, runs once and splits the outputs back (:mod:`serving.batching`). Its state
(``queued_items``, ``running_items``, ``ewma_s``, ``ewma_item_s``, ``peak_s``, ``batches``,
``items``, ``errors``, ``batch_size_counts``) is plain attributes written under its lock and read
without it by the dispatcher (:mod:`serving.dispatcher`), the scheduler and the metrics collector;
EWMAs are ``ewma = (1 - EWMA_ALPHA) ewma + EWMA_ALPHA t``, ``peak_s`` is the longest recent run
(decaying by ``PEAK_DECAY`` per run).

Inline runs: when the worker is idle, :meth:`Worker.try_inline` lets the caller's thread (the event
loop) run the request directly, saving two thread hops. The dispatcher allows it only for models
whose runs are far below ``inline_max_ms``, and each inline run has a bound: past it the watchdog
stops the run and the request is queued to a worker thread instead (it is not failed: the bound
is the event loop's, not the request's).

Errors, whatever onnxruntime's class (``InvalidArgument``, ``Fail``, ...):

* a failing batch of several requests is rerun request by request on the same engine; each request
  that fails alone gets 400 (:class:`~serving.errors.InputError`) with onnxruntime's message (no
  source paths), the others their outputs;
* when every request failed, the engine runs its known-good warm-up input
  (:meth:`~serving.engine.Engine.probe`): if that passes, the requests were bad (400); if it fails
  too, the engine is broken: it is taken out (:attr:`Worker.dead`) and its unanswered requests and
  queue go to ``on_failure`` (the pool retries them once elsewhere and starts a replacement).

Timeouts (the pool's watchdog calls :meth:`Worker.check_deadline`): a run past ``run_timeout_s``
is stopped (onnxruntime ``RunOptions.terminate``) and its requests are answered 504
(:class:`~serving.errors.DeadlineExceeded`) at once and never retried; the worker carries on with
its queue. A stopped run that has not returned ``TERMINATE_GRACE_S`` later (a single long kernel)
gets its worker abandoned: its queue goes to ``on_failure`` and a replacement starts.

Every request handed to a worker is answered exactly once: :meth:`Request.finish
<serving.batching.Request.finish>` ignores all but the first answer, and each path above ends in
one (outputs, 400, 504, or the failure handler, which retries or answers 503).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable

from serving.batching import Request, concat_feeds, split_outputs
from serving.engine import Engine, describe_error
from serving.errors import DeadlineExceeded, InputError
from serving.statistics import ModelStatistics

log = logging.getLogger(__name__)

EWMA_ALPHA = 0.2
#: per run, the remembered longest run time decays by this factor
PEAK_DECAY = 0.98
#: how long a stopped run may take to return before its worker is abandoned
TERMINATE_GRACE_S = 1.0

OK, FULL, CLOSED = 0, 1, 2
NOT_RUN, INLINE_DONE, HANDED_OFF = 0, 1, 2


FailureHandler = Callable[["Worker", list[Request], list[Request], BaseException], None]


class Worker:
    """One engine, its queue and its batching thread."""

    def __init__(
        self,
        engine: Engine,
        *,
        max_batch_size: int,
        max_queue_delay_s: float,
        on_failure: FailureHandler,
        name: str | None = None,
        run_timeout_s: float = 0.0,
        stats: ModelStatistics | None = None,
        inline_alarm: threading.Event | None = None,
    ) -> None:
        self.engine = engine
        self.name = name or engine.name
        self.max_batch_size = max(1, int(max_batch_size))
        self.max_queue_delay_s = max(0.0, float(max_queue_delay_s))
        self.run_timeout_s = max(0.0, float(run_timeout_s))
        self._on_failure = on_failure
        self._stats = stats
        self._inline_alarm = inline_alarm
        self._cond = threading.Condition(threading.Lock())
        self._queue: deque[Request] = deque()
        sig = engine.signature
        self._batching = sig.max_batch_size > 0
        self._same_shape_check = any(-1 in s.shape[1:] for s in sig.inputs)
        # state read lock-free by the dispatcher, the scheduler and the metrics collector
        self.queued_items = 0
        self.running_items = 0
        #: rows of a failed run still being isolated (rerun one by one, the engine probed): not
        #: answered yet, so the version is busy (the scheduler never evicts a busy version)
        self.isolating_items = 0
        self.running_since = 0.0
        self.ewma_s = 0.0
        self.ewma_item_s = 0.0
        self.peak_s = 0.0
        self.batches = 0
        self.items = 0
        self.errors = 0
        self.timeouts = 0
        self.batch_size_counts = [0] * (self.max_batch_size + 1)
        self.dead = False
        self.closing = False
        self.last_inline = 0.0
        # the current run: its requests, its time limit, whether it runs inline, and whether the
        # watchdog stopped it
        self._running: list[Request] = []
        #: the batching thread holds a batch (running it or isolating a failure): no inline run
        self._busy = False
        self._limit_s = 0.0
        self._inline = False
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name=f"worker-{self.name}", daemon=True)
        self._thread.start()

    # ---- state

    @property
    def outstanding(self) -> int:
        return self.queued_items + self.running_items + self.isolating_items

    @property
    def accepting(self) -> bool:
        return not (self.dead or self.closing)

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    # ---- submission

    def offer(self, req: Request, max_queue_items: int = 0) -> int:
        """Queue ``req``: OK, FULL (queue would exceed ``max_queue_items`` rows; 0 = unbounded) or
        CLOSED (dead or draining)."""
        with self._cond:
            if self.dead or self.closing:
                return CLOSED
            if (
                max_queue_items
                and self.queued_items
                and self.queued_items + req.n > max_queue_items
            ):
                return FULL
            self._queue.append(req)
            self.queued_items += req.n
            self._cond.notify()
        return OK

    def try_inline(self, req: Request, limit_s: float) -> int:
        """Run ``req`` in the calling thread if this worker is idle, stopped after ``limit_s``.

        INLINE_DONE: ``req`` is complete (its callback is not called). NOT_RUN: the caller should
        queue it (the worker was busy, or the run hit ``limit_s``). HANDED_OFF: ``req`` completes
        through its callback (the engine failed and the pool owns it, or the watchdog answered).
        """
        with self._cond:
            if self.dead or self.closing or self._queue or self._busy:
                return NOT_RUN
            self._begin(t0 := time.perf_counter(), [req], limit_s, inline=True)
        alarm = self._inline_alarm
        if alarm is not None and not alarm.is_set():
            alarm.set()  # the watchdog watches closely while inline runs happen
        self.last_inline = t0
        req.t_start = t0
        req.engine = self.name
        try:
            outputs = self.engine.run(req.feeds)
        except Exception as exc:  # noqa: BLE001 - classified below
            return self._inline_failed(req, t0, exc)
        with self._cond:
            dead = self.dead
            self._end(time.perf_counter() - t0, req.n, ok=True)
        if dead:  # abandoned meanwhile: the failure handler owns req
            return HANDED_OFF
        req.callback = None
        self._record_stats([req], 0, time.perf_counter() - t0, 0.0)
        req.finish(outputs)
        return INLINE_DONE

    def _inline_failed(self, req: Request, t0: float, exc: BaseException) -> int:
        """An inline run raised: stopped at the inline bound (queue it), past run_timeout_s
        (504, maybe already answered by the watchdog), or a failure to classify."""
        with self._cond:
            stopped, dead, answered = self._stopped, self.dead, req.done
            # the probe below runs on this engine: no batch may start meanwhile (set first, so
            # that the version never reads as idle with the request unanswered)
            isolate = not (dead or stopped or answered)
            self.isolating_items = req.n if isolate else 0
            self._busy = isolate
            self._end(time.perf_counter() - t0, req.n, ok=False)
        if dead:
            return HANDED_OFF
        if answered:  # the watchdog answered it (past run_timeout_s)
            return INLINE_DONE
        if stopped:
            if self.run_timeout_s <= 0 or time.perf_counter() - t0 < self.run_timeout_s:
                return NOT_RUN  # past the inline bound only: a worker thread runs it instead
            req.callback = None
            req.finish(error=self._deadline_error())
            return INLINE_DONE
        try:
            failed, broken = self._isolate([req], exc)
        finally:
            with self._cond:
                self._busy = False
                self.isolating_items = 0
                if self._queue:
                    self._cond.notify()
        if broken is not None:
            self._fail([req], broken)  # retried elsewhere; completes through its callback
            return HANDED_OFF
        req.callback = None
        self._reject(failed)
        return INLINE_DONE

    # ---- lifecycle

    def close(self) -> list[Request]:
        """Stop accepting; returns the queued requests (the caller re-dispatches them). The thread
        finishes its running batch, then exits."""
        with self._cond:
            self.closing = True
            queued = list(self._queue)
            self._queue.clear()
            self.queued_items = 0
            self._cond.notify_all()
        return queued

    def drain(self) -> None:
        """Stop accepting; the thread finishes what is queued, then exits."""
        with self._cond:
            self.closing = True
            self._cond.notify_all()

    def join(self, timeout: float | None = None) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def abandon(self, exc: BaseException) -> bool:
        """Take this worker out from outside (hung engine): its unanswered requests and queue go
        to the failure handler now; whatever the engine returns later is dropped."""
        return self._fail([], exc)

    def check_deadline(self, now: float) -> None:
        """The watchdog's check (see the module docstring): stop a run past its limit, answer
        504 to its requests once past ``run_timeout_s``, abandon the worker when a stopped run
        does not return within ``TERMINATE_GRACE_S``."""
        with self._cond:
            since = self.running_since
            limit = self._limit_s
            if self.dead or not since or limit <= 0:
                return
            elapsed = now - since
            timeout = self.run_timeout_s
            late = [r for r in self._running if not r.done] if 0 < timeout < elapsed else []
            if late:
                self.timeouts += 1
            if not self._stopped and elapsed > limit:
                self._stopped = True  # inline past its bound: stopped, answered by its caller
                self.engine.terminate()
            overdue = self._stopped and elapsed - limit > TERMINATE_GRACE_S
        if late:
            log.warning(
                "engine %s: run of %d request(s) stopped after %.2f s (serving.run_timeout_s=%s)",
                self.name,
                len(late),
                elapsed,
                timeout,
            )
            for req in late:
                req.finish(error=self._deadline_error())
        if overdue:
            log.error("engine %s did not stop %.1f s after its run was stopped", self.name, elapsed)
            self.abandon(TimeoutError(f"run did not stop within {TERMINATE_GRACE_S} s"))

    def _deadline_error(self) -> DeadlineExceeded:
        return DeadlineExceeded(
            f"the model ran longer than serving.run_timeout_s={self.run_timeout_s:g} s on this "
            "request; it was stopped and is not retried"
        )

    # ---- the batching thread

    def _begin(self, t0: float, batch: list[Request], limit_s: float, inline: bool) -> None:
        """Mark a run as started (lock held)."""
        self._running = batch
        self.running_since = t0
        self._limit_s = limit_s
        self._inline = inline
        self._stopped = False
        if inline:
            self.running_items = batch[0].n

    def _end(self, seconds: float, n: int, ok: bool) -> None:
        """Mark the run as over (lock held); records its time when it succeeded."""
        self._running = []
        self.running_items = 0
        self.running_since = 0.0
        self._inline = False
        self._stopped = False
        if ok:
            self._record(seconds, n)
        else:
            self.errors += 1
            self.peak_s = max(self.peak_s, seconds)
        if self._queue or self.closing:
            self._cond.notify()

    def _take_batch(self) -> list[Request] | None:
        """Called with the lock held; waits for work, returns a batch or None to exit."""
        queue = self._queue
        while not self.dead and (not queue or self._inline or self._busy):
            if self.closing and not queue and not self._inline and not self._busy:
                return None
            self._cond.wait()
        if self.dead:
            return None
        first = queue.popleft()
        batch = [first]
        self._running = batch
        self._busy = True
        n = first.n
        if self._batching:
            limit = self.max_batch_size
            deadline = first.t_submit + self.max_queue_delay_s
            while n < limit:
                if queue:
                    nxt = queue[0]
                    if n + nxt.n > limit or (
                        self._same_shape_check and not _same_shapes(first, nxt)
                    ):
                        break
                    batch.append(queue.popleft())
                    n += nxt.n
                    continue
                remaining = deadline - time.perf_counter()
                if remaining <= 0 or self.closing or self.dead:
                    break
                self._cond.wait(remaining)
                if self.dead:  # the failure handler took the batch
                    return None
        self.queued_items -= n
        self.running_items = n
        self._begin(time.perf_counter(), batch, self.run_timeout_s, inline=False)
        return batch

    def _loop(self) -> None:
        try:
            while True:
                with self._cond:
                    batch = self._take_batch()
                    if batch is None:
                        return
                    t0 = self.running_since
                for req in batch:
                    req.t_start = t0
                    req.engine = self.name
                try:
                    feeds = concat_feeds(batch)
                    t1 = time.perf_counter()
                    outputs = self.engine.run(feeds)
                except Exception as exc:  # noqa: BLE001 - classified below
                    with self._cond:
                        stopped, dead = self._stopped, self.dead
                        if not (stopped or dead):  # before _end: never read as idle between
                            self.isolating_items = sum(r.n for r in batch)
                        self._end(time.perf_counter() - t0, 0, ok=False)
                    if dead:
                        return
                    if not stopped and not self._handle_failure(batch, exc):
                        return
                    self._release()
                    continue
                t2 = time.perf_counter()
                with self._cond:
                    if self.dead:  # abandoned by the watchdog: the pool owns these requests
                        return
                    self._end(t2 - t0, sum(r.n for r in batch), ok=True)
                parts = split_outputs(batch, outputs)
                # statistics first: a client that reads them after its answer sees its request
                self._record_stats(batch, t1 - t0, t2 - t1, time.perf_counter() - t2)
                for req, part in zip(batch, parts, strict=True):
                    req.finish(part)
                self._release()
        except BaseException as exc:  # noqa: BLE001 - the thread must never die silently
            log.exception("worker %s crashed", self.name)
            self._fail([], exc)

    def _release(self) -> None:
        """The batching thread is done with its batch."""
        with self._cond:
            self._busy = False
            self.isolating_items = 0

    def _handle_failure(self, batch: list[Request], exc: BaseException) -> bool:
        """A batch run raised: answer the bad requests 400, or take the engine out (False)."""
        failed, broken = self._isolate(batch, exc)
        if broken is not None:
            self._fail([r for r, _ in failed], broken)
            return False
        self._reject(failed)
        return True

    def _run_alone(self, req: Request) -> None:
        """Run one request of a failed batch on this engine (raises what the engine raises)."""
        with self._cond:
            self._begin(t0 := time.perf_counter(), [req], self.run_timeout_s, inline=False)
            self.running_items = req.n
        ok = False
        try:
            outputs = self.engine.run(req.feeds)
            ok = True
        finally:
            with self._cond:
                stopped = self._stopped
                self._end(time.perf_counter() - t0, req.n, ok=ok and not stopped)
        if not stopped:
            self._record_stats([req], 0.0, time.perf_counter() - t0, 0.0)
            req.finish(outputs)

    def _isolate(
        self, batch: list[Request], exc: BaseException
    ) -> tuple[list[tuple[Request, BaseException]], BaseException | None]:
        """A run of ``batch`` raised ``exc``: rerun it request by request, then, if none
        succeeded, probe the engine (see the module docstring). Returns the requests that failed
        with their errors, and the probe's error when the engine itself is broken (else None).
        Answers only the requests that succeeded alone."""
        failed: list[tuple[Request, BaseException]] = []
        if len(batch) == 1:
            failed.append((batch[0], exc))
        else:
            for req in batch:
                if req.done:
                    continue
                try:
                    self._run_alone(req)
                except Exception as err:  # noqa: BLE001 - this request's own failure
                    if not req.done:
                        failed.append((req, err))
        if failed and len(failed) == len(batch):  # nothing ran: the engine, or every input?
            try:
                self._probe()
            except Exception as err:  # noqa: BLE001 - the known-good input fails too
                return failed, err
        return failed, None

    def _reject(self, failed: list[tuple[Request, BaseException]]) -> None:
        """Answer requests the model failed on (and the engine did not) with 400."""
        for req, err in failed:
            message = describe_error(err)
            log.info("engine %s: the model rejected a request: %s", self.name, message)
            req.finish(error=InputError(f"the model rejected the input: {message}"))

    def _probe(self) -> None:
        with self._cond:
            self._begin(t0 := time.perf_counter(), [], self.run_timeout_s, inline=False)
        try:
            self.engine.probe()
        finally:
            with self._cond:
                self._end(time.perf_counter() - t0, 0, ok=False)

    def _record(self, seconds: float, n: int) -> None:
        self.ewma_s = (
            seconds if self.batches == 0 else self.ewma_s + EWMA_ALPHA * (seconds - self.ewma_s)
        )
        per_item = seconds / n
        self.ewma_item_s = (
            per_item
            if self.batches == 0
            else self.ewma_item_s + EWMA_ALPHA * (per_item - self.ewma_item_s)
        )
        self.peak_s = max(seconds, self.peak_s * PEAK_DECAY)
        self.batches += 1
        self.items += n
        counts = self.batch_size_counts
        counts[n if n < len(counts) else -1] += 1

    def _record_stats(
        self, batch: list[Request], input_s: float, infer_s: float, output_s: float
    ) -> None:
        stats = self._stats
        if stats is None:
            return
        queue_ns = int(sum(r.queue_seconds for r in batch) * 1e9)
        stats.record_execution(
            len(batch),
            sum(r.n for r in batch),
            queue_ns,
            int(input_s * 1e9),
            int(infer_s * 1e9),
            int(output_s * 1e9),
        )

    def _fail(self, running: list[Request], exc: BaseException) -> bool:
        """Mark dead (once) and hand the unanswered running requests and the queue to the failure
        handler."""
        with self._cond:
            if self.dead:
                return False
            self.dead = True
            self.errors += 1
            seen = set()
            taken = []
            for r in [*running, *self._running]:
                if id(r) not in seen and not r.done:
                    seen.add(id(r))
                    taken.append(r)
            queued = [r for r in self._queue if id(r) not in seen]
            self._queue.clear()
            self.queued_items = 0
            self.running_items = 0
            self.isolating_items = 0
            self.running_since = 0.0
            self._running = []
            self._cond.notify_all()
        log.error("engine %s failed (%s: %s); taking it out", self.name, type(exc).__name__, exc)
        self._on_failure(self, taken, queued, exc)
        return True


def _same_shapes(a: Request, b: Request) -> bool:
    return all(a.feeds[k].shape[1:] == b.feeds[k].shape[1:] for k in a.feeds)
