"""The train-while-serving pipeline: poll the server for new versions, measure each against
the trainer's torch accuracy, and clean up everything started (see :mod:`scripts.demo`)."""

from __future__ import annotations

import contextlib
import json
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from scripts.demo_client import DemoFailed, accuracy, ask
from scripts.demo_processes import BIN, ProcessTree, Server, spawn, start_server
from serving.v2_client import V2Client

AGREE_TOL = 1e-9
POLL_S = 0.02


@dataclass
class Served:
    """One server's view of one version."""

    first_at: float | None = None  # first response of this version to the 20 ms poll
    accuracy: float | None = None
    timing: dict[str, Any] = field(default_factory=dict)  # the watcher's swap timing


@dataclass
class VersionRecord:
    version: int  # repository version
    round: int
    global_version: int
    torch_acc: float
    trainer: dict[str, float]  # history.json "timing"
    served: dict[str, Served] = field(default_factory=dict)

    def latency(self, server: str) -> float | None:
        s = self.served.get(server)
        start = self.trainer.get("params_at")
        if s is None or s.first_at is None or start is None:
            return None
        return s.first_at - start

    def agrees(self, server: str) -> bool:
        s = self.served.get(server)
        return (
            s is not None
            and s.accuracy is not None
            and abs(s.accuracy - self.torch_acc) <= AGREE_TOL
        )


@dataclass
class PipelineResult:
    records: list[VersionRecord]
    train_returncode: int | None
    servers_alive: dict[str, bool]
    seconds: float
    history: dict[str, Any]


def run_pipeline(
    workdir: Path,
    train_overrides: list[str],
    server_overrides: dict[str, list[str]],
    on_record: Callable[[VersionRecord], None] | None = None,
    train_timeout: float = 1800.0,
    repository_url: str | None = None,
) -> PipelineResult:
    """Serve a fresh repository in ``workdir`` (or at ``repository_url``, a model store) with one
    ``fedserve-serve`` per entry of ``server_overrides`` while ``fedserve-train`` publishes into
    it; see the module docstring."""
    from server.config_loader import compose_experiment
    from task.data import load_dataset

    started = time.monotonic()
    workdir.mkdir(parents=True, exist_ok=True)
    repository: Path | str = repository_url or workdir / "model_repository"
    if isinstance(repository, Path):
        repository.mkdir(exist_ok=True)
    train_dir = workdir / "train"
    cfg = compose_experiment(train_overrides)  # validates the overrides before anything starts
    data = load_dataset(cfg.dataset, cfg.seed)
    test_x, test_y = data.test_x.numpy(), data.test_y.numpy()

    servers: dict[str, Server] = {}
    clients: dict[str, V2Client] = {}
    train: ProcessTree | None = None
    records: dict[int, VersionRecord] = {}
    pending: dict[str, dict[int, Served]] = {}  # served before history.json had the entry
    reported: set[int] = set()
    try:
        for name, overrides in server_overrides.items():
            servers[name] = start_server(name, repository, workdir / f"serve-{name}.log", overrides)
            servers[name].wait_ready()
            clients[name] = V2Client(servers[name].address)
            pending[name] = {}
            print(f"  {name}: fedserve-serve at http://{servers[name].address}/v2", flush=True)
        command = [
            str(BIN / "fedserve-train"),
            *train_overrides,
            f"repository={repository}",
            f"hydra.run.dir={train_dir}",
        ]
        train = ProcessTree(spawn(command, workdir / "train.log"))
        print(f"  training: {' '.join(train_overrides)} (log {workdir / 'train.log'})", flush=True)
        probe = test_x[:1]
        deadline = time.monotonic() + train_timeout
        last_refresh = 0.0
        history: dict[str, Any] = {}
        while True:
            done = train.process.poll() is not None
            fresh = []  # probe every server before measuring any (fair first-response times)
            for name, client in clients.items():
                answered, _ = ask(client, probe)
                if answered is not None and answered not in pending[name]:
                    pending[name][answered] = Served(first_at=time.time())
                    fresh.append((name, answered))
            for name, version in fresh:
                pending[name][version].accuracy = accuracy(clients[name], test_x, test_y, version)
            history = _read_json(train_dir / "history.json") or history
            for entry in history.get("rounds", []):
                version = entry.get("exported_version")
                if version is None or version in records:
                    continue
                records[version] = VersionRecord(
                    version=version,
                    round=entry["round"],
                    global_version=entry["version"],
                    torch_acc=entry["test_acc"],
                    trainer=entry.get("timing") or {},
                )
            for version, record in sorted(records.items()):
                for name in servers:
                    if name not in record.served and version in pending[name]:
                        record.served[name] = pending[name][version]
                if version not in reported and len(record.served) == len(servers):
                    reported.add(version)
                    timings = {n: s.timings() for n, s in servers.items()}
                    for name, served in record.served.items():
                        served.timing = timings[name].get(version, {})
                    if on_record is not None:
                        on_record(record)
            if time.monotonic() - last_refresh > 2.0:
                train.refresh()
                last_refresh = time.monotonic()
            if done:
                break
            if time.monotonic() > deadline:
                raise DemoFailed(f"training ran past {train_timeout:.0f} s; see {workdir}")
            for name, server in servers.items():
                if server.tree.process.poll() is not None:
                    raise DemoFailed(f"fedserve-serve ({name}) died; see {server.log_path}")
            time.sleep(POLL_S)
        _finish_stragglers(records, reported, servers, clients, test_x, test_y, on_record)
        alive = {n: s.tree.process.poll() is None for n, s in servers.items()}
        return PipelineResult(
            records=[records[v] for v in sorted(records)],
            train_returncode=train.process.returncode,
            servers_alive=alive,
            seconds=time.monotonic() - started,
            history=history,
        )
    finally:
        with _no_interrupts():
            for client in clients.values():
                client.close()
            if train is not None:
                train.stop(signal.SIGINT, grace=60)
            for server in servers.values():
                server.tree.stop(signal.SIGINT, grace=20)


@contextlib.contextmanager
def _no_interrupts() -> Iterator[None]:
    """Let the clean-up finish: a second Ctrl-C (or SIGTERM) meanwhile only says so."""

    def note(signum: int, frame: Any) -> None:
        print("  still stopping what the demo started ...", flush=True)

    try:
        saved = {s: signal.signal(s, note) for s in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread: signals cannot be handled here anyway
        yield
        return
    try:
        yield
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)


def _finish_stragglers(
    records: dict[int, VersionRecord],
    reported: set[int],
    servers: dict[str, Server],
    clients: dict[str, V2Client],
    test_x: np.ndarray,
    test_y: np.ndarray,
    on_record: Callable[[VersionRecord], None] | None,
) -> None:
    """Versions the poll never saw as the newest (published in the last instant of the run):
    wait a little for the server to load them, then measure them directly (no latency)."""
    deadline = time.monotonic() + 10
    for version, record in sorted(records.items()):
        if version in reported:
            continue
        for name, client in clients.items():
            if name in record.served:
                continue
            measured = None
            while measured is None and time.monotonic() < deadline:
                measured = accuracy(client, test_x, test_y, version)
                if measured is None:
                    time.sleep(0.1)
            record.served[name] = Served(accuracy=measured)
            record.served[name].timing = servers[name].timings().get(version, {})
        reported.add(version)
        if on_record is not None:
            on_record(record)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None
