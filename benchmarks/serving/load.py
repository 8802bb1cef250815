"""Closed-loop HTTP load with wrk: N connections, each sending the same body back to back.

Why wrk and not a Python client: on this 2-core machine the load generator shares the CPU with the
server, so it must be cheap; httpx saturates its own core at ~250 req/s, while wrk (C + LuaJIT, with
the recording below) spends ~20-25 us of CPU per request (0.38 cores at ~17k req/s against the
no-op endpoint). wrk's own latency histogram starts at t=0 with empty queues, which
misreports a server whose steady-state latency is seconds (ResNet-18 with 32 x 64-row
requests queues ~2,000 images, ~15 s). So a LuaJIT script records the send and receive time of
every request (``clock_gettime(CLOCK_MONOTONIC)``; one connection per wrk thread so that request and
response pair up), and :func:`wrk_load` discards a warm-up and cuts the rest into equal windows:
throughput and p50/p99 latency per window (of the requests that completed in it), medians over the
windows. It also reports the CPU the wrk process used (``wait4`` rusage), the CPU of the server
processes given to it, and the whole machine's busy cores (``/proc/stat``), so a reader can tell who
was the bottleneck.

Requires the ``wrk`` binary (Debian/Ubuntu: ``apt-get install wrk``).
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

CLK_TCK = os.sysconf("SC_CLK_TCK")

LUA = r"""
local ffi = require("ffi")
ffi.cdef[[
typedef struct { long tv_sec; long tv_nsec; } fedserve_timespec;
int clock_gettime(int clk, fedserve_timespec *tp);
]]
local ts = ffi.new("fedserve_timespec")
local function now()
  ffi.C.clock_gettime(1, ts)
  return tonumber(ts.tv_sec) + tonumber(ts.tv_nsec) * 1e-9
end

local threads = {}
function setup(thread) table.insert(threads, thread) end

function init(args)
  local f = assert(io.open(os.getenv("FEDSERVE_WRK_BODY"), "rb"))
  local body = f:read("*a")
  f:close()
  local headers = {}
  headers["Content-Type"] = "application/octet-stream"
  local hlen = os.getenv("FEDSERVE_WRK_HLEN")
  if hlen and hlen ~= "" then headers["Inference-Header-Content-Length"] = hlen end
  req = wrk.format("POST", os.getenv("FEDSERVE_WRK_PATH"), headers, body)
  starts, ends, statuses, n, t_send = {}, {}, {}, 0, 0
end

function request()
  t_send = now()
  return req
end

function response(status, headers, body)
  n = n + 1
  starts[n] = t_send
  ends[n] = now()
  statuses[n] = status
end

function done(summary, latency, requests)
  local out = assert(io.open(os.getenv("FEDSERVE_WRK_OUT"), "w"))
  for _, t in ipairs(threads) do
    local s, e, c = t:get("starts"), t:get("ends"), t:get("statuses")
    local lines = {}
    for i = 1, #e do
      lines[i] = string.format("%.7f %.7f %d", s[i], e[i], c[i])
    end
    if #lines > 0 then out:write(table.concat(lines, "\n"), "\n") end
  end
  out:write(string.format("# errors connect=%d read=%d write=%d status=%d timeout=%d\n",
    summary.errors.connect, summary.errors.read, summary.errors.write,
    summary.errors.status, summary.errors.timeout))
  out:close()
end
"""


@dataclass
class LoadResult:
    """Medians over the windows (``windows`` holds each window's numbers)."""

    requests_per_s: float
    rows_per_s: float
    p50_ms: float
    p99_ms: float
    errors: int
    completed: int
    samples_per_window: int
    client_cores: float
    server_cores: float
    machine_busy_cores: float
    client_cores_whole_run: float
    warmup_s: float
    window_s: float
    windows: list[dict[str, float]] = field(default_factory=list)
    socket_errors: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def proc_cpu_seconds(pids: Sequence[int]) -> dict[int, float]:
    """CPU seconds (user + system, all threads) of each live process in ``pids``."""
    out = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                parts = f.read().rsplit(")", 1)[1].split()
            out[pid] = (int(parts[11]) + int(parts[12])) / CLK_TCK
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
    return out


def _window_cpu(
    samples: list[tuple[dict[int, float], float, float, float]], k: int, window_s: float
) -> dict[str, float]:
    """Cores used in window ``k`` (between edge samples k and k+1): by the server processes (a
    process that appeared meanwhile counts from 0, one that exited is lost), by wrk, and by the
    whole machine."""
    if len(samples) < k + 2:
        nan = float("nan")
        return {"server_cores": nan, "client_cores": nan, "machine_busy_cores": nan}
    (cpu0, busy0, total0, cli0), (cpu1, busy1, total1, cli1) = samples[k], samples[k + 1]
    server = sum(v - cpu0.get(pid, 0.0) for pid, v in cpu1.items())
    ncpu = os.cpu_count() or 1
    return {
        "server_cores": server / window_s,
        "client_cores": (cli1 - cli0) / window_s,
        "machine_busy_cores": ncpu * (busy1 - busy0) / max(1, total1 - total0),
    }


def machine_busy() -> tuple[float, float]:
    """(busy jiffies, total jiffies) from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    idle = fields[3] + fields[4]
    total = sum(fields[:8])
    return total - idle, total


def wrk_available() -> bool:
    return shutil.which("wrk") is not None


def wrk_load(
    url: str,
    body: bytes,
    *,
    header_length: int | None,
    rows: int,
    connections: int = 32,
    warmup_s: float = 1.0,
    window_s: float = 3.0,
    windows: int = 3,
    server_pids: Callable[[], Sequence[int]] | Sequence[int] = (),
    timeout_s: float = 120.0,
) -> LoadResult:
    """POST ``body`` to ``url`` from ``connections`` closed-loop clients for
    ``warmup_s + windows * window_s`` seconds; see the module docstring."""
    if not wrk_available():
        raise RuntimeError("wrk is not installed (apt-get install wrk)")
    duration = math.ceil(warmup_s + windows * window_s + 0.5)
    base, _, path = url.partition("://")[2].partition("/")
    with tempfile.TemporaryDirectory(prefix="fedserve-wrk-") as tmp:
        script = Path(tmp, "load.lua")
        script.write_text(LUA)
        body_path = Path(tmp, "body.bin")
        body_path.write_bytes(body)
        out = Path(tmp, "out.txt")
        env = dict(
            os.environ,
            FEDSERVE_WRK_BODY=str(body_path),
            FEDSERVE_WRK_HLEN="" if header_length is None else str(header_length),
            FEDSERVE_WRK_PATH="/" + path,
            FEDSERVE_WRK_OUT=str(out),
        )
        cmd = [
            "wrk",
            f"-t{connections}",
            f"-c{connections}",
            f"-d{duration}s",
            f"--timeout={int(timeout_s)}s",
            "-s",
            str(script),
            url.split("/", 3)[0] + "//" + base,
        ]
        pids = list(server_pids() if callable(server_pids) else server_pids)
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        # CPU samples at the window edges, so each window's CPU matches its throughput
        edges = [warmup_s + k * window_s for k in range(windows + 1)]
        samples: list[tuple[dict[int, float], float, float, float]] = []

        def sample_edges() -> None:
            for edge in edges:
                delay = t0 + edge - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                if proc.poll() is not None:
                    return
                current = sorted(set(pids) | set(server_pids() if callable(server_pids) else ()))
                client = proc_cpu_seconds([proc.pid]).get(proc.pid, float("nan"))
                samples.append((proc_cpu_seconds(current), *machine_busy(), client))

        sampler = threading.Thread(target=sample_edges, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.monotonic() - t0
        sampler.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
        output = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(f"wrk failed ({proc.returncode}): {output[-2000:]}")
        text = out.read_text()
    socket_errors = ""
    rows_data = []
    for line in text.splitlines():
        if line.startswith("#"):
            socket_errors = line[2:]
        elif line:
            s, e, c = line.split()
            rows_data.append((float(s), float(e), int(c)))
    if not rows_data:
        raise RuntimeError(f"wrk recorded no responses: {output[-2000:]}")
    data = np.array(rows_data)
    start = data[:, 0].min()
    ends = data[:, 1] - start
    lat = (data[:, 1] - data[:, 0]) * 1000.0
    ok = data[:, 2] == 200
    per_window = []
    for k in range(windows):
        lo = warmup_s + k * window_s
        sel = (ends >= lo) & (ends < lo + window_s)
        good = sel & ok
        n_ok = int(good.sum())
        per_window.append(
            {
                "requests_per_s": n_ok / window_s,
                "rows_per_s": n_ok * rows / window_s,
                "p50_ms": float(np.percentile(lat[good], 50)) if n_ok else float("nan"),
                "p99_ms": float(np.percentile(lat[good], 99)) if n_ok else float("nan"),
                "errors": int((sel & ~ok).sum()),
                "completed": n_ok,
                **_window_cpu(samples, k, window_s),
            }
        )

    def med(key: str) -> float:
        return float(np.median([w[key] for w in per_window]))

    return LoadResult(
        requests_per_s=med("requests_per_s"),
        rows_per_s=med("rows_per_s"),
        p50_ms=med("p50_ms"),
        p99_ms=med("p99_ms"),
        errors=int(sum(w["errors"] for w in per_window)),
        completed=int(sum(w["completed"] for w in per_window)),
        samples_per_window=int(med("completed")),
        client_cores=med("client_cores"),
        server_cores=med("server_cores"),
        machine_busy_cores=med("machine_busy_cores"),
        client_cores_whole_run=(usage.ru_utime + usage.ru_stime) / wall,
        warmup_s=warmup_s,
        window_s=window_s,
        windows=per_window,
        socket_errors=socket_errors,
    )
