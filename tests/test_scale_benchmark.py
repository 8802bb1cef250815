"""benchmarks.scale.clients: the order of the repeated runs and how they make one cell."""

from __future__ import annotations

import math

import pytest

from benchmarks.scale.clients import STRATEGIES, Cell, Peaks, combine, run_order


def _run(strategy: str, round_s: float, rc: int = 0, rss: float = 100.0) -> Cell:
    return Cell(
        strategy,
        100,
        rc,
        startup_s=10 * round_s,
        first_round_s=2 * round_s,
        round_s=round_s,
        training_s=0.5,
        peaks=Peaks(rss_mib=rss, open_files=int(rss), threads=3),
        wall_s=60.0,
        run_dir=f"run-{round_s}",
    )


def test_runs_alternate_which_strategy_goes_first() -> None:
    # one order every time let a drift of the machine's load always favour the same strategy
    orders = [run_order(repeat) for repeat in range(4)]
    assert orders[0] == STRATEGIES
    assert orders[1] == tuple(reversed(STRATEGIES))
    assert orders[2] == orders[0] and orders[3] == orders[1]
    assert all(sorted(order) == sorted(STRATEGIES) for order in orders)


def test_a_cell_is_the_median_of_its_runs_with_the_highest_peaks() -> None:
    runs = [_run("fedavg", 3.0, rss=120), _run("fedavg", 2.0, rss=100), _run("fedavg", 5.0)]
    cell = combine(runs)
    assert (cell.strategy, cell.clients, cell.returncode) == ("fedavg", 100, 0)
    assert cell.round_s == 3.0
    assert cell.startup_s == 30.0 and cell.first_round_s == 6.0
    assert cell.overhead_s == pytest.approx(2.5)
    assert cell.runs_round_s == [3.0, 2.0, 5.0]
    assert cell.peaks == Peaks(rss_mib=120, open_files=120, threads=3)
    assert cell.wall_s == 180.0


def test_a_failed_run_is_reported_and_left_out_of_the_times() -> None:
    failed = _run("fedavg", float("nan"), rc=1)
    cell = combine([_run("fedavg", 2.0), failed, _run("fedavg", 4.0)])
    assert cell.returncode == 1
    assert cell.round_s == 3.0
    assert math.isnan(combine([failed]).round_s)


def test_runs_of_different_cells_are_refused() -> None:
    with pytest.raises(ValueError, match="one \\(strategy, clients\\) cell"):
        combine([_run("fedavg", 2.0), _run("flower_fedavg", 2.0)])
    with pytest.raises(ValueError):
        combine([])
