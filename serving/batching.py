"""Requests as futures, and dynamic batching: concatenate along axis 0, split the outputs back.

A :class:`Request` carries validated feeds and its row count ``n``. It completes exactly once, with
outputs or an error, and then calls its ``callback`` from the thread that completed it; an asyncio
caller passes a callback that hops to its loop (``loop.call_soon_threadsafe``), a blocking caller
waits on :meth:`Request.wait`. Timestamps (``perf_counter``): ``t_submit`` when created,
``t_start`` when its batch started running; queue time is ``t_start - t_submit``. A request
dispatched to a pool carries that version's :class:`~serving.statistics.ModelStatistics`
(``stats``); completing records its outcome there, once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from serving.statistics import ModelStatistics

log = logging.getLogger(__name__)
_done_lock = threading.Lock()


class Request:
    __slots__ = (
        "feeds",
        "n",
        "callback",
        "outputs",
        "error",
        "t_submit",
        "t_start",
        "attempts",
        "done",
        "_event",
        "engine",
        "stats",
    )

    def __init__(
        self,
        feeds: Mapping[str, np.ndarray],
        n: int,
        callback: Callable[[Request], None] | None = None,
    ) -> None:
        self.feeds = feeds
        self.n = n
        self.callback = callback
        self.outputs: dict[str, np.ndarray] | None = None
        self.error: BaseException | None = None
        self.t_submit = time.perf_counter()
        self.t_start = 0.0
        self.attempts = 0
        self.done = False
        self._event: threading.Event | None = None
        self.engine = ""
        self.stats: ModelStatistics | None = None

    def finish(
        self, outputs: dict[str, np.ndarray] | None = None, error: BaseException | None = None
    ) -> bool:
        """Complete the request (first call wins; later calls return False and do nothing)."""
        with _done_lock:  # the answer is set before anyone can see the request done
            if self.done:
                return False
            self.outputs = outputs
            self.error = error
            self.done = True
            event = self._event
        stats = self.stats
        if stats is not None:
            stats.record_request(error is None, int((time.perf_counter() - self.t_submit) * 1e9))
        if event is not None:
            event.set()
        cb = self.callback
        if cb is not None:
            try:
                cb(self)
            except Exception:  # noqa: BLE001 - a gone caller must not take the engine down
                log.warning("completion callback of a request failed", exc_info=True)
        return True

    def wait(self, timeout: float | None = None) -> dict[str, np.ndarray]:
        """Block until done; returns the outputs or raises the error (TimeoutError on timeout)."""
        with _done_lock:
            if not self.done and self._event is None:
                self._event = threading.Event()
            event = self._event
        if event is not None and not event.wait(timeout):
            raise TimeoutError(f"request not completed within {timeout} s")
        if self.error is not None:
            raise self.error
        assert self.outputs is not None
        return self.outputs

    @property
    def queue_seconds(self) -> float:
        return max(0.0, self.t_start - self.t_submit) if self.t_start else 0.0


def concat_feeds(batch: Sequence[Request]) -> dict[str, np.ndarray]:
    """The batch's feeds concatenated along axis 0 (the requests' own arrays when only one)."""
    if len(batch) == 1:
        return dict(batch[0].feeds)
    first = batch[0].feeds
    return {name: np.concatenate([r.feeds[name] for r in batch], axis=0) for name in first}


def split_outputs(
    batch: Sequence[Request], outputs: Mapping[str, np.ndarray]
) -> list[dict[str, np.ndarray]]:
    """Each request's rows of ``outputs``, in ``batch`` order (views, no copies)."""
    if len(batch) == 1:
        return [dict(outputs)]
    parts = []
    offset = 0
    for req in batch:
        end = offset + req.n
        parts.append({name: value[offset:end] for name, value in outputs.items()})
        offset = end
    return parts


def pad_rows(feeds: Mapping[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
    """Each feed grown along axis 0 to ``rows`` by repeating its last row (not zeros: a repeated
    row is an input the model accepts, whatever its domain); the extra outputs are cut off by
    the caller. Feeds already ``rows`` long or longer are returned as they are."""
    out = {}
    for name, arr in feeds.items():
        extra = rows - arr.shape[0]
        out[name] = arr if extra <= 0 else np.concatenate([arr, np.repeat(arr[-1:], extra, axis=0)])
    return out
