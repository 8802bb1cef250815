"""Fast versions of the chaos benchmark's serving rows (benchmarks/chaos/serving_rows.py): each
starts fedserve-serve, injects its fault under load and checks the row's target."""

from __future__ import annotations

from benchmarks.chaos import serving_rows


def check(row: serving_rows.Row) -> None:
    assert row.ok, f"{row.fault}: {row.figure} (target {row.target}); {row.details}"


def test_fuzzed_requests_get_no_5xx_and_keep_their_connection() -> None:
    check(serving_rows.fuzz_row(requests=600))


def test_corrupt_versions_under_load_are_never_served_and_fail_nothing() -> None:
    check(serving_rows.corrupt_row(seconds=3.0, clients=4))


def test_sigterm_under_load_loses_nothing() -> None:
    check(serving_rows.sigterm_row(clients=4))


def test_short_soak_with_swaps() -> None:
    row = serving_rows.soak_row(minutes=0.1, swap_every_s=2.0, fast_swaps=20, clients=4)
    check(row)
    assert row.details["metrics_bytes"] < 64 * 1024  # one loaded version's series


def test_poison_requests_fail_no_innocent_request() -> None:
    check(serving_rows.poison_row(seconds=3.0, clients=8))


def test_slow_model_is_stopped_and_every_request_answered() -> None:
    check(serving_rows.slow_row(rows=1500))
