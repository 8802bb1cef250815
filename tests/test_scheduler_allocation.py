"""Engines by demand (serving/scheduler_allocation.py): every version keeps one, the rest follows
demand, moves need a margin so nothing flaps; and the demand measured from a pool's counters."""

from __future__ import annotations

import pytest

from serving.scheduler_allocation import DemandMeter, allocate, ideal_shares


def test_spare_engines_follow_demand_and_every_version_keeps_one() -> None:
    target = allocate({"a": 3.0, "b": 1.0, "c": 0.0}, {"a": 1, "b": 1, "c": 1}, total=7)
    assert target == {"a": 4, "b": 2, "c": 1}
    assert sum(target.values()) == 7


def test_a_version_gets_what_its_demand_needs_and_the_rest_stays_free() -> None:
    assert ideal_shares({"a": 0.0, "b": 0.0}, 6) == {"a": 1.0, "b": 1.0}
    assert allocate({"a": 0.0, "b": 0.0}, {"a": 1, "b": 1}, total=6) == {"a": 1, "b": 1}
    # a keeps 0.5 engine busy: it needs 1 + 2 x 0.5 = 2, not the 5 spare ones
    assert allocate({"a": 0.5, "b": 0.0}, {"a": 1, "b": 1}, total=7) == {"a": 2, "b": 1}
    # demand gone: engines go back to the free ones (held 4, ideal 1)
    assert allocate({"a": 0.0, "b": 0.0}, {"a": 4, "b": 1}, total=6) == {"a": 2, "b": 1}


def test_engines_move_to_the_busy_version() -> None:
    assert allocate({"a": 5.0, "b": 0.0}, {"a": 2, "b": 2}, total=4) == {"a": 3, "b": 1}


def test_a_small_change_in_demand_moves_nothing() -> None:
    held = {"a": 2, "b": 2}
    # ideal a = 1 + 2 * 0.6 = 2.2: one engine more would overshoot by as much as it gains
    assert allocate({"a": 0.6, "b": 0.4}, held, total=4) == held


def test_no_flapping_between_two_rounds_of_the_same_demand() -> None:
    demand = {"a": 0.7, "b": 0.3}  # ideal a = 2.4, b = 1.6
    first = allocate(demand, {"a": 1, "b": 3}, total=4)
    assert first == {"a": 2, "b": 2}
    assert allocate(demand, first, total=4) == first


def test_over_budget_sheds_from_the_richest_and_never_below_one() -> None:
    assert allocate({"a": 1.0, "b": 1.0}, {"a": 4, "b": 1}, total=3) == {"a": 2, "b": 1}
    # fewer engines than versions: each keeps its one
    assert allocate({"a": 1.0, "b": 1.0, "c": 1.0}, {"a": 1, "b": 1, "c": 1}, total=2) == {
        "a": 1,
        "b": 1,
        "c": 1,
    }


def test_demand_is_offered_load_plus_backlog_smoothed() -> None:
    meter = DemandMeter(period_s=1.0, smoothing=0.5)
    assert meter.sample("a", arrived_rows=0, outstanding_s=0.5, row_s=0.01, now=0.0) == 0.5
    # 200 rows in 1 s at 10 ms a row keep 2 engines busy, no backlog: raw 2.0, smoothed 1.25
    assert meter.sample("a", 200, 0.0, 0.01, now=1.0) == pytest.approx(1.25)
    assert meter.sample("a", 400, 0.0, 0.01, now=2.0) == pytest.approx(1.625)
    meter.forget(set())
    assert meter.sample("a", 400, 0.0, 0.01, now=3.0) == 0.0  # history gone: backlog only
