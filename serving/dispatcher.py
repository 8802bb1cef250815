"""Least-loaded dispatch over a pool's batching workers (:mod:`serving.worker`).

:class:`Dispatcher` picks the worker for each request:

* ``least_loaded``: minimum outstanding work, in seconds: ``(queued_items + running_items + 1)
  * ewma_item_s``, the rows queued or running on the engine (rows, not requests) plus one, times
  that engine's EWMA of run time per row. Weighing rows by each engine's own speed is what keeps a
  slow engine's queue short: counting rows alone equalises the queues' lengths, so a 4x slower
  engine's requests wait 4x longer (measured: benchmarks/serving_bench.py, section policy). An
  engine not measured yet counts 0 s; ties are broken by fewer rows, then the lower EWMA of batch
  run time;
* ``round_robin``: the next worker in turn (for comparison).

A worker whose queue would exceed ``max_queue_items`` rows refuses; when every worker refuses the
dispatcher raises :class:`~serving.errors.Overloaded` (429) with ``Retry-After`` = the time the
queued rows take to drain at the measured rate, at least 1 s. A request always fits an empty queue.

Inline runs: the caller's thread (the event loop) runs the request directly
(:meth:`~serving.worker.Worker.try_inline`) only when the chosen worker is idle and the model's
runs are far below ``inline_max_s``: its EWMA under ``INLINE_FRACTION`` of it and its longest
recent run (``peak_s``) under it. The run is stopped after ``INLINE_BOUND`` x ``inline_max_s``
(at least ``INLINE_BOUND_MIN_S``) and then queued to a worker thread, so one slow input blocks the
loop for a bounded time and then turns inlining off for that engine until its peak decays.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from serving.batching import Request
from serving.errors import Overloaded, PoolClosed, Unavailable
from serving.worker import HANDED_OFF, INLINE_DONE, OK, Worker

#: the dispatch policies (``serving.policy``)
POLICIES = ("least_loaded", "round_robin")
#: inline only when the EWMA run time is under this fraction of inline_max_s
INLINE_FRACTION = 0.25
#: an inline run is stopped after this many inline_max_s ...
INLINE_BOUND = 10.0
#: ... but not before this (the watchdog's resolution)
INLINE_BOUND_MIN_S = 0.01


class Dispatcher:
    """Chooses a worker per request (see the module docstring)."""

    def __init__(
        self,
        policy: str = "least_loaded",
        *,
        max_queue_items: int = 0,
        inline_max_s: float = 0.0,
    ) -> None:
        if policy not in POLICIES:
            raise ValueError(f"serving.policy must be one of {POLICIES}, got {policy!r}")
        self.policy = policy
        self.max_queue_items = int(max_queue_items)
        self.inline_max_s = float(inline_max_s)
        #: how long an inline run may block the caller before it is stopped and queued
        self.inline_bound_s = max(INLINE_BOUND * self.inline_max_s, INLINE_BOUND_MIN_S)
        self._rr = 0

    def select(self, workers: Sequence[Worker]) -> Worker | None:
        if self.policy == "round_robin":
            n = len(workers)
            for _ in range(n):
                self._rr = (self._rr + 1) % n
                w = workers[self._rr]
                if not (w.dead or w.closing):
                    return w
            return None
        best = None
        best_key = (0.0, 0, 0.0)
        for w in workers:
            if w.dead or w.closing:
                continue
            load = w.queued_items + w.running_items
            key = ((load + 1) * w.ewma_item_s, load, w.ewma_s)
            if best is None or key < best_key:
                best, best_key = w, key
        return best

    def submit(
        self, workers: Sequence[Worker], req: Request, *, inline: bool = False, force: bool = False
    ) -> bool:
        """Queue ``req`` (or run it inline when allowed); True when it completed inline.

        Raises Overloaded (all queues full), PoolClosed (every worker draining) or Unavailable
        (no live engine). ``force`` ignores the queue bound (used for retries).
        """
        w = self.select(workers)
        if w is None:
            raise self._none_live(workers)
        if (
            inline
            and self.inline_max_s > 0
            and w.batches
            and w.ewma_s < INLINE_FRACTION * self.inline_max_s
            and w.peak_s < self.inline_max_s
        ):
            if w.running_items == 0:
                status = w.try_inline(req, self.inline_bound_s)
                if status == INLINE_DONE:
                    return True
                if status == HANDED_OFF:
                    return False
        limit = 0 if force else self.max_queue_items
        status = w.offer(req, limit)
        if status == OK:
            return False
        # the chosen one refused: try the rest, least loaded first
        others = sorted(
            (o for o in workers if o is not w and o.accepting), key=lambda o: o.outstanding
        )
        for o in others:
            if o.offer(req, limit) == OK:
                return False
        if any(o.accepting for o in workers):
            raise self._overloaded(workers)
        raise self._none_live(workers)

    def _overloaded(self, workers: Sequence[Worker]) -> Overloaded:
        live = [w for w in workers if w.accepting] or list(workers)
        queued = sum(w.queued_items for w in live)
        per_item = np.mean([w.ewma_item_s for w in live]) if live else 0.0
        drain_s = queued * float(per_item) / max(1, len(live))
        return Overloaded(
            f"server overloaded: {queued} rows queued over {len(live)} engines "
            f"(serving.max_queue_items={self.max_queue_items} per engine); retry later",
            retry_after_s=drain_s,
        )

    @staticmethod
    def _none_live(workers: Sequence[Worker]) -> Unavailable:
        if workers and all(w.closing for w in workers):
            return PoolClosed("model version is being unloaded")
        return Unavailable("no live engine for this model right now; a replacement is starting")
