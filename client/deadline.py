"""A message's deadline, seen from the client: the server stops waiting when its TTL runs out.

``deadline = created_at + ttl`` (both the server's, wall clock). Flower's runtime hands a client
a message even when it already expired: the simulation engine queues every message it takes from
the SuperLink and never looks at its TTL again, so with a few Ray actors the messages of a round
that timed out (and a straggler still working on one) would hold the actors while the next round's
cohort waits behind them, and time out in turn. A client therefore gives up, with
:class:`task.training.DeadlinePassed`, wherever the work would be wasted: before it starts an
expired message, between training batches, and in any emulated wait that runs past the deadline.
A reply after the deadline is dropped by the SuperLink anyway; the server counts the message as
timed out.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from flwr.app import Message

from task.training import DeadlinePassed


@dataclass(frozen=True)
class Deadline:
    """When a message's reply stops being useful (``time.time()`` stamp)."""

    at: float
    clock: Callable[[], float] = field(default=time.time, compare=False)
    pause: Callable[[float], None] = field(default=time.sleep, compare=False)

    @classmethod
    def of(cls, message: Message) -> Deadline:
        metadata = message.metadata
        return cls(float(metadata.created_at) + float(metadata.ttl))

    def remaining(self) -> float:
        return self.at - self.clock()

    def check(self, doing: str) -> None:
        """Raise :class:`DeadlinePassed` when the deadline passed before ``doing``."""
        late = self.clock() - self.at
        if late >= 0:
            raise DeadlinePassed(f"the message expired {late:.1f}s before {doing}; skipped")

    def sleep(self, seconds: float) -> None:
        """Sleep ``seconds``, but not past the deadline: there, raise :class:`DeadlinePassed`."""
        left = self.remaining()
        if seconds < left:
            self.pause(max(seconds, 0.0))
            return
        self.pause(max(left, 0.0))
        raise DeadlinePassed(
            f"the emulated device needed {seconds:.1f}s more, {seconds - left:.1f}s past the "
            "deadline; gave up there"
        )
