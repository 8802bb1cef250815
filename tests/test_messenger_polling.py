"""The server's reply polling: a wait after every pull, as long as pulls cost ~1/20 of the time.

A pull asks the LinkState about every pending message id (flwr's ``get_message_res`` validates
each), so pulling again right after each reply costs O(cohort^2) per round: at 1,000 clients
that is seconds of server CPU a round (``benchmarks/scale``). Flower's own grid sleeps a fixed
0.1 s after every pull; ours sleeps 20x the last pull's time, between 10 ms and its
``poll_interval``, so a small cohort's last reply is not waited for up to 0.1 s.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from server.strategy.messaging import MIN_POLL_S, Messenger


class TricklingGrid:
    """Answers one pending message per pull, the way replies trickle in from busy actors; each
    pull advances a virtual clock by ``seconds_per_id`` per pending id."""

    def __init__(self, seconds_per_id: float) -> None:
        self.pulls: list[int] = []
        self.now = 0.0
        self.seconds_per_id = seconds_per_id

    def pull_messages(self, message_ids: list[str]) -> list[SimpleNamespace]:
        self.pulls.append(len(message_ids))
        self.now += self.seconds_per_id * len(message_ids)
        first = sorted(message_ids)[0]
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=first, src_node_id=1))]


@pytest.mark.parametrize(
    ("seconds_per_id", "expected"),
    [
        (0.0, [MIN_POLL_S] * 4),  # cheap pulls: the shortest wait, not 0.1 s
        (0.001, [0.1, 0.08, 0.06, 0.04]),  # 20x the last pull (5, 4, 3, 2 ids)
        (0.01, [0.1] * 4),  # costly pulls: never more than one per poll_interval
    ],
)
def test_a_wait_after_every_pull_scaled_to_what_a_pull_costs(
    seconds_per_id: float, expected: list[float]
) -> None:
    grid = TricklingGrid(seconds_per_id)
    sleeps: list[float] = []
    messenger = Messenger(grid, poll_interval=0.1, clock=lambda: grid.now, sleep=sleeps.append)  # type: ignore[arg-type]
    pending: dict[str, object] = {f"m{i}": None for i in range(5)}

    for reply in messenger.collect(pending, deadline=60.0):
        pending.pop(reply.metadata.reply_to_message_id)

    assert grid.pulls == [5, 4, 3, 2, 1]  # one pull per wait however fast replies stream in
    assert sleeps == pytest.approx(expected)  # between pulls, not after the last reply
