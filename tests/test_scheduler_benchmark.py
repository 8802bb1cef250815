"""benchmarks.scheduler.bench: the miss shares that bound what an on-demand contender can reach."""

from __future__ import annotations

from benchmarks.scheduler.bench import furthest_use_miss_share, ideal_lru_miss_share
from benchmarks.scheduler.workload import Arrival, Target


def _trace(order: list[int]) -> tuple[list[Target], list[Arrival], dict[str, dict[str, float]]]:
    targets = [Target("m", v + 1, "", b"", 0) for v in range(max(order) + 1)]
    arrivals = [Arrival(float(i), v, 1) for i, v in enumerate(order)]
    sizes = {t.key: {"memory_bytes": 10.0} for t in targets}
    return targets, arrivals, sizes


def test_lru_misses_a_cycle_one_longer_than_the_cache_and_the_future_does_not() -> None:
    # three versions in a cycle, room for two: LRU always evicts the next one it needs
    targets, arrivals, sizes = _trace([0, 1, 2] * 10)
    assert ideal_lru_miss_share(targets, arrivals, sizes, budget=20, slots=8) == 1.0
    floor = furthest_use_miss_share(targets, arrivals, sizes, budget=20, slots=8)
    assert 0.5 <= floor < 0.6  # 2 first misses, then every other request (16 of 30)


def test_the_engine_slots_bound_residency_like_the_memory() -> None:
    targets, arrivals, sizes = _trace([0, 1, 0, 1, 0, 1])
    assert furthest_use_miss_share(targets, arrivals, sizes, budget=100, slots=2) == 2 / 6
    assert furthest_use_miss_share(targets, arrivals, sizes, budget=100, slots=1) == 1.0
