"""The HTTP servers the serving benchmark loads, each a subprocess started until ready and always
stopped: our ``fedserve-serve``, a no-op endpoint on the same uvicorn settings
(:mod:`benchmarks.serving.noop_app`), and our server with one engine slowed
(:mod:`benchmarks.serving.slow_server`, for the policy comparison)."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import ROOT
from server.processes import free_port, stop_process_group
from serving.v2_client import V2Client


@contextlib.contextmanager
def server_process(
    cmd: list[str], base: str, name: str, model: str | None = None, timeout: float = 90.0
) -> Iterator[subprocess.Popen[bytes]]:
    """Runs ``cmd`` from the repository root until the server at ``base`` is ready (``model``
    ready, if given); always stops it (SIGINT, then SIGKILL after 30 s). It stays in this
    process's session, so the whole benchmark shares one scheduler group on a machine with
    autogroup scheduling."""
    log_file = tempfile.NamedTemporaryFile(prefix=f"fedserve-bench-{name}-", suffix=".log")
    proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        try:
            with V2Client(base, timeout=2.0) as client:
                client.wait_until_ready(timeout, model=model, process=proc)
        except (RuntimeError, TimeoutError):
            log_file.seek(0)
            sys.stderr.write(log_file.read().decode(errors="replace")[-3000:])
            raise
        yield proc
    finally:
        stop_process_group(proc, grace=30.0, first=signal.SIGINT)
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
    return server_process(cmd, base, "ours", model), base


@contextlib.contextmanager
def noop_server(answers: dict[int, tuple[str, Any]]) -> Iterator[tuple[subprocess.Popen, str]]:
    """Runs the no-op endpoint: to a body of ``n`` bytes it answers ``answers[n]`` (the response
    body as hex and its header length, recorded from our server). Yields the process and its base
    URL; any model name routes to it."""
    with tempfile.TemporaryDirectory(prefix="fedserve-noop-") as tmp:
        answers_file = Path(tmp, "answers.json")
        answers_file.write_text(json.dumps(answers))
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "benchmarks.serving.noop_app", str(port), str(answers_file)]
        with server_process(cmd, base, "noop") as proc:
            yield proc, base


@contextlib.contextmanager
def slow_servers(
    repo: Path, model: str, policies: Sequence[str], factor: float, providers: str = "cpu"
) -> Iterator[dict[str, tuple[str, subprocess.Popen]]]:
    """One slowed server per dispatch policy of ``policies``, all running at once: our server
    (``serving.cli.serve``) serving ``model`` with inline runs off and engine e0 of its pool
    ``factor`` times slower (it sleeps). Yields, per policy, its infer URL and its process."""
    with contextlib.ExitStack() as stack:
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
            cmd = [
                sys.executable,
                "-m",
                "benchmarks.serving.slow_server",
                str(factor),
                json.dumps(conf),
            ]
            base = f"http://127.0.0.1:{port}"
            proc = stack.enter_context(server_process(cmd, base, policy, model))
            servers[policy] = (f"{base}/v2/models/{model}/infer", proc)
        yield servers
