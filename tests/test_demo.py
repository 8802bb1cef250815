"""``make demo`` reduced to 2 rounds: exit 0, one agreeing line per round, nothing left behind."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from process_marker import marked_env, new_marker, wait_until_marked_gone

from scripts.demo import parse_args, report
from scripts.demo_pipeline import PipelineResult, Served, VersionRecord

ROOT = Path(__file__).resolve().parents[1]
LINE = re.compile(
    r"^\s*(?P<round>\d+) \|\s+(?P<version>\d+) \|\s+(?P<served>[0-9.]+) \|\s+(?P<torch>[0-9.]+) \|"
    r"\s+(?P<agree>yes|NO) \|\s+(?P<latency>[0-9.]+|n/a) s$",
    re.MULTILINE,
)


def test_reduced_demo_serves_every_round_with_torch_accuracy(tmp_path: Path) -> None:
    marker = new_marker()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "scripts.demo",
            "--rounds=2",
            "--clients=4",
            "--min-accuracy=0.5",
            f"--workdir={tmp_path}",
            "--",
            "train.local_epochs=2",
        ],
        cwd=ROOT,
        env=marked_env(marker),
        capture_output=True,
        text=True,
        timeout=480,
    )
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-4000:]
    rows = [m.groupdict() for m in LINE.finditer(result.stdout)]
    assert [(int(r["round"]), int(r["version"])) for r in rows] == [(1, 1), (2, 2)], out[-4000:]
    for row in rows:
        assert row["agree"] == "yes"
        assert row["served"] == row["torch"]
        assert row["latency"] != "n/a" and 0 < float(row["latency"]) < 30
    assert float(rows[-1]["torch"]) >= 0.5
    assert "all checks passed" in result.stdout
    assert (tmp_path / "model_repository" / "fedserve" / "config.pbtxt").exists()
    assert wait_until_marked_gone(marker) == []


def test_a_failed_check_exits_1_and_names_it(capsys) -> None:  # type: ignore[no-untyped-def]
    agree = VersionRecord(1, 1, 1, 0.5, {"params_at": 10.0})
    agree.served["demo"] = Served(first_at=10.4, accuracy=0.5)
    flipped = VersionRecord(2, 2, 2, 0.75, {"params_at": 20.0})
    flipped.served["demo"] = Served(first_at=20.3, accuracy=0.75 - 1 / 360)
    history = {
        "rounds": [{"version": 1, "exported_version": 1}, {"version": 2, "exported_version": 2}],
        "final_test_acc": 0.75,
    }
    result = PipelineResult([agree, flipped], 0, {"demo": True}, 12.0, history)
    args = parse_args(["--rounds=2", "--min-accuracy=0.9"])
    assert report(result, args, ROOT) == 1
    out = capsys.readouterr().out
    assert "CHECK FAILED: version 2: served accuracy 0.747222 != torch accuracy 0.750000" in out
    assert "CHECK FAILED: final test accuracy 0.75 is below --min-accuracy=0.9" in out
    assert "median 0.350 s" in out  # latencies 0.4 and 0.3 s
    assert "all checks passed" not in out

    agree_only = PipelineResult(
        [agree], 0, {"demo": True}, 5.0, {**history, "rounds": history["rounds"][:1]}
    )
    args = parse_args(["--rounds=1", "--min-accuracy=0.5"])
    assert report(agree_only, args, ROOT) == 0
    assert "all checks passed" in capsys.readouterr().out


@pytest.mark.slow
def test_ctrl_c_stops_everything(tmp_path: Path) -> None:
    """SIGINT in the middle of training: exit 130 and no process left behind."""
    marker = new_marker()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "scripts.demo",
            "--rounds=20",
            "--clients=2",
            "--model=mlp",
            f"--workdir={tmp_path}",
        ],
        cwd=ROOT,
        env=marked_env(marker),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        # a pytest started in the background inherits SIGINT ignored, and Python then keeps it so
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        assert process.stdout is not None
        for line in process.stdout:
            if LINE.match(line):  # the first round is served: training and serving are up
                break
        process.send_signal(signal.SIGINT)
        out, _ = process.communicate(timeout=180)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, out
    assert "interrupted: stopped everything the demo started" in out
    assert wait_until_marked_gone(marker) == []
