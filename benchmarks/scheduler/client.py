"""An open-loop HTTP/1.1 load generator on asyncio: requests leave at their scheduled times.

``connections`` keep-alive connections are opened up front; a request due while all are busy waits
for one (that wait counts in its latency, which runs from the scheduled send time to the end of
the response, so a stalled server is not hidden by a stalled client). Responses are read by their
``Content-Length``. A request not answered within ``timeout_s``, or whose connection breaks, is a
failure (its connection is replaced). About 100 us of CPU per request, so at a few hundred
requests per second the generator takes a few percent of a core.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from benchmarks.scheduler.workload import Arrival, Target


@dataclass(frozen=True)
class Record:
    """One request: when it was due (s from the start), its latency (s), its HTTP status (0: no
    answer), its target and popularity class, and the error body when it failed."""

    due_s: float
    latency_s: float
    status: int
    target: int
    popularity: str
    error: str = ""


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer


async def _open(host: str, port: int) -> _Connection:
    reader, writer = await asyncio.open_connection(host, port)
    return _Connection(reader, writer)


async def _exchange(conn: _Connection, request: bytes) -> tuple[int, bytes]:
    conn.writer.write(request)
    head = await conn.reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    body = await conn.reader.readexactly(length) if length else b""
    return status, body


def _request_bytes(target: Target, host: str) -> bytes:
    head = (
        f"POST {target.path} HTTP/1.1\r\nHost: {host}\r\n"
        "Content-Type: application/octet-stream\r\n"
        f"Inference-Header-Content-Length: {target.header_length}\r\n"
        f"Content-Length: {len(target.body)}\r\n\r\n"
    ).encode()
    return head + target.body


async def run_load(
    base_url: str,
    targets: list[Target],
    arrivals: list[Arrival],
    *,
    connections: int = 64,
    timeout_s: float = 60.0,
) -> list[Record]:
    """Send ``arrivals`` to the server at ``base_url`` (``http://host:port``); one record each."""
    host, port = base_url.removeprefix("http://").split(":")
    requests = [_request_bytes(t, host) for t in targets]
    pool: asyncio.Queue[_Connection] = asyncio.Queue()
    for _ in range(connections):
        pool.put_nowait(await _open(host, int(port)))
    records: list[Record] = []
    loop = asyncio.get_running_loop()
    start = loop.time()

    async def one(arrival: Arrival) -> None:
        due = start + arrival.at_s
        conn = await pool.get()
        status, error = 0, ""
        try:
            status, body = await asyncio.wait_for(
                _exchange(conn, requests[arrival.target]), timeout_s
            )
            if status != 200:
                error = body[:300].decode(errors="replace")
        except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError, IndexError) as exc:
            error = repr(exc)
            conn.writer.close()
            conn = await _open(host, int(port))
        finally:
            pool.put_nowait(conn)
        latency = loop.time() - due
        records.append(
            Record(arrival.at_s, latency, status, arrival.target, arrival.popularity, error)
        )

    tasks = []
    for arrival in arrivals:
        delay = start + arrival.at_s - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(arrival)))
    await asyncio.gather(*tasks)
    while not pool.empty():
        pool.get_nowait().writer.close()
    return records


def run(
    base_url: str,
    targets: list[Target],
    arrivals: list[Arrival],
    *,
    connections: int = 64,
    timeout_s: float = 60.0,
) -> list[Record]:
    """:func:`run_load` on a fresh event loop."""
    return asyncio.run(
        run_load(base_url, targets, arrivals, connections=connections, timeout_s=timeout_s)
    )
