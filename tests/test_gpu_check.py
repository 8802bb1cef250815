"""``python -m benchmarks.gpu.check`` runs in one go: without a GPU it says so and exits 0; every
section's code runs with the CPU standing in for the GPU (``--cpu-stand-in``, slow). The same for
``benchmarks.gpu.conv_search`` (cnn only)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str, module: str = "benchmarks.gpu.check") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_a_gpu_it_says_so_and_exits_0() -> None:
    result = _run()
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    for line in ("torch         ", "onnxruntime   ", "ORT providers ", "torch CUDA    no"):
        assert line in out
    assert "NO GPU FOUND" in out
    assert "obtained      ['CPUExecutionProvider']" in out
    assert "serving runs on the CPU" in out


@pytest.mark.slow
def test_every_section_runs_with_the_cpu_standing_in() -> None:
    result = _run("--cpu-stand-in", "--models", "cnn", "--seconds", "0.1")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    rows = [line for line in out.splitlines() if line.startswith("cnn ")]
    assert len(rows) == 3, out  # batch 1, batch 64, one training round
    client = out.split("== the ClientApp's train handler")[1].splitlines()
    assert sum(line.startswith("cpu     |") for line in client) == 2, out
    assert "finite=True" in out and "max |delta(cpu) - delta(cpu)| = 0.0e+00" in out
    assert "== serving pool engines" in out


def test_conv_search_script_runs_every_mode_with_the_cpu_standing_in() -> None:
    result = _run("--cpu-stand-in", "--models", "cnn", module="benchmarks.gpu.conv_search")
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [line.split() for line in result.stdout.splitlines() if line.startswith("cnn ")]
    assert [(r[1], r[2]) for r in rows] == [
        ("heuristic", "CPU"),
        ("exhaustive", "CPU"),
        ("default", "CPU"),
        ("heuristic+pad", "CPU"),
    ], result.stdout
