"""Our server's batch-1 latency floor, and whether garbage collection is behind it.

The same wrk load (cnn, binary v2, 1 row, 32 connections, 3 windows of 3 s after 1 s of warm-up)
against variants of ``fedserve-serve`` with two healthy engines, interleaved for ``--rounds``
rounds: ``default``; ``freeze`` (``gc.freeze()`` before serving: startup objects leave the
collector's generations); ``nogc`` (``gc.disable()``: no collection at all); ``switch<us>``
(``sys.setswitchinterval``: how long a thread waits for the GIL). Prints req/s, p50/p99 and the
server's and wrk's CPU in cores per variant and round.

    .venv/bin/python -m benchmarks.serving.p99_floor                             # ~2 min
    .venv/bin/python -m benchmarks.serving.p99_floor --variants default,switch200 \
        --server serving.inline_max_ms=0

The variants run as :mod:`benchmarks.serving.serve_variant`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from benchmarks.serving.load import wrk_available, wrk_load
from benchmarks.serving.models import bodies_for, export_models
from benchmarks.serving.servers import server_process
from server.processes import free_port

VARIANTS = ("default", "freeze", "nogc")  # and switch<us>: sys.setswitchinterval(<us> / 1e6)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated")
    parser.add_argument(
        "--server",
        nargs="*",
        default=[],
        help="extra fedserve-serve overrides, e.g. "
        "serving.inline_max_ms=0 (engine threads instead of inline runs in the event loop)",
    )
    args = parser.parse_args()
    if not wrk_available():
        parser.error("wrk is needed for the load: apt-get install wrk")
    with tempfile.TemporaryDirectory(prefix="fedserve-p99-") as tmp:
        repo = Path(tmp, "repo")
        repo.mkdir()
        info = export_models(repo, ["cnn"])["cnn"]
        body, header_length = bodies_for(info)[1]
        print("variant    round    req/s  p50 ms  p99 ms  server cores  wrk cores")
        for round_index in range(1, args.rounds + 1):
            for variant in args.variants.split(","):
                port = free_port()
                base = f"http://127.0.0.1:{port}"
                cmd = [
                    sys.executable,
                    "-m",
                    "benchmarks.serving.serve_variant",
                    variant,
                    f"repository={repo}",
                    f"port={port}",
                    "log_level=warning",
                    "models=[cnn]",
                    *args.server,
                ]
                with server_process(cmd, base, variant, "cnn") as proc:
                    r = wrk_load(
                        f"{base}/v2/models/cnn/infer",
                        body,
                        header_length=header_length,
                        rows=1,
                        server_pids=[proc.pid],
                    )
                print(
                    f"{variant:<10} {round_index:>5} {r.requests_per_s:>8,.0f} {r.p50_ms:>7.1f} "
                    f"{r.p99_ms:>7.1f} {r.server_cores:>13.2f} {r.client_cores:>10.2f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
