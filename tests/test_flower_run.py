"""End to end through real Flower: ``fedserve-train`` and ``flwr run .`` run the same experiment."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from process_marker import wait_until_marked_gone
from runs import run_train

from server.checkpoint import load_checkpoint
from server.launcher import FLWR_ENV, local_superlink

ROOT = Path(__file__).resolve().parents[1]
TRAIN = [str(Path(sys.executable).parent / "fedserve-train")]
OVERRIDES = [
    "rounds=2",
    "num_clients=4",
    "model=mlp",
    "partition=dirichlet",
    "partition.alpha=0.5",
    "train.local_epochs=1",
    "seed=3",
]


def _accuracies(history_file: Path) -> list[float]:
    return [r["test_acc"] for r in json.loads(history_file.read_text())["rounds"]]


def test_fedserve_train_and_flwr_run_give_the_same_run(tmp_path: Path, process_marker: str) -> None:
    repo = tmp_path / "repo"
    hydra_dir = tmp_path / "hydra"
    train = run_train(
        [*OVERRIDES, f"repository={repo}", f"hydra.run.dir={hydra_dir}"], tmp_path, 300
    )
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
    by_train = _accuracies(hydra_dir / "history.json")

    flwr_dir = tmp_path / "flwr"
    overrides = " ".join([*OVERRIDES, "repository=null"])
    with local_superlink() as link:
        link.run(
            {"overrides": overrides, "output-dir": str(flwr_dir)},
            num_supernodes=4,
            app_dir=ROOT,
            timeout=300,
        )
    by_flwr = _accuracies(flwr_dir / "history.json")

    assert len(by_train) == 2
    assert by_train == by_flwr  # same keys and seed: the same run, bit for bit
    assert by_train[-1] > 0.5  # and it learned something (10 classes: chance is 0.1)
    # the fedserve-train run exported every version into the Triton layout
    versions = sorted(p.name for p in (repo / "fedserve").iterdir() if p.name.isdigit())
    assert versions == ["1", "2"]
    assert (repo / "fedserve" / "config.pbtxt").exists()
    assert wait_until_marked_gone(process_marker) == []


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["partition=dirichlet", "partition.alpha=-1"], "partition.alpha must be > 0, got -1"),
        (["dataset=mnist"], "dataset.root must be set"),
        (["model=vgg"], "Could not find 'model/vgg'"),
        (["num_clients=5000"], "num_clients=5000 is too many for a training set of 1438 samples"),
    ],
)
def test_bad_config_stops_before_anything_starts(
    tmp_path: Path, overrides: list[str], expected: str, process_marker: str
) -> None:
    started = time.time()
    result = run_train([*overrides, f"hydra.run.dir={tmp_path}"], tmp_path, 120)
    assert result.returncode != 0
    assert expected in result.stdout + result.stderr
    assert time.time() - started < 60  # no simulation was started for it
    assert wait_until_marked_gone(process_marker) == []


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_a_stopped_run_leaves_no_process_behind_and_keeps_its_checkpoint(
    tmp_path: Path, signum: int, process_marker: str
) -> None:
    command = [
        *TRAIN,
        "rounds=50",
        "num_clients=2",
        "model=mlp",
        "repository=null",
        f"hydra.run.dir={tmp_path}",
    ]
    env = {**os.environ, **FLWR_ENV}
    process = subprocess.Popen(
        command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    checkpoint = tmp_path / "checkpoint.pt"
    deadline = time.monotonic() + 240
    while not checkpoint.exists() and time.monotonic() < deadline:  # mid-run: Ray, clients up
        time.sleep(0.5)
    assert checkpoint.exists(), "the run never checkpointed a version"

    if signum == signal.SIGKILL:
        # while it runs, a second trainer (here: a resume) on its directory is refused at once
        second = subprocess.run(
            [*command, "resume=true"], cwd=tmp_path, env=env, capture_output=True, text=True
        )
        assert second.returncode == 2
        assert f"is in use by pid {process.pid}" in second.stdout + second.stderr

    process.send_signal(signum)
    sent = time.monotonic()
    process.wait(timeout=60)
    stopped_after = time.monotonic() - sent
    stderr = process.stderr.read() if process.stderr else ""
    # SIGKILL: the orphan watch stops what the trainer started; otherwise the trainer does
    # (the trainer's stderr has the orphan watch's list of what it stopped)
    assert wait_until_marked_gone(process_marker, timeout=30) == [], stderr[-3000:]
    if signum != signal.SIGKILL:
        assert process.returncode == 128 + signum
        assert "Traceback" not in stderr, stderr[-3000:]
        assert f"stopped by {signal.Signals(signum).name}" in stderr
        assert stopped_after < 20, stopped_after  # a bound against hangs, not a speed check
    state = load_checkpoint(checkpoint)  # intact: written atomically, never half
    assert state is not None and state["version"] >= 1
