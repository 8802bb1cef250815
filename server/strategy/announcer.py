"""Announcing versions off the training path (``strategy.publish_in_background``).

A parameter server's critical path is *apply the update, send the new model*; evaluating,
recording, checkpointing and exporting a version is side work. With ``publish_in_background`` the
loops hand each new version to one worker thread and go straight back to the clients, so a client
that replies during a 0.5 s central evaluation is sent the next model at once instead of idling.

One worker keeps the announcements in version order (``on_version`` sees 1, 2, 3, …). The queue is
bounded: with ``max_pending`` versions waiting, :meth:`submit` blocks until the worker catches up,
so at most ``max_pending + 1`` versions (their arrays and state snapshots) exist besides the
current one — the server's memory stays O(model). An exception in the worker is raised in the
loop's thread at the next :meth:`submit` or at :meth:`close`, and the versions queued behind the
failed one are not announced (as inline, where the exception ends the run at that version).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

Announcement = Callable[[], None]


class VersionAnnouncer:
    """One background worker running announcements in submission order."""

    def __init__(self, max_pending: int = 1) -> None:
        if max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, got {max_pending}")
        self._queue: queue.Queue[Announcement | None] = queue.Queue(maxsize=max_pending)
        self._error: BaseException | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._work, name="version-announcer", daemon=True)
        self._thread.start()

    def submit(self, announcement: Announcement) -> None:
        """Queue one announcement; blocks while ``max_pending`` are waiting."""
        self.raise_if_failed()
        if self._closed:
            raise RuntimeError("VersionAnnouncer is closed")
        self._queue.put(announcement)

    def raise_if_failed(self) -> None:
        """Re-raise, in the caller's thread, the first exception an announcement raised."""
        if self._error is not None:
            raise RuntimeError(f"announcing a version failed: {self._error!r}") from self._error

    def close(self) -> None:
        """Announce everything queued, stop the worker, then re-raise its error if any."""
        if not self._closed:
            self._closed = True
            self._queue.put(None)
            self._thread.join()
        self.raise_if_failed()

    def _work(self) -> None:
        while (announcement := self._queue.get()) is not None:
            if self._error is not None:
                continue  # an earlier one failed: the loop stops at its next submit
            try:
                announcement()
            except BaseException as error:  # handed to the loop's thread, never swallowed
                log.exception("announcing a version failed; the run stops")
                self._error = error
