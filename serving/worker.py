"""One engine's batching worker: a bounded FIFO and a thread that forms dynamic batches.

:class:`Worker` wraps one :class:`~serving.engine.Engine`. Its thread takes the oldest request,
then keeps taking queued requests while the batch has at most ``max_batch_size`` rows, waiting up
to ``max_queue_delay`` (counted from the oldest request's arrival) for more; it concatenates them
along axis 0, runs once and splits the outputs back (:mod:`serving.batching`). Its state
(``queued_items``, ``running_items``, ``ewma_s``, ``ewma_item_s``, ``batches``, ``items``,
``errors``, ``batch_size_counts``) is plain attributes written under its lock and read without it
by the dispatcher (:mod:`serving.dispatcher`) and the metrics collector; EWMAs are
``ewma = (1 - EWMA_ALPHA) ewma + EWMA_ALPHA t``.

Inline runs: when the worker is idle, :meth:`Worker.try_inline` lets the caller's thread run the
request directly, saving two thread hops (the dispatcher allows it only for sub-millisecond models).

Failures: an engine that raises anything but onnxruntime's ``InvalidArgument`` is taken out
(:attr:`Worker.dead`); its running batch and queue go to ``on_failure`` (the pool retries them
once elsewhere). ``InvalidArgument`` fails only the request that caused it (rerun one by one), as
HTTP 400.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable

from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

from serving.batching import Request, concat_feeds, split_outputs
from serving.engine import Engine
from serving.errors import InputError

log = logging.getLogger(__name__)

EWMA_ALPHA = 0.2

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
    ) -> None:
        self.engine = engine
        self.name = name or engine.name
        self.max_batch_size = max(1, int(max_batch_size))
        self.max_queue_delay_s = max(0.0, float(max_queue_delay_s))
        self._on_failure = on_failure
        self._cond = threading.Condition(threading.Lock())
        self._queue: deque[Request] = deque()
        sig = engine.signature
        self._batching = sig.max_batch_size > 0
        self._same_shape_check = any(-1 in s.shape[1:] for s in sig.inputs)
        # state read lock-free by the dispatcher and the metrics collector
        self.queued_items = 0
        self.running_items = 0
        self.running_since = 0.0
        self.ewma_s = 0.0
        self.ewma_item_s = 0.0
        self.batches = 0
        self.items = 0
        self.errors = 0
        self.batch_size_counts = [0] * (self.max_batch_size + 1)
        self.dead = False
        self.closing = False
        self._inline = False
        #: the batch being formed or run (handed to the failure handler if the engine dies)
        self._running: list[Request] = []
        self._thread = threading.Thread(target=self._loop, name=f"worker-{self.name}", daemon=True)
        self._thread.start()

    # ---- state

    @property
    def outstanding(self) -> int:
        return self.queued_items + self.running_items

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

    def try_inline(self, req: Request) -> int:
        """Run ``req`` in the calling thread if this worker is idle. INLINE_DONE: ``req`` is
        complete (its callback is not called). NOT_RUN: the caller should queue it. HANDED_OFF:
        the engine failed and ``req`` went to the failure handler (it completes through its
        callback)."""
        with self._cond:
            if (
                self.dead
                or self.closing
                or self._inline
                or self._queue
                or self.running_items
                or self._running
            ):
                return NOT_RUN
            self._inline = True
            self.running_items = req.n
            self.running_since = t0 = time.perf_counter()
        req.t_start = t0
        req.engine = self.name
        try:
            outputs = self.engine.run(req.feeds)
        except InvalidArgument as exc:
            self._end_inline(t0, req.n, ok=False)
            req.callback = None
            req.finish(error=InputError(f"the model rejected the input: {exc}"))
            return INLINE_DONE
        except Exception as exc:  # noqa: BLE001 - any engine error takes the engine out
            self._fail([req], exc)
            return HANDED_OFF
        if not self._end_inline(t0, req.n, ok=True):
            return HANDED_OFF  # abandoned by the watchdog meanwhile; the pool owns req now
        req.callback = None
        req.finish(outputs)
        return INLINE_DONE

    def _end_inline(self, t0: float, n: int, ok: bool) -> bool:
        with self._cond:
            self._inline = False
            if self.dead:
                return False
            self.running_items = 0
            self.running_since = 0.0
            if ok:
                self._record(time.perf_counter() - t0, n)
            else:
                self.errors += 1
            if self._queue or self.closing:
                self._cond.notify()
        return True

    # ---- lifecycle

    def close(self) -> None:
        """Stop accepting; the thread finishes what is queued, then exits."""
        with self._cond:
            self.closing = True
            self._cond.notify_all()

    def join(self, timeout: float | None = None) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def abandon(self, exc: BaseException) -> bool:
        """Take this worker out from outside (hung engine): its running batch and queue go to the
        failure handler now; whatever the engine returns later is dropped."""
        return self._fail([], exc)

    # ---- the batching thread

    def _take_batch(self) -> list[Request] | None:
        """Called with the lock held; waits for work, returns a batch or None to exit."""
        queue = self._queue
        while not self.dead and (not queue or self._inline):
            if self.closing and not queue and not self._inline:
                return None
            self._cond.wait()
        if self.dead:
            return None
        first = queue.popleft()
        batch = [first]
        self._running = batch
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
        self.running_since = time.perf_counter()
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
                    outputs = self.engine.run(feeds)
                except InvalidArgument:
                    self._rerun_singly(batch)
                    continue
                except Exception as exc:  # noqa: BLE001 - any engine error takes the engine out
                    self._fail(batch, exc)
                    return
                with self._cond:
                    if self.dead:  # abandoned by the watchdog: the pool owns these requests
                        return
                    self._record(time.perf_counter() - t0, sum(r.n for r in batch))
                    self.running_items = 0
                    self.running_since = 0.0
                    self._running = []
                split_outputs(batch, outputs)
        except BaseException as exc:  # noqa: BLE001 - the thread must never die silently
            log.exception("worker %s crashed", self.name)
            self._fail([], exc)

    def _rerun_singly(self, batch: list[Request]) -> None:
        """onnxruntime said InvalidArgument: find the culprit(s) by running one by one."""
        for req in batch:
            try:
                out = self.engine.run(req.feeds)
            except InvalidArgument as exc:
                req.finish(error=InputError(f"the model rejected the input: {exc}"))
                continue
            except Exception as exc:  # noqa: BLE001
                self._fail(batch, exc)
                return
            req.finish(out)
        with self._cond:
            self.errors += 1
            self.running_items = 0
            self.running_since = 0.0
            self._running = []

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
        self.batches += 1
        self.items += n
        counts = self.batch_size_counts
        counts[n if n < len(counts) else -1] += 1

    def _fail(self, running: list[Request], exc: BaseException) -> bool:
        """Mark dead (once) and hand the running/forming batch and the queue to the failure
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
            self.running_since = 0.0
            self._running = []
            self._cond.notify_all()
        log.error("engine %s failed (%s: %s); taking it out", self.name, type(exc).__name__, exc)
        self._on_failure(self, taken, queued, exc)
        return True


def _same_shapes(a: Request, b: Request) -> bool:
    return all(a.feeds[k].shape[1:] == b.feeds[k].shape[1:] for k in a.feeds)
