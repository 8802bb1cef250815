"""NVIDIA Triton (through PyTriton) as a contender: its own venv, and the server started until
ready and always stopped.

PyTriton needs ``numpy<2``, so it lives in a venv of its own, created here on first use
(``outputs/bench-venvs/pytriton``: ``nvidia-pytriton==0.7.0``, ``numpy<2``, ``onnxruntime``). Two
facts found running it on this machine: Triton's Python backend stub loads ``libpython`` by name
and crashed on the system's copy until the venv interpreter's own ``lib`` folder came first on
``LD_LIBRARY_PATH``; and about one start in 15 two model instances race on a handshake socket and
the start fails, so a failed start is retried (3 attempts).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchmarks.common import ROOT
from server.processes import free_port, stop_process_group
from serving.v2_client import V2Client

log = logging.getLogger(__name__)

VENV = ROOT / "outputs" / "bench-venvs" / "pytriton"
REQUIREMENTS = ["nvidia-pytriton==0.7.0", "numpy<2", "onnxruntime>=1.20"]
SCRIPT = ROOT / "benchmarks" / "serving" / "pytriton_server.py"
ATTEMPTS = 3


def ensure_venv() -> Path:
    """The venv's python, creating the venv (a few minutes, ~1 GB) when it is missing."""
    python = VENV / "bin" / "python"
    stamp = VENV / ".fedserve-installed"
    if not stamp.exists():
        log.warning("creating PyTriton's venv in %s (once)", VENV)
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
             *REQUIREMENTS],
            check=True,
        )  # fmt: skip
        stamp.touch()
    return python


def _lib_dir(python: Path) -> str:
    out = subprocess.run(
        [str(python), "-c", "import sys; print(sys.base_prefix)"],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    return str(Path(out.stdout.strip()) / "lib")


@contextlib.contextmanager
def triton_server(info: dict[str, Any], name: str) -> Iterator[tuple[subprocess.Popen, str, str]]:
    """PyTriton serving ``info``'s ONNX model as ``name``; yields the process, the HTTP base URL
    and the gRPC address once the model is ready."""
    python = ensure_venv()
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(
        p for p in (_lib_dir(python), env.get("LD_LIBRARY_PATH")) if p
    )
    env.pop("PYTHONPATH", None)
    for attempt in range(1, ATTEMPTS + 1):
        http, grpc, metrics = free_port(), free_port(), free_port()
        cmd = [
            str(python), str(SCRIPT), info["path"], name, info["input"], info["output"],
            str(http), str(grpc), str(metrics), ",".join(str(d) for d in info["shape"]),
        ]  # fmt: skip
        log_file = tempfile.NamedTemporaryFile(prefix="fedserve-bench-triton-", suffix=".log")
        proc = subprocess.Popen(
            cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        base = f"http://127.0.0.1:{http}"
        try:
            with V2Client(base, timeout=2.0) as client:
                client.wait_until_ready(180, model=name, process=proc)
        except (RuntimeError, TimeoutError) as exc:
            stop_process_group(proc, grace=10.0, first=signal.SIGINT)
            log_file.seek(0)
            tail = log_file.read().decode(errors="replace")[-2000:]
            log_file.close()
            if attempt == ATTEMPTS:
                raise RuntimeError(f"PyTriton did not start ({exc}): {tail}") from exc
            log.warning("PyTriton start %d failed (%s); retrying", attempt, exc)
            continue
        try:
            yield proc, base, f"127.0.0.1:{grpc}"
        finally:
            stop_process_group(proc, grace=15.0, first=signal.SIGINT)
            log_file.close()
        return
