"""A real deployment on one machine: ``flower-superlink`` + one ``flower-supernode`` per partition.

Everything runs as it would across machines (no ``--simulation``): SuperNodes register over the
Fleet API, install the FAB that ``flwr run .`` ships and run the ClientApp in their own
``flwr-clientapp`` processes; the ServerApp runs the ParameterServer strategy and publishes every
version into the Triton-layout repository. Then the same over TLS with certificates made by
``scripts/generate_certs.py``. Every process is stopped at the end.

The two deployments are ``slow`` (``pytest -m slow tests/test_deployment.py``); the check that a
failed ServerApp makes ``SuperLink.run`` raise runs in the default suite.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import psutil
import pytest

from server.config_loader import compose_experiment
from server.launcher import RunFailedError, SuperLink, local_superlink
from server.supernodes import local_supernodes
from serving.repository import ModelRepository
from task.federated import dataset_key, shared_dataset

ROOT = Path(__file__).resolve().parents[1]
NUM_NODES = 3
OVERRIDES = ["rounds=2", f"num_clients={NUM_NODES}", "model=mlp", "train.local_epochs=1", "seed=5"]


def _generate_certs(out_dir: Path) -> tuple[Path, Path, Path]:
    """The repo's script, run the way a user runs it."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "generate_certs.py"), str(out_dir)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return out_dir / "ca.crt", out_dir / "server.pem", out_dir / "server.key"


def our_processes_alive(home: Path, pgids: set[int], timeout: float = 20.0) -> list[str]:
    """Processes this test started that are still alive after ``timeout`` seconds.

    Ours: in a process group we started (SuperLink, SuperNodes and what they spawned) or running
    with a FLWR_HOME under ``home`` (anything that escaped its group). Unlike
    ``tests.processes.wait_until_gone`` this ignores Flower runs of other sessions on the machine.
    """
    deadline = time.monotonic() + timeout
    while True:
        alive = []
        for proc in psutil.process_iter(["cmdline", "status"]):
            try:
                if proc.info["status"] == psutil.STATUS_ZOMBIE:
                    continue
                flwr_home = proc.environ().get("FLWR_HOME", "")
                if os.getpgid(proc.pid) in pgids or flwr_home.startswith(str(home)):
                    alive.append(" ".join(proc.info["cmdline"] or [])[:200])
            except (psutil.NoSuchProcess, psutil.AccessDenied, ProcessLookupError):
                continue
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.5)


def _onnx_accuracy(model_file: Path, test_x: np.ndarray, test_y: np.ndarray) -> float:
    session = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    logits = session.run(None, {session.get_inputs()[0].name: test_x})[0]
    return float((logits.argmax(axis=1) == test_y).mean())


def _run_deployment(tmp_path: Path, certificates: tuple[Path, Path, Path] | None) -> None:
    repo, out = tmp_path / "repo", tmp_path / "outputs"
    overrides = [*OVERRIDES, f"repository={repo}"]
    pgids: set[int] = set()
    with local_superlink(
        simulation=False, certificates=certificates, flwr_home=tmp_path / "superlink"
    ) as link:
        pgids.add(link.process.pid)
        assert link.root_certificates == (certificates[0] if certificates else None)
        with local_supernodes(link, NUM_NODES, base_dir=tmp_path / "nodes") as nodes:
            pgids.update(node.process.pid for node in nodes)
            assert [n.partition_id for n in nodes] == list(range(NUM_NODES))
            assert len({n.runtime_port for n in nodes}) == NUM_NODES
            # raises unless `flwr ls` reports the run "finished:completed"
            link.run({"overrides": " ".join(overrides), "output-dir": str(out)}, timeout=300)

    # every node ran the ClientApp from the FAB it installed (no simulation anywhere)
    for node in nodes:
        assert ("--insecure" in node.process.args) == (certificates is None)
        assert list((node.flwr_home / "apps").iterdir()), f"node {node.partition_id} got no FAB"

    history = json.loads((out / "history.json").read_text())
    rounds = history["rounds"]
    assert [r["version"] for r in rounds] == [1, 2]
    assert all(r["counts"]["accepted"] == NUM_NODES for r in rounds)
    accuracies = [r["test_acc"] for r in rounds]
    assert history["initial"]["test_acc"] < 0.3  # 10 classes: chance
    assert accuracies[-1] > 0.6, accuracies

    # the repository is in Triton's layout and holds every version, each the model it claims
    model_dir = repo / "fedserve"
    assert 'platform: "onnxruntime_onnx"' in (model_dir / "config.pbtxt").read_text()
    assert (model_dir / "1" / "model.onnx").is_file() and (model_dir / "2" / "model.onnx").is_file()
    repository = ModelRepository(repo)
    assert repository.list_versions("fedserve") == [1, 2]
    for version in (1, 2):
        repository.verify("fedserve", version)
    data = shared_dataset(dataset_key(compose_experiment(overrides)), 5)
    served = _onnx_accuracy(
        model_dir / "2" / "model.onnx", data.test_x.numpy(), data.test_y.numpy()
    )
    assert abs(served - accuracies[-1]) <= 1.0 / len(data.test_y), (served, accuracies[-1])

    assert our_processes_alive(tmp_path, pgids) == []


# ~100-140 s each on the shared 2-core machine (about 20 Python processes apiece, most import torch)
@pytest.mark.slow
def test_deployment_superlink_and_supernodes(tmp_path: Path) -> None:
    _run_deployment(tmp_path, certificates=None)


@pytest.mark.slow
def test_deployment_over_tls(tmp_path: Path) -> None:
    certificates = _generate_certs(tmp_path / "certificates")
    _run_deployment(tmp_path, certificates=certificates)


def test_failed_serverapp_run_raises(tmp_path: Path) -> None:
    """``flwr run --stream`` exits 0 when the ServerApp raised; SuperLink.run must not."""
    with local_superlink(simulation=False, flwr_home=tmp_path / "superlink") as link:
        pgid = link.process.pid
        with pytest.raises(RunFailedError, match="'finished:failed': .*rounds must be > 0, got 0"):
            link.run({"overrides": "rounds=0", "output-dir": str(tmp_path / "out")}, timeout=180)
    assert our_processes_alive(tmp_path, {pgid}) == []


def test_run_status_parsing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Only ``finished:completed`` passes; ``flwr ls`` failing is an error, not a pass."""
    link = SuperLink(None, tmp_path, "127.0.0.1:1", tmp_path / "superlink.log")  # type: ignore[arg-type]
    answers = {
        "ok": {"success": True, "runs": [{"run-id": "1", "status": "finished:completed"}]},
        "failed": {
            "success": True,
            "runs": [{"run-id": "2", "status": "finished:failed", "status-details": "boom"}],
        },
        "stopped": {"success": True, "runs": [{"run-id": "3", "status": "finished:stopped"}]},
        "empty": {"success": True, "runs": []},
    }
    for name, answer in answers.items():
        monkeypatch.setattr(link, "_flwr_json", lambda args, answer=answer: answer)
        if name == "ok":
            link.raise_if_run_failed(1)
        elif name == "empty":
            link.raise_if_run_failed(None)  # no run at all: nothing failed
            with pytest.raises(RunFailedError, match="unknown"):
                link.raise_if_run_failed(7)
        else:
            with pytest.raises(RunFailedError, match=f"finished:{name}"):
                link.raise_if_run_failed(None)
    monkeypatch.undo()
    with pytest.raises(RuntimeError, match="failed"):
        link._flwr_json(["ls", "no-such-connection", "--format", "json"])
