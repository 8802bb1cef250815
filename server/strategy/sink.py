"""The version sink: who consumes each :class:`VersionEvent`, and the two ways a loop feeds one.

A sink (the app's evaluate → export → history → checkpoint, a test's recorder) implements
:class:`VersionSink`. A loop hands it the versions through a runner:

* :class:`InlineRunner` calls ``accept`` on the loop's thread: the loop waits for it.
* :class:`BackgroundRunner` (``strategy.publish_in_background``) calls it on one worker thread,
  so the loop goes straight back to the clients: a parameter server's critical path is *apply the
  update, send the new model*; evaluating, checkpointing and exporting a version is side work.

One worker keeps the versions in order (``accept`` sees 1, 2, 3, …). The queue is bounded: with
``max_pending`` versions waiting, :meth:`BackgroundRunner.submit` blocks until the worker catches
up, so at most ``max_pending + 1`` versions (their arrays and state snapshots) exist besides the
current one — the server's memory stays O(model). An exception in ``accept`` is raised in the
loop's thread at the next ``submit`` or at ``close``, and the versions queued behind the failed one
are not handed over (as inline, where the exception ends the run at that version). A stop request
(``accept`` returned True) takes effect at the loop's next check of :attr:`stop_requested`; in
background the versions made meanwhile are still handed over.
"""

from __future__ import annotations

import logging
import queue
import threading
from abc import ABC, abstractmethod
from typing import Protocol

from server.strategy.events import VersionEvent

log = logging.getLogger(__name__)


class VersionSink(Protocol):
    """Consumes the global versions of a run, in version order."""

    def accept(self, event: VersionEvent) -> bool:
        """Consume one version; ``True`` (the bool, nothing else) asks the run to stop after it."""
        ...

    def close(self) -> None:
        """No more versions will come (called by whoever built the sink, after the run)."""
        ...


class SinkRunner(ABC):
    """Hands versions to a sink and remembers whether it asked to stop."""

    def __init__(self, sink: VersionSink) -> None:
        self.sink = sink
        self._stop_requested = False

    @property
    def stop_requested(self) -> bool:
        return self._stop_requested

    @abstractmethod
    def submit(self, event: VersionEvent) -> None:
        """Hand one version over (now, or queued)."""

    @abstractmethod
    def close(self) -> None:
        """Return once every submitted version was handed over (the sink itself stays open)."""

    def _hand_over(self, event: VersionEvent) -> None:
        # only the bool True stops: a sink that happens to return a value (a path) does not
        if self.sink.accept(event) is True:
            self._stop_requested = True
            log.info("the version sink asked to stop after version %d", event.version)


class InlineRunner(SinkRunner):
    """Calls the sink on the loop's thread."""

    def submit(self, event: VersionEvent) -> None:
        self._hand_over(event)

    def close(self) -> None:
        """Nothing is queued: every version was handed over in :meth:`submit`."""


class BackgroundRunner(SinkRunner):
    """Calls the sink on one worker thread, in submission order, with a bounded queue."""

    def __init__(self, sink: VersionSink, max_pending: int = 1) -> None:
        if max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, got {max_pending}")
        super().__init__(sink)
        self._queue: queue.Queue[VersionEvent | None] = queue.Queue(maxsize=max_pending)
        self._error: BaseException | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._work, name="version-sink", daemon=True)
        self._thread.start()

    def submit(self, event: VersionEvent) -> None:
        """Queue one version; blocks while ``max_pending`` are waiting."""
        self.raise_if_failed()
        if self._closed:
            raise RuntimeError("BackgroundRunner is closed")
        self._queue.put(event)

    def raise_if_failed(self) -> None:
        """Re-raise, in the caller's thread, the first exception the sink raised."""
        if self._error is not None:
            raise RuntimeError(f"the version sink failed: {self._error!r}") from self._error

    def close(self) -> None:
        """Hand over everything queued, stop the worker, then re-raise its error if any."""
        if not self._closed:
            self._closed = True
            self._queue.put(None)
            self._thread.join()
        self.raise_if_failed()

    def _work(self) -> None:
        while (event := self._queue.get()) is not None:
            if self._error is not None:
                continue  # an earlier one failed: the loop stops at its next submit
            try:
                self._hand_over(event)
            except BaseException as error:  # handed to the loop's thread, never swallowed
                log.exception("the version sink failed at version %d; the run stops", event.version)
                self._error = error
