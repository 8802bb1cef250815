"""The server's reply polling costs one pull per poll interval, however fast replies stream in.

A pull asks the LinkState about every pending message id (flwr's ``get_message_res`` validates
each), so pulling again right after each reply costs O(cohort^2) per round: at 1,000 clients
that is seconds of server CPU a round (``benchmarks/scale``). Flower's own grid sleeps its
``pull_interval`` after every pull; so does ours.
"""

from __future__ import annotations

from types import SimpleNamespace

from server.strategy.messaging import Messenger


class TricklingGrid:
    """Answers one pending message per pull, the way replies trickle in from busy actors."""

    def __init__(self) -> None:
        self.pulls: list[int] = []

    def pull_messages(self, message_ids: list[str]) -> list[SimpleNamespace]:
        self.pulls.append(len(message_ids))
        first = sorted(message_ids)[0]
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=first, src_node_id=1))]


def test_one_pull_per_poll_interval_while_replies_stream_in() -> None:
    grid = TricklingGrid()
    sleeps: list[float] = []
    messenger = Messenger(grid, poll_interval=0.1, clock=lambda: 0.0, sleep=sleeps.append)  # type: ignore[arg-type]
    pending: dict[str, object] = {f"m{i}": None for i in range(5)}

    for reply in messenger.collect(pending, deadline=60.0):
        pending.pop(reply.metadata.reply_to_message_id)

    assert grid.pulls == [5, 4, 3, 2, 1]
    assert sleeps == [0.1] * 4  # between pulls, not after the last reply
