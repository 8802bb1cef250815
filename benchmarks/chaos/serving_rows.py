"""The serving rows of the chaos table: each starts ``fedserve-serve`` (``python -m serving.cli``)
on a repository of tiny models (:mod:`benchmarks.chaos.models`), injects one fault under load and
measures what the issue asks:

=========================  ==================================================================
fuzzed requests            N mutated JSON/binary/header requests (:mod:`benchmarks.chaos.fuzz`):
                           5xx answers and dropped connections (target 0, 0)
poison requests            16 clients of good requests + one sending inputs onnxruntime fails
                           on: innocent failures (target 0), poison answered 400
slow model                 requests running past ``run_timeout_s``: cores still busy after they
                           were abandoned (target ~0), unanswered requests (target 0)
corrupt versions           corrupt / half-written versions appear under load: answers from
                           them (target 0), failed requests (target 0)
SIGTERM under load         in-flight requests lost (0), exit status (0), leases left (0)
soak                       ~80% of peak with a swap every 20 s: errors (0), RSS growth, and
                           /metrics size after 200 more swaps
=========================  ==================================================================

Load comes from Python threads on keep-alive ``http.client`` connections (cheap enough for
reliability: what is counted is failures, not speed).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import psutil

from benchmarks.chaos import models
from benchmarks.chaos.fuzz import fuzz
from benchmarks.common import ROOT
from benchmarks.serving.servers import server_process
from server.processes import free_port
from serving.repository import ModelRepository


@dataclass
class Row:
    """One row of the table: what was done, the measured figure, the target, met or not."""

    fault: str
    figure: str
    target: str
    ok: bool
    details: dict[str, Any] = field(default_factory=dict)


def body(x: Sequence[Sequence[float]], shape: Sequence[int] | None = None) -> bytes:
    flat = [float(v) for row in x for v in row]
    shape = list(shape) if shape is not None else [len(x), len(x[0])]
    tensor = {"name": "x", "datatype": "FP32", "shape": shape, "data": flat}
    return json.dumps({"inputs": [tensor]}).encode()


GOOD = body([[0.1, 0.2, 0.3, 0.4]])


@contextlib.contextmanager
def server(
    repo: Path, model: str, *overrides: str
) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """``fedserve-serve`` on ``repo`` until ``model`` is ready; yields the process and base URL.
    Stopped with SIGINT at the end unless the caller already stopped it."""
    port = free_port()
    cmd = [
        sys.executable, "-m", "serving.cli", f"repository={repo}", f"port={port}",
        "log_level=warning", f"serving.grpc_port={free_port()}", *overrides,
    ]  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    with server_process(cmd, base, "chaos", model) as proc:
        yield proc, base


class Load:
    """``clients`` threads posting ``make_body()`` to ``url`` back to back (``rate``: requests/s
    over all threads, None: as fast as answered) until :meth:`stop`; counts statuses, answered
    versions and transport errors."""

    def __init__(
        self,
        url: str,
        clients: int,
        make_body: Callable[[random.Random], bytes] = lambda rng: GOOD,
        rate: float | None = None,
    ) -> None:
        self.url = urlsplit(url)
        self.make_body = make_body
        self.interval = clients / rate if rate else 0.0
        self.statuses: Counter[int] = Counter()
        self.versions: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.examples: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(clients)
        ]
        for t in self._threads:
            t.start()

    @property
    def answered(self) -> int:
        return sum(self.statuses.values())

    def _run(self, seed: int) -> None:
        rng = random.Random(seed)
        conn = http.client.HTTPConnection(self.url.hostname, self.url.port, timeout=60)
        next_at = time.monotonic()
        while not self._stop.is_set():
            if self.interval:
                next_at += self.interval
                delay = next_at - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            payload = self.make_body(rng)
            try:
                conn.request("POST", self.url.path, body=payload)
                response = conn.getresponse()
                answer = response.read()
            except (http.client.HTTPException, OSError) as exc:
                with self._lock:
                    self.errors[type(exc).__name__] += 1
                conn.close()
                conn = http.client.HTTPConnection(self.url.hostname, self.url.port, timeout=60)
                continue
            with self._lock:
                self.statuses[response.status] += 1
                if response.status == 200:
                    self.versions[json.loads(answer).get("model_version", "?")] += 1
                elif len(self.examples) < 5:
                    self.examples.append(f"{response.status} {answer[:160]!r}")
        conn.close()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(90)


def _repo(tmp: Path, *kinds: tuple[str, str]) -> ModelRepository:
    repo = ModelRepository(tmp / "repo")
    for kind, name in kinds:
        models.publish(repo, kind, name)
    return repo


# ---------------------------------------------------------------- rows


def fuzz_row(requests: int = 5000) -> Row:
    with tempfile.TemporaryDirectory(prefix="fedserve-chaos-") as tmp:
        repo = _repo(Path(tmp), ("classifier", "clf"))
        with server(repo.root, "clf", "serving.instances=1") as (proc, base):
            report = fuzz(base, requests, model="clf")
            alive = _get(base + "/v2/health/ready") == 200
    return Row(
        "fuzzed requests (JSON, binary, headers)",
        f"{report.requests} requests: {report.five_xx} 5xx, {report.dropped} dropped connections"
        f" ({dict(sorted(report.statuses.items()))})",
        "0 5xx, 0 dropped",
        report.five_xx == 0 and report.dropped == 0 and alive and report.requests >= requests,
        {"statuses": dict(report.statuses), "server_errors": report.server_errors[:10]},
    )


def poison_row(seconds: float = 10.0, clients: int = 16) -> Row:
    """16 clients send good width-4 requests; one sends a width-3 request every 50 ms."""
    with tempfile.TemporaryDirectory(prefix="fedserve-chaos-") as tmp:
        repo = _repo(Path(tmp), ("poison", "poison"))
        with server(repo.root, "poison") as (proc, base):
            url = base + "/v2/models/poison/infer"
            good_body = body([[1.0, 2.0, 3.0, 4.0]])
            bad_body = body([[1.0, 2.0, 3.0]])
            good = Load(url, clients, lambda rng: good_body)
            bad = Load(url, 1, lambda rng: bad_body, rate=20)
            time.sleep(seconds)
            bad.stop()
            good.stop()
    innocent = good.answered - good.statuses[200] + sum(good.errors.values())
    poison_400 = bad.statuses[400]
    return Row(
        f"poison requests under {clients}-client load",
        f"{innocent} innocent failures of {good.answered}; poison: {poison_400} of "
        f"{bad.answered} answered 400",
        "0 innocent failures, poison 400",
        innocent == 0 and poison_400 == bad.answered > 0,
        {"good": dict(good.statuses), "bad": dict(bad.statuses), "examples": good.examples},
    )


def slow_row(rows: int = 2000, timeout_s: float = 1.0) -> Row:
    """Two requests whose runs take seconds (``rows`` rows through the slow model's 100 MatMuls
    on one thread) against ``run_timeout_s``: cores still busy once they were answered, requests
    never answered, and whether the health probe kept answering meanwhile."""
    x = np.full((1, rows, models.SLOW_WIDTH), 0.5, np.float32)
    head = json.dumps(
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": list(x.shape),
                     "parameters": {"binary_data_size": x.nbytes}}]}
    ).encode()  # fmt: skip
    payload = head + x.tobytes()
    with tempfile.TemporaryDirectory(prefix="fedserve-chaos-") as tmp:
        repo = _repo(Path(tmp), ("slow", "slow"))
        with server(repo.root, "slow", f"serving.run_timeout_s={timeout_s}",
                    "serving.warmup=false", "serving.instances=2") as (proc, base):  # fmt: skip
            url = urlsplit(base + "/v2/models/slow/infer")
            answers: list[Any] = []

            def one() -> None:
                conn = http.client.HTTPConnection(url.hostname, url.port, timeout=120)
                try:
                    conn.request(
                        "POST", url.path, body=payload,
                        headers={"Inference-Header-Content-Length": str(len(head))},
                    )  # fmt: skip
                    response = conn.getresponse()
                    answers.append((response.status, response.read()[:200]))
                except (http.client.HTTPException, OSError) as exc:
                    answers.append(("no answer", type(exc).__name__))
                finally:
                    conn.close()

            threads = [threading.Thread(target=one) for _ in range(2)]
            for t in threads:
                t.start()
            health = []
            while any(t.is_alive() for t in threads):  # the event loop must stay responsive
                health.append(_get(base + "/v2/health/live", timeout=5))
                time.sleep(0.2)
            cpu = _cores_busy(proc.pid, 3.0)
    unanswered = sum(1 for status, _ in answers if status == "no answer")
    statuses = [status for status, _ in answers]
    return Row(
        f"slow model past run_timeout_s={timeout_s:g}",
        f"cores busy after abandonment: {cpu:.2f}; unanswered: {unanswered} of 2 "
        f"(answers {statuses}); health probes answered {health.count(200)}/{len(health)}",
        "~0 cores, 0 unanswered",
        cpu < 0.2 and unanswered == 0 and health.count(200) == len(health),
        {"answers": [repr(a) for a in answers]},
    )


def corrupt_row(seconds: float = 8.0, clients: int = 8) -> Row:
    """Under load, versions 2..5 appear corrupt or half-written, then version 6 is good."""
    with tempfile.TemporaryDirectory(prefix="fedserve-chaos-") as tmp:
        repo = _repo(Path(tmp), ("classifier", "clf"))
        with server(repo.root, "clf", "serving.instances=1") as (proc, base):
            load = Load(base + "/v2/models/clf/infer", clients)
            bad_versions = _publish_corrupt(repo, Path(tmp), seconds)
            good = models.publish(repo, "classifier", "clf", seed=6)
            deadline = time.monotonic() + 15
            while load.versions[str(good)] == 0 and time.monotonic() < deadline:
                time.sleep(0.1)
            time.sleep(1.0)
            load.stop()
    served = sum(load.versions[str(v)] for v in bad_versions)
    failed = load.answered - load.statuses[200] + sum(load.errors.values())
    return Row(
        "corrupt / half-written versions under load",
        f"served from them: {served}; failed requests: {failed} of {load.answered}; good "
        f"version {good} took over: {load.versions[str(good)] > 0}",
        "served 0, failed 0",
        served == 0 and failed == 0 and load.versions[str(good)] > 0,
        {"versions": dict(load.versions), "statuses": dict(load.statuses), "bad": bad_versions},
    )


def _publish_corrupt(repo: ModelRepository, tmp: Path, seconds: float) -> list[int]:
    """Versions that must never be served, spread over ``seconds``: flipped bytes under a valid
    checksum, a truncated model.onnx, a version directory copied file by file (half-written) and
    one without its model."""
    bad = []
    step = seconds / 4
    for kind in ("flipped", "truncated", "half-written", "no model"):
        time.sleep(step)
        staging = ModelRepository(tmp / f"staging-{kind}")
        models.publish(staging, "classifier", "clf", seed=1)
        src = staging.root / "clf" / "1"
        version = max(repo.list_versions("clf")) + 1
        dst = repo.root / "clf" / str(version)
        model = src / "model.onnx"
        if kind == "flipped":
            data = bytearray(model.read_bytes())
            data[len(data) // 2] ^= 0xFF
            model.write_bytes(bytes(data))
        elif kind == "truncated":
            model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
        elif kind == "no model":
            model.unlink()
        if kind == "half-written":  # what a non-atomic copy shows a reader mid-way
            dst.mkdir()
            shutil.copyfile(src / "metadata.json", dst / "metadata.json")
            with open(dst / "model.onnx", "wb") as out:
                out.write(model.read_bytes()[:1000])
        else:
            shutil.copytree(src, dst)
        bad.append(version)
    return bad


def sigterm_row(clients: int = 8) -> Row:
    with tempfile.TemporaryDirectory(prefix="fedserve-chaos-") as tmp:
        repo = _repo(Path(tmp), ("classifier", "clf"))
        port = free_port()
        proc = subprocess.Popen(
            [sys.executable, "-m", "serving.cli", f"repository={repo.root}", f"port={port}",
             "log_level=warning", f"serving.grpc_port={free_port()}", "serving.instances=1"],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        try:
            base = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 60
            while _get(base + "/v2/health/ready") != 200:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"server did not start: {proc.communicate()[0]}")
                time.sleep(0.1)
            outcomes: Counter[str] = Counter()
            stop = threading.Event()

            def client() -> None:
                url = f"{base}/v2/models/clf/infer"
                while not stop.is_set():  # one connection per request: accepted = in flight
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                    try:
                        conn.connect()
                    except OSError:
                        outcomes["refused"] += 1
                        time.sleep(0.01)
                        continue
                    try:
                        conn.request("POST", url, body=GOOD, headers={"Connection": "close"})
                        response = conn.getresponse()
                        response.read()
                        outcomes["ok" if response.status == 200 else "failed"] += 1
                    except (http.client.RemoteDisconnected, ConnectionResetError):
                        # closed without a byte of an answer: the connection was still in the
                        # kernel's listen backlog (or its request not yet read) at shutdown
                        outcomes["closed unread"] += 1
                    except (http.client.HTTPException, OSError):  # e.g. an answer cut short
                        outcomes["lost"] += 1
                    finally:
                        conn.close()

            threads = [threading.Thread(target=client) for _ in range(clients)]
            for t in threads:
                t.start()
            while outcomes["ok"] < 500:
                time.sleep(0.01)
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            out, _ = proc.communicate(timeout=90)
            stop_s = time.monotonic() - t0
            stop.set()
            for t in threads:
                t.join(60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        leases = len(repo.leased_versions("clf"))
    lost = outcomes["lost"] + outcomes["failed"]
    return Row(
        f"SIGTERM of the server under {clients}-client load",
        f"in-flight lost: {lost}; exit status {proc.returncode}; leases left: {leases}; "
        f"stopped in {stop_s:.1f} s ({outcomes['ok']} answered, "
        f"{outcomes['closed unread']} closed before their request was read)",
        "0 lost, exit 0, 0 leases",
        lost == 0 and proc.returncode == 0 and leases == 0,
        {"outcomes": dict(outcomes), "output": out[-500:]},
    )


def soak_row(
    minutes: float = 10.0, swap_every_s: float = 20.0, fast_swaps: int = 200, clients: int = 8
) -> Row:
    """~80% of the measured peak for ``minutes`` with a new version every ``swap_every_s``;
    then ``fast_swaps`` more swaps back to back and the size of /metrics."""
    with tempfile.TemporaryDirectory(prefix="fedserve-chaos-") as tmp:
        repo = _repo(Path(tmp), ("classifier", "clf"))
        with server(repo.root, "clf", "serving.instances=1") as (proc, base):
            url = base + "/v2/models/clf/infer"
            peak = Load(url, clients)
            time.sleep(5)
            peak.stop()
            peak_rate = peak.answered / 5
            process = psutil.Process(proc.pid)
            load = Load(url, clients, rate=0.8 * peak_rate)
            time.sleep(3)
            rss0 = process.memory_info().rss
            end = time.monotonic() + minutes * 60
            swaps = 0
            while time.monotonic() < end:
                time.sleep(min(swap_every_s, max(0.0, end - time.monotonic())))
                models.publish(repo, "classifier", "clf", seed=2 + swaps % 5)
                swaps += 1
            rss1 = process.memory_info().rss
            for i in range(fast_swaps):
                before = max(repo.list_versions("clf"))
                models.publish(repo, "classifier", "clf", seed=2 + i % 5)
                _wait_version(url, before + 1)
                repo.apply_retention("clf", keep_last=3)
            load.stop()
            metrics = _get_body(base + "/metrics")
            rss2 = process.memory_info().rss
    errors = load.answered - load.statuses[200] + sum(load.errors.values())
    mib = 1 << 20
    return Row(
        f"soak {minutes:g} min at 80% of peak, swap every {swap_every_s:g} s",
        f"errors: {errors} of {load.answered} ({load.answered / max(1e-9, minutes * 60):.0f} "
        f"req/s, peak {peak_rate:.0f}); {swaps} swaps; RSS {rss0 / mib:.0f} -> "
        f"{rss1 / mib:.0f} MiB, {rss2 / mib:.0f} MiB after {fast_swaps} more swaps; "
        f"/metrics {len(metrics) / 1024:.1f} KiB",
        "0 errors, flat RSS and /metrics",
        errors == 0,
        {
            "statuses": dict(load.statuses),
            "examples": load.examples,
            "rss": [rss0, rss1, rss2],
            "metrics_bytes": len(metrics),
        },  # fmt: skip
    )


# ---------------------------------------------------------------- helpers


def _get(url: str, timeout: float = 2.0) -> int | None:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        conn.request("GET", parts.path)
        response = conn.getresponse()
        response.read()
        return response.status
    except (http.client.HTTPException, OSError):
        return None
    finally:
        conn.close()


def _get_body(url: str) -> bytes:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        conn.request("GET", parts.path)
        return conn.getresponse().read()
    finally:
        conn.close()


def _wait_version(url: str, version: int, timeout: float = 30.0) -> None:
    parts = urlsplit(url)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
        try:
            conn.request("POST", parts.path, body=GOOD)
            if json.loads(conn.getresponse().read()).get("model_version") == str(version):
                return
        except (http.client.HTTPException, OSError, ValueError):
            pass
        finally:
            conn.close()
        time.sleep(0.02)
    raise TimeoutError(f"version {version} was not served within {timeout} s")


def _cores_busy(pid: int, seconds: float) -> float:
    """CPU cores the process ``pid`` (all its threads) used over the next ``seconds``."""
    process = psutil.Process(pid)
    t0 = process.cpu_times()
    time.sleep(seconds)
    t1 = process.cpu_times()
    return ((t1.user + t1.system) - (t0.user + t0.system)) / seconds


ROWS: dict[str, Callable[..., Row]] = {
    "fuzz": fuzz_row,
    "poison": poison_row,
    "slow": slow_row,
    "corrupt": corrupt_row,
    "sigterm": sigterm_row,
    "soak": soak_row,
}
