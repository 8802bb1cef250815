"""What one hop between a front-end process and the engine process costs, per request.

    .venv/bin/python -m benchmarks.serving.frontend_hop [--seconds 5] [--rounds 3]

Front-end processes that keep one shared engine pool per version (issue 16, item 5) must forward
each decoded request to the process that holds the engines and get the answer back. This measures
that hop alone, as such a design would make it: two processes on uvloop, one Unix stream socket,
length-prefixed frames (a request id, then the tensor bytes of a batch-1 MNIST image, 3,136 bytes;
the answer a batch-1 logits tensor, 40 bytes), the engine side answering at once; 32 requests in
flight (wrk's 32 connections: several frames share a read) and 1 (every frame its own write, read
and wake-up on each side, as at a low rate). Reported: round trips per second and the CPU
microseconds per round trip of each side (``/proc/<pid>/stat``), to set against a batch-1
request's whole cost (~650 us, ``benchmarks.serving.frontend_processes``) and what a second
front-end process gains there.
"""

from __future__ import annotations

import argparse
import asyncio
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import uvloop

from benchmarks.common import median, table
from benchmarks.serving.load import proc_cpu_seconds

#: frame header: payload length, request id
HEADER = struct.Struct("<II")
REQUEST_BYTES = 1 * 28 * 28 * 4
ANSWER_BYTES = 10 * 4
#: requests kept outstanding by the front end: 32 (as wrk's connections) and 1 (ping-pong)
IN_FLIGHT = (32, 1)


class FrameReader:
    """Splits a byte stream into ``(request id, payload)`` frames."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        self._buffer += data
        frames = []
        while len(self._buffer) >= HEADER.size:
            length, request_id = HEADER.unpack_from(self._buffer)
            end = HEADER.size + length
            if len(self._buffer) < end:
                break
            frames.append((request_id, bytes(self._buffer[HEADER.size : end])))
            del self._buffer[:end]
        return frames


class EngineSide(asyncio.Protocol):
    """Answers every request frame at once with a logits-sized frame of the same id."""

    def __init__(self) -> None:
        self.reader = FrameReader()
        self.answer = b"\0" * ANSWER_BYTES

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        for request_id, _ in self.reader.feed(data):
            self.transport.write(HEADER.pack(len(self.answer), request_id) + self.answer)


class FrontEndSide(asyncio.Protocol):
    """Keeps ``in_flight`` requests outstanding and counts the answers."""

    def __init__(self, in_flight: int) -> None:
        self.reader = FrameReader()
        self.request = b"\1" * REQUEST_BYTES
        self.in_flight = in_flight
        self.answered = 0
        self.next_id = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        for _ in range(self.in_flight):
            self._send()

    def _send(self) -> None:
        self.next_id += 1
        self.transport.write(HEADER.pack(len(self.request), self.next_id) + self.request)

    def data_received(self, data: bytes) -> None:
        for _ in self.reader.feed(data):
            self.answered += 1
            self._send()


def serve(path: str) -> None:
    """The engine side, until killed."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_unix_server(EngineSide, path)
        print("ready", flush=True)
        async with server:
            await server.serve_forever()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())


def measure(path: str, engine_pid: int, seconds: float, in_flight: int) -> dict[str, float]:
    """One window: round trips/s and CPU us per round trip of each side."""

    async def main() -> dict[str, float]:
        loop = asyncio.get_running_loop()
        _, side = await loop.create_unix_connection(lambda: FrontEndSide(in_flight), path)
        await asyncio.sleep(0.5)  # warm-up
        before = side.answered, time.process_time(), proc_cpu_seconds([engine_pid])[engine_pid]
        start = time.perf_counter()
        await asyncio.sleep(seconds)
        trips = side.answered - before[0]
        elapsed = time.perf_counter() - start
        front_cpu = time.process_time() - before[1]
        engine_cpu = proc_cpu_seconds([engine_pid])[engine_pid] - before[2]
        side.transport.close()
        return {
            "round_trips_per_s": trips / elapsed,
            "front_end_us": 1e6 * front_cpu / max(trips, 1),
            "engine_side_us": 1e6 * engine_cpu / max(trips, 1),
        }

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--serve", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.serve:
        serve(args.serve)
        return 0
    with tempfile.TemporaryDirectory(prefix="fedserve-hop-") as tmp:
        path = str(Path(tmp, "engine.sock"))
        engine = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.serving.frontend_hop", "--serve", path],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            if engine.stdout is None or engine.stdout.readline().strip() != "ready":
                raise RuntimeError("the engine side did not start; see its stderr above")
            samples: dict[int, list[dict[str, float]]] = {n: [] for n in IN_FLIGHT}
            for _ in range(args.rounds):  # interleaved
                for n in IN_FLIGHT:
                    samples[n].append(measure(path, engine.pid, args.seconds, n))
        finally:
            engine.kill()
            engine.wait()
    rows = [
        [
            n,
            f"{median([s['round_trips_per_s'] for s in runs]):,.0f}",
            f"{median([s['front_end_us'] for s in runs]):.1f}",
            f"{median([s['engine_side_us'] for s in runs]):.1f}",
            f"{median([s['front_end_us'] + s['engine_side_us'] for s in runs]):.1f}",
        ]
        for n, runs in samples.items()
    ]
    print(
        f"one hop (Unix socket, uvloop, {REQUEST_BYTES} B request, {ANSWER_BYTES} B answer), "
        f"medians of {args.rounds} windows of {args.seconds:g} s"
    )
    print(
        table(
            ["in flight", "round trips/s", "front-end CPU us/trip", "engine-side CPU us/trip",
             "both, us/trip"],
            rows,
        )
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
