"""A VersionSink for strategy tests: keeps every event, optionally answers through a function."""

from __future__ import annotations

from collections.abc import Callable

from server.strategy.events import VersionEvent


class Recorder:
    """Records each :class:`VersionEvent`; ``accept`` returns ``on_event(event)`` (any value: the
    strategy stops only on the bool True), or False without one."""

    def __init__(self, on_event: Callable[[VersionEvent], object] | None = None) -> None:
        self.on_event = on_event
        self.events: list[VersionEvent] = []
        self.closed = False

    def accept(self, event: VersionEvent) -> bool:
        self.events.append(event)
        return self.on_event(event) if self.on_event is not None else False  # type: ignore[return-value]

    def close(self) -> None:
        self.closed = True

    @property
    def versions(self) -> list[int]:
        return [event.version for event in self.events]
