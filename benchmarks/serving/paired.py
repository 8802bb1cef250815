"""Interleaved paired measurement: contenders measured round by round under the same wrk load,
and the medians / per-round ratios the tables report.

On a small shared machine the compared measurements must be interleaved: each round measures every
contender once for one window after its own warm-up, so a slow spell of the machine hits all of
them, and the comparison is the median of the per-round ratios.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from benchmarks.common import median
from benchmarks.serving.config import CONNECTIONS
from benchmarks.serving.load import wrk_load


def progress(label: str, r: dict) -> None:
    """One line on stderr about a finished load, with the machine's load average."""
    print(
        f"  [{label}] {r['requests_per_s']:,.0f} req/s, {r['rows_per_s']:,.0f} images/s, "
        f"p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms, errors {r['errors']}, client "
        f"{r['client_cores']:.2f} / server {r['server_cores']:.2f} / machine "
        f"{r['machine_busy_cores']:.2f} cores, load {os.getloadavg()[0]:.1f}",
        file=sys.stderr,
        flush=True,
    )


class Load:
    """One contender of a paired comparison: POSTs ``body`` to ``url``."""

    def __init__(
        self,
        label: str,
        url: str,
        body: bytes,
        header_length: int,
        rows: int,
        pids: Callable[[], Sequence[int]] | Sequence[int],
        *,
        computes: bool = True,
    ) -> None:
        self.label, self.url, self.body, self.hlen, self.rows, self.pids = (
            label,
            url,
            body,
            header_length,
            rows,
            pids,
        )
        #: False for the no-op endpoint: its latency does not grow with the model's run time
        self.computes = computes

    def run(self, warmup_s: float, window_s: float, windows: int) -> list[dict]:
        """``CONNECTIONS`` closed-loop wrk connections; one result per window, each with
        ``rows_per_core_s`` (images per server core-second) added."""
        res = wrk_load(
            self.url,
            self.body,
            header_length=self.hlen,
            rows=self.rows,
            connections=CONNECTIONS,
            warmup_s=warmup_s,
            window_s=window_s,
            windows=windows,
            server_pids=self.pids,
        ).as_dict()
        per_window = res.pop("windows")
        out = []
        for w in per_window:
            r = dict(res, **w)
            cores = r["server_cores"]
            r["rows_per_core_s"] = r["rows_per_s"] / cores if cores > 0 else float("nan")
            out.append(r)
        progress(self.label, dict(res, rows_per_s=res["rows_per_s"]))
        return out


def steady_latency_s(rows: int, rows_per_s: float) -> float:
    """32 clients of ``rows`` rows at ``rows_per_s``: Little's law latency of the steady state."""
    return CONNECTIONS * rows / max(rows_per_s, 1.0)


def paired(
    contenders: dict[str, Load | Callable[[], dict]],
    rows: int,
    expected_rows_per_s: float,
    args: argparse.Namespace,
) -> dict[str, list[dict]]:
    """Each contender measured ``args.rounds`` times, interleaved round by round, one window per
    round after its own warm-up. All clients start at once, so the steady state (each request
    queued behind the others) is reached after one full turn of the queue: the warm-up is the
    longer of ``args.warmup`` and 1.5x the expected latency, and a long latency gets a longer
    window (up to 8 s) so that the window holds several turns' worth of completions."""
    latency = steady_latency_s(rows, expected_rows_per_s)
    out: dict[str, list[dict]] = {k: [] for k in contenders}
    for _ in range(args.rounds):
        for key, c in contenders.items():
            if not isinstance(c, Load):
                out[key].append(c())
            elif c.computes:
                window = max(args.window, min(latency, 8.0))
                out[key] += c.run(max(args.warmup, 1.5 * latency), window, 1)
            else:
                out[key] += c.run(args.warmup, args.window, 1)
    return out


def summary(samples: list[dict]) -> dict:
    """Per numeric key the median over ``samples``; ``errors`` summed; ``n`` the sample count."""
    keys = [k for k, v in samples[0].items() if isinstance(v, (int, float))]
    s = {k: median([r[k] for r in samples]) for k in keys}
    s["errors"] = int(sum(r.get("errors", 0) for r in samples))
    s["n"] = len(samples)
    return s


def paired_ratio(a: list[dict], b: list[dict], key: str, key_b: str | None = None) -> float:
    """Median of the per-round ratios a/b (rounds pair up in order)."""
    kb = key_b or key
    return median([x[key] / y[kb] for x, y in zip(a, b, strict=False) if y[kb] > 0])
