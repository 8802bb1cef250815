"""The HTTP servers the serving benchmark loads, each a subprocess started until ready and always
stopped: our ``fedserve-serve``, a no-op endpoint on the same uvicorn settings, and our server with
one engine slowed (for the policy comparison). Also the small HTTP client helpers they need."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from bench_config import HEADER, ROOT


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def post(
    url: str, body: bytes, header_length: int | None, timeout: float = 120.0
) -> tuple[int, dict[str, str], bytes]:
    """POSTs a (binary KServe v2) body; returns status, response headers and response body."""
    headers = {"Content-Type": "application/octet-stream"}
    if header_length is not None:
        headers[HEADER] = str(header_length)
    req = urllib.request.Request(url, data=body, headers=headers, method="POST")
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return resp.status, dict(resp.headers), resp.read()


def wait_http(url: str, proc: subprocess.Popen | None, timeout: float = 90.0) -> None:
    """Polls ``url`` until it answers 200; raises ``RuntimeError`` if ``proc`` exits first or
    ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} not ready within {timeout} s")


@contextlib.contextmanager
def server_process(cmd: list[str], ready_url: str, name: str) -> Iterator[subprocess.Popen]:
    """Runs ``cmd`` (same session as this process, so the whole benchmark shares one scheduler
    group on a machine with autogroup scheduling) until ready; always stops it (SIGINT, then
    SIGKILL)."""
    log_file = tempfile.NamedTemporaryFile(prefix=f"fedserve-bench-{name}-", suffix=".log")
    proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        try:
            wait_http(ready_url, proc)
        except RuntimeError:
            log_file.seek(0)
            sys.stderr.write(log_file.read().decode(errors="replace")[-3000:])
            raise
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        log_file.close()


def our_server(
    repo: Path, model: str, extra: Sequence[str] = ()
) -> tuple[contextlib.AbstractContextManager[subprocess.Popen], str]:
    """``fedserve-serve`` with its default config serving ``model`` from ``repo``: the context
    manager that runs it, and its base URL."""
    port = free_port()
    cmd = [
        sys.executable,  # `fedserve-serve`'s entry point, run without needing the script installed
        "-m",
        "serving.cli",
        f"repository={repo}",
        f"port={port}",
        "log_level=warning",
        f"models=[{model}]",
        *extra,
    ]
    base = f"http://127.0.0.1:{port}"
    return server_process(cmd, f"{base}/v2/models/{model}/ready", "ours"), base


NOOP_APP = '''
"""A no-op KServe-shaped endpoint: reads the body, answers pre-recorded bytes (by body size)."""
import json
import sys
from pathlib import Path

import uvicorn
from fastapi import FastAPI
from starlette.responses import Response
from starlette.routing import Route

recorded = json.loads(Path(sys.argv[2]).read_text())
answers = {int(k): (bytes.fromhex(v[0]), v[1]) for k, v in recorded.items()}


async def infer(request):
    body = await request.body()
    payload, header_length = answers[len(body)]
    return Response(payload, media_type="application/octet-stream",
                    headers={"Inference-Header-Content-Length": header_length})


async def ready(request):
    return Response(b"{}", media_type="application/json")


app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
app.router.routes.append(Route("/v2/models/{name}/infer", infer, methods=["POST"]))
app.router.routes.append(Route("/v2/health/ready", ready, methods=["GET"]))
# the same call as serving/cli.py: uvicorn's defaults (uvloop + httptools here), one worker
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", access_log=False)
'''


@contextlib.contextmanager
def noop_server(answers: dict[int, tuple[str, Any]]) -> Iterator[tuple[subprocess.Popen, str]]:
    """Runs the no-op endpoint: to a body of ``n`` bytes it answers ``answers[n]`` (the response
    body as hex and its header length, recorded from our server). Yields the process and its base
    URL; any model name routes to it."""
    with tempfile.TemporaryDirectory(prefix="fedserve-noop-") as tmp:
        Path(tmp, "answers.json").write_text(json.dumps(answers))
        Path(tmp, "noop_app.py").write_text(NOOP_APP)
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        cmd = [
            sys.executable,
            str(Path(tmp, "noop_app.py")),
            str(port),
            str(Path(tmp, "answers.json")),
        ]
        with server_process(cmd, f"{base}/v2/health/ready", "noop") as proc:
            yield proc, base


SLOW_SERVER = '''
"""fedserve-serve (serving.cli.serve) with engine e0 of every pool slowed: after each run it sleeps
(factor - 1) x the run time, so it is `factor` times slower without using more CPU."""
import json
import sys
import time

import serving.watcher
from serving import cli
from serving.pool import EnginePool

factor = float(sys.argv[1])


class SlowPool(EnginePool):
    def _default_factory(self, name):
        engine = super()._default_factory(name)
        if name.endswith("/e0"):
            run = engine.run

            def slow_run(feeds, _run=run):
                t0 = time.perf_counter()
                out = _run(feeds)
                time.sleep((factor - 1.0) * (time.perf_counter() - t0))
                return out

            engine.run = slow_run
        return engine


_init = serving.watcher.RepositoryWatcher.__init__


def _patched(self, *a, **kw):
    kw["pool_factory"] = SlowPool
    _init(self, *a, **kw)


serving.watcher.RepositoryWatcher.__init__ = _patched
cli.serve(json.loads(sys.argv[2]))
'''


@contextlib.contextmanager
def slow_servers(
    repo: Path, model: str, policies: Sequence[str], factor: float, providers: str = "cpu"
) -> Iterator[dict[str, tuple[str, subprocess.Popen]]]:
    """One slowed server per dispatch policy of ``policies``, all running at once: our server
    (``serving.cli.serve``) serving ``model`` with inline runs off and engine e0 of its pool
    ``factor`` times slower (it sleeps). Yields, per policy, its infer URL and its process."""
    with (
        tempfile.TemporaryDirectory(prefix="fedserve-slow-") as tmp,
        contextlib.ExitStack() as stack,
    ):
        script = Path(tmp, "slow_server.py")
        script.write_text(SLOW_SERVER)
        servers = {}
        for policy in policies:
            port = free_port()
            conf = {
                "repository": str(repo),
                "host": "127.0.0.1",
                "port": port,
                "log_level": "warning",
                "models": [model],
                "serving": {"policy": policy, "inline_max_ms": 0, "providers": providers},
            }
            cmd = [sys.executable, str(script), str(factor), json.dumps(conf)]
            base = f"http://127.0.0.1:{port}"
            proc = stack.enter_context(
                server_process(cmd, f"{base}/v2/models/{model}/ready", policy)
            )
            servers[policy] = (f"{base}/v2/models/{model}/infer", proc)
        yield servers
