"""``make demo``: train on digits while serving every new global version, and check them against
each other.

1. Starts ``fedserve-serve`` on a fresh model repository (a free 127.0.0.1 port, its own process
   group), then ``fedserve-train`` (10 clients, 5 rounds, ``fedadam``, the FedAvg CNN) publishing
   every global version into that repository.
2. While it trains, asks the server for one test image every 20 ms (KServe v2, binary tensors);
   the first answer of a new version ends that version's train->serve latency, which starts when
   the trainer had the new global parameters (``timing.params_at`` in history.json/metadata.json).
3. Sends the whole test set - the exact tensors the trainer evaluates on,
   ``task.data.load_dataset`` - to that version (``/v2/models/fedserve/versions/<v>/infer``) and
   prints, per round, the served version, the served accuracy, the accuracy torch measured
   (history.json) and the latency.
4. Stops everything it started, also on Ctrl-C or an error, and exits 1 when a check fails:
   served accuracy == torch accuracy (to 1e-9) for every version, the final accuracy reaches
   ``--min-accuracy`` (0.90), every round was published and served.

``python scripts/demo.py --help`` lists the knobs; anything after ``--`` goes to fedserve-train
as Hydra overrides. The reusable parts (server process, v2 client, process-tree stop, the
pipeline run) are used by ``benchmarks/train_to_serve.py`` too.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

PROJECT_DIR = Path(__file__).resolve().parents[1]
if str(PROJECT_DIR) not in sys.path:
    sys.path.insert(0, str(PROJECT_DIR))

BIN = Path(sys.executable).parent
# No forced colours: fedserve-train parses JSON from the Flower CLI, which FORCE_COLOR would colour.
ENV = {
    **{k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "CLICOLOR_FORCE")},
    "NO_COLOR": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "PYTHONUNBUFFERED": "1",
    "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
}
MODEL_NAME = "fedserve"
AGREE_TOL = 1e-9
POLL_S = 0.02


class DemoFailed(RuntimeError):
    """A step of the pipeline failed (the message says which and where its log is)."""


# ------------------------------------------------------------------ processes


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def spawn(command: list[str], log_path: Path, cwd: Path = PROJECT_DIR) -> subprocess.Popen[bytes]:
    """Start ``command`` in its own session (process group), stdout+stderr to ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            command,
            cwd=cwd,
            env=ENV,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


class ProcessTree:
    """A started process and every descendant seen so far (Flower's SuperLink and Ray run in
    sessions of their own, so its process group alone does not cover them)."""

    def __init__(self, process: subprocess.Popen[bytes], name: str) -> None:
        self.process = process
        self.name = name
        self._known: dict[int, Any] = {}
        self.refresh()

    def refresh(self) -> None:
        try:
            import psutil
        except ImportError:  # pragma: no cover - psutil is a dev dependency; the group still stops
            return
        try:
            root = psutil.Process(self.process.pid)
            for proc in [root, *root.children(recursive=True)]:
                self._known.setdefault(proc.pid, proc)
        except psutil.Error:
            pass

    def stop(self, first: int = signal.SIGINT, grace: float = 30.0) -> None:
        """``first`` to the process group, wait ``grace`` s, then SIGKILL the group and any
        remembered descendant still alive."""
        self.refresh()
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, first)
            try:
                self.process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                print(f"  {self.name} did not stop within {grace:.0f} s: killing it", flush=True)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=10)
        self._kill_leftovers(grace=10.0)

    def _kill_leftovers(self, grace: float) -> None:
        try:
            import psutil
        except ImportError:  # pragma: no cover
            return
        alive = []
        for proc in self._known.values():
            with contextlib.suppress(psutil.Error):
                if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                    alive.append(proc)
        if not alive:
            return
        for proc in alive:
            with contextlib.suppress(psutil.Error):
                proc.terminate()
        _, alive = psutil.wait_procs(alive, timeout=grace)
        for proc in alive:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(alive, timeout=5)


@dataclass
class Server:
    """A running ``fedserve-serve``."""

    name: str
    tree: ProcessTree
    port: int
    log_path: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.tree.process.poll() is not None:
                raise DemoFailed(
                    f"fedserve-serve exited with {self.tree.process.returncode}; "
                    f"see {self.log_path}"
                )
            client = V2Client(self.address, timeout=2.0)
            try:
                if client.ready():
                    return
            except (OSError, http.client.HTTPException):
                pass
            finally:
                client.close()
            time.sleep(0.1)
        raise DemoFailed(
            f"fedserve-serve did not get ready within {timeout:.0f} s; see {self.log_path}"
        )

    def timings(self) -> dict[int, dict[str, Any]]:
        """The watcher's ``swap timing {json}`` log lines, by version."""
        found: dict[int, dict[str, Any]] = {}
        with contextlib.suppress(FileNotFoundError):
            for line in self.log_path.read_text(errors="replace").splitlines():
                if "swap timing {" in line:
                    doc = json.loads(line[line.index("{") :])
                    if doc.get("model") == MODEL_NAME:
                        found[int(doc["version"])] = doc
        return found


def start_server(name: str, repository: Path, log_path: Path, overrides: list[str]) -> Server:
    """Spawn ``fedserve-serve`` on a free port (call :meth:`Server.wait_ready` next)."""
    port = free_port()
    command = [
        str(BIN / "fedserve-serve"),
        f"repository={repository}",
        f"port={port}",
        "log_level=warning",
        *overrides,
    ]
    return Server(name, ProcessTree(spawn(command, log_path), name), port, log_path)


# ------------------------------------------------------------------ KServe v2 client


class V2Client:
    """KServe v2 inference over one keep-alive HTTP connection, binary tensor extension."""

    def __init__(self, address: str, timeout: float = 10.0) -> None:
        host, port = address.rsplit(":", 1)
        self.conn = http.client.HTTPConnection(host, int(port), timeout=timeout)

    def close(self) -> None:
        self.conn.close()

    def _request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        for attempt in (1, 2):
            try:
                self.conn.request(method, path, body=body, headers=headers or {})
                response = self.conn.getresponse()
                return response.status, dict(response.getheaders()), response.read()
            except (ConnectionError, http.client.HTTPException):
                self.conn.close()  # a dropped keep-alive connection: reconnect once
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def ready(self) -> bool:
        return self._request("GET", "/v2/health/ready")[0] == 200

    def infer(
        self,
        x: np.ndarray,
        version: int | None = None,
        input_name: str = "input",
        output_name: str = "logits",
    ) -> tuple[int | None, np.ndarray | None]:
        """(answering version, logits), or (None, None) when the model/version is not served."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        header = json.dumps(
            {
                "inputs": [
                    {
                        "name": input_name,
                        "shape": list(x.shape),
                        "datatype": "FP32",
                        "parameters": {"binary_data_size": x.nbytes},
                    }
                ],
                "outputs": [{"name": output_name, "parameters": {"binary_data": True}}],
            }
        ).encode()
        path = f"/v2/models/{MODEL_NAME}" + (f"/versions/{version}" if version else "") + "/infer"
        status, headers, body = self._request(
            "POST",
            path,
            header + x.tobytes(),
            {
                "Content-Type": "application/octet-stream",
                "Inference-Header-Content-Length": str(len(header)),
            },
        )
        if status in (404, 503):
            return None, None
        if status != 200:
            raise DemoFailed(f"POST {path} answered {status}: {body[:300]!r}")
        length = {k.lower(): v for k, v in headers.items()}.get("inference-header-content-length")
        n = int(length) if length is not None else len(body)
        doc = json.loads(body[:n])
        out = doc["outputs"][0]
        if "data" in out:
            logits = np.asarray(out["data"], dtype=np.float32)
        else:
            logits = np.frombuffer(body[n:], dtype=np.float32)
        return int(doc["model_version"]), logits.reshape(out["shape"])

    def accuracy(self, x: np.ndarray, y: np.ndarray, version: int, batch: int = 64) -> float | None:
        """Accuracy of ``version`` on (x, y), or None if it stopped being served meanwhile."""
        correct = 0
        for start in range(0, len(x), batch):
            answered, logits = self.infer(x[start : start + batch], version)
            if answered != version or logits is None:
                return None
            correct += int((logits.argmax(axis=1) == y[start : start + batch]).sum())
        return correct / len(y)


# ------------------------------------------------------------------ the pipeline


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
) -> PipelineResult:
    """Serve a fresh repository in ``workdir`` with one ``fedserve-serve`` per entry of
    ``server_overrides`` while ``fedserve-train`` publishes into it; see the module docstring."""
    from server.config_loader import compose_experiment
    from task.data import load_dataset

    started = time.monotonic()
    workdir.mkdir(parents=True, exist_ok=True)
    repository = workdir / "model_repository"
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
        train = ProcessTree(spawn(command, workdir / "train.log"), "fedserve-train")
        print(f"  training: {' '.join(train_overrides)} (log {workdir / 'train.log'})", flush=True)
        probe = test_x[:1]
        deadline = time.monotonic() + train_timeout
        last_refresh = 0.0
        history: dict[str, Any] = {}
        while True:
            done = train.process.poll() is not None
            fresh = []  # probe every server before measuring any (fair first-response times)
            for name, client in clients.items():
                answered, _ = client.infer(probe)
                if answered is not None and answered not in pending[name]:
                    pending[name][answered] = Served(first_at=time.time())
                    fresh.append((name, answered))
            for name, version in fresh:
                accuracy = clients[name].accuracy(test_x, test_y, version)
                pending[name][version].accuracy = accuracy
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
            accuracy = None
            while accuracy is None and time.monotonic() < deadline:
                accuracy = client.accuracy(test_x, test_y, version)
                if accuracy is None:
                    time.sleep(0.1)
            record.served[name] = Served(accuracy=accuracy)
            record.served[name].timing = servers[name].timings().get(version, {})
        reported.add(version)
        if on_record is not None:
            on_record(record)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None


# ------------------------------------------------------------------ the demo


def _fmt(value: float | None, spec: str = ".4f", missing: str = "n/a") -> str:
    return missing if value is None else format(value, spec)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--strategy", default="fedadam")
    parser.add_argument("--model", default="cnn")
    parser.add_argument("--dataset", default="digits")
    parser.add_argument(
        "--min-accuracy", type=float, default=0.90, help="final torch test accuracy to reach"
    )
    parser.add_argument(
        "--target-latency", type=float, default=2.0, help="reported, not enforced (shared CPUs)"
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="where the repository, logs and history go (default outputs/demo-<time>)",
    )
    parser.add_argument("overrides", nargs="*", help="extra fedserve-train overrides (after --)")
    return parser.parse_args(argv)


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    workdir = (args.workdir or PROJECT_DIR / "outputs" / f"demo-{stamp}").resolve()
    train_overrides = [
        f"dataset={args.dataset}",
        f"model={args.model}",
        f"strategy={args.strategy}",
        f"rounds={args.rounds}",
        f"num_clients={args.clients}",
        *args.overrides,
    ]
    print(
        f"fedserve demo: {args.clients} clients x {args.rounds} rounds of {args.strategy} on "
        f"{args.dataset} ({args.model}), every version served while training goes on\n"
        f"  outputs in {workdir}",
        flush=True,
    )
    header = (
        f"{'round':>5} | {'version':>7} | {'served acc':>10} | {'torch acc':>9} | "
        f"{'agree':>5} | {'train->serve':>12}"
    )
    printed_header = False

    def show(record: VersionRecord) -> None:
        nonlocal printed_header
        if not printed_header:
            print(header + "\n" + "-" * len(header), flush=True)
            printed_header = True
        served = record.served["demo"]
        latency = record.latency("demo")
        print(
            f"{record.round:>5} | {record.version:>7} | {_fmt(served.accuracy):>10} | "
            f"{record.torch_acc:>9.4f} | {'yes' if record.agrees('demo') else 'NO':>5} | "
            f"{_fmt(latency, '.3f'):>10} s",
            flush=True,
        )

    try:
        result = run_pipeline(
            workdir,
            train_overrides,
            {"demo": ["serving.versions=2"]},  # the newest two: the previous one stays queryable
            on_record=show,
        )
    except KeyboardInterrupt:
        print("interrupted: stopped everything the demo started", flush=True)
        return 130
    except DemoFailed as err:
        print(f"FAILED: {err}", flush=True)
        return 1
    return report(result, args, workdir)


def report(result: PipelineResult, args: argparse.Namespace, workdir: Path) -> int:
    failures: list[str] = []
    if result.train_returncode != 0:
        failures.append(
            f"fedserve-train exited with {result.train_returncode}; see {workdir / 'train.log'}"
        )
    rounds = result.history.get("rounds", [])
    early_stop = any(o.startswith("stop_at_accuracy=") for o in args.overrides)
    if not rounds or len(rounds) > args.rounds or (len(rounds) < args.rounds and not early_stop):
        failures.append(f"history.json has {len(rounds)} versions, expected {args.rounds}")
    unexported = [r["version"] for r in rounds if r.get("exported_version") is None]
    if unexported:
        failures.append(f"global versions {unexported} were not exported; see train.log")
    for record in result.records:
        served = record.served.get("demo")
        if served is None or served.accuracy is None:
            failures.append(f"version {record.version} was never served")
        elif not record.agrees("demo"):
            failures.append(
                f"version {record.version}: served accuracy {served.accuracy:.6f} != torch "
                f"accuracy {record.torch_acc:.6f} (an argmax near-tie flipped between "
                "onnxruntime and torch?)"
            )
    final = result.history.get("final_test_acc")
    if final is None or not final >= args.min_accuracy:
        failures.append(f"final test accuracy {final} is below --min-accuracy={args.min_accuracy}")
    if not all(result.servers_alive.values()):
        failures.append("fedserve-serve died during the run")
    latencies = [x for r in result.records if (x := r.latency("demo")) is not None]
    print("", flush=True)
    if latencies:
        median = statistics.median(latencies)
        verdict = "met" if median <= args.target_latency else "NOT met on this machine"
        print(
            f"train->serve latency: median {median:.3f} s, max {max(latencies):.3f} s over "
            f"{len(latencies)} versions (target <= {args.target_latency:g} s: {verdict})",
            flush=True,
        )
    print(f"demo took {result.seconds:.1f} s; outputs in {workdir}", flush=True)
    if failures:
        for failure in failures:
            print(f"CHECK FAILED: {failure}", flush=True)
        return 1
    print(
        f"all checks passed: served accuracy == torch accuracy for all {len(result.records)} "
        f"versions, final test accuracy {final:.4f} >= {args.min_accuracy:g}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
