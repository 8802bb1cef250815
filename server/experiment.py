"""One federated experiment on a Grid: strategy, central evaluation, history, checkpoints, export.

Versions drive everything: after each new global version the server evaluates it on the held-out
test set, appends to the history, checkpoints (atomically) and, when due, exports it to ONNX into
the model repository. The same function runs under ``flwr run .``, ``fedserve-train`` and a real
deployment.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from server.checkpoint import load_checkpoint, save_checkpoint
from server.history import History, HistoryEntry
from server.publisher import Publisher
from server.strategy import ParameterServer, VersionEvent
from server.strategy.messaging import from_array_record, to_array_record
from task.config import ConfigError, ExperimentConfig
from task.federated import check_partitions, dataset_key, shared_dataset
from task.models import build_model
from task.params import get_arrays, set_arrays
from task.training import evaluate, get_device, make_loader, set_seed

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"
PLOT_EVERY_S = 10.0  # history.png redraws during a run; the last write always draws
TASK_SECTIONS = ("dataset", "partition", "model", "train", "heterogeneity", "seed", "device")


@dataclass
class CentralEvaluator:
    """Evaluates global parameters on the held-out test set (one model, reused)."""

    model: torch.nn.Module
    test_x: torch.Tensor
    test_y: torch.Tensor
    device: torch.device
    batch_size: int = 512

    def __call__(self, arrays: dict[str, np.ndarray]) -> tuple[float, float]:
        set_arrays(self.model, arrays)
        loader = make_loader(self.test_x, self.test_y, self.batch_size, shuffle=False, seed=0)
        return evaluate(self.model, loader, self.device)


@dataclass
class ExperimentResult:
    history: History
    final_arrays: dict[str, np.ndarray]
    exported_versions: list[int] = field(default_factory=list)


def task_config(cfg: ExperimentConfig) -> str:
    """The JSON the clients rebuild their task from (data, partition, model, local training)."""
    data = cfg.to_dict()
    return json.dumps({k: data[k] for k in TASK_SECTIONS}, sort_keys=True)


def run_experiment(grid: Grid, cfg: ExperimentConfig) -> ExperimentResult:
    """Train ``cfg.rounds`` global versions on ``grid``; see the module docstring.

    With ``cfg.stop_at_accuracy`` set, the run ends after the first version whose central test
    accuracy reaches it (that version is still exported and checkpointed).
    """
    if cfg.resume and cfg.strategy.implementation == "flower_fedavg":
        raise ConfigError(
            "resume=true needs strategy.implementation=parameter_server; flower_fedavg is the "
            "reference strategy and keeps no server state to resume"
        )
    output_dir = Path(cfg.output_dir or "outputs")
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))

    set_seed(cfg.seed)
    data = shared_dataset(dataset_key(cfg), cfg.seed)
    device = get_device(cfg.device)
    model = build_model(cfg.model.name, data.input_shape, data.num_classes).to(device)
    evaluator = CentralEvaluator(model, data.test_x, data.test_y, device)
    initial = get_arrays(model)
    publisher = Publisher.create(cfg, data.test_x[:64], model) if cfg.repository else None

    history = History()
    checkpoint_path = output_dir / CHECKPOINT_NAME
    restored = load_checkpoint(checkpoint_path) if cfg.resume else None
    if cfg.resume and restored is None:
        log.warning("resume=true but no checkpoint at %s: starting from scratch", checkpoint_path)
    if restored is not None:
        history = History.from_dict(restored["history"])
        log.info("resuming from %s at version %d", checkpoint_path, restored["version"])
    else:
        loss, acc = evaluator(initial)
        history.initial = {"test_loss": loss, "test_acc": acc}
        log.info("initial model: test acc %.4f | test loss %.4f", acc, loss)

    train_config = ConfigRecord({"task": task_config(cfg), "reply": "delta"})
    evaluate_config = ConfigRecord({"task": task_config(cfg)})
    best = max((e.test_acc for e in history.entries), default=-1.0)
    started = time.perf_counter()
    last_plot = -math.inf
    exported: list[int] = []

    def on_version(
        version: int,
        server_round: int,
        arrays: dict[str, np.ndarray],
        client_metrics: dict[str, float],
        counts: dict[str, int],
        server_state: dict[str, Any] | None,
        seconds: float | None = None,
        made_at: float | None = None,
    ) -> bool:
        """Evaluate, record, export, checkpoint; True when ``stop_at_accuracy`` is reached.

        ``seconds`` / ``made_at``: the strategy's own wall time since the previous version and
        when this one was made (the ParameterServer: exact also when versions are announced in
        background, after the clients moved on); without them both are taken here.
        """
        nonlocal best, started, last_plot
        # train->serve latency starts when the new global params exist
        params_at = time.time() if made_at is None else made_at
        loss, acc = evaluator(arrays)
        entry = HistoryEntry(
            version=version,
            round=server_round,
            test_loss=loss,
            test_acc=acc,
            seconds=time.perf_counter() - started if seconds is None else seconds,
            client_metrics=client_metrics,
            counts=counts,
            timing={"params_at": params_at, "evaluated_at": time.time()},
        )
        is_best = acc > best
        best = max(best, acc)
        if publisher is not None and publisher.due(cfg, version, is_best):
            entry.exported_version = publisher.publish(model, arrays, entry, cfg)
            exported.append(entry.exported_version)
        history.add(entry, cfg.rounds)
        # matplotlib takes ~0.2 s of the server loop per version: redraw every PLOT_EVERY_S at most
        plot = time.perf_counter() - last_plot >= PLOT_EVERY_S
        history.write(output_dir, plot=plot)
        if plot:
            last_plot = time.perf_counter()
        if server_state is not None:
            save_checkpoint(
                checkpoint_path,
                {
                    **server_state,
                    "history": history.to_dict(),
                    "config": cfg.to_dict(),
                },
            )
        started = time.perf_counter()
        if cfg.stop_at_accuracy is not None and acc >= cfg.stop_at_accuracy:
            log.info(
                "version %d reached test acc %.4f >= stop_at_accuracy=%g: stopping",
                version,
                acc,
                cfg.stop_at_accuracy,
            )
            return True
        return False

    check_partitions(cfg)
    wait_for_nodes(grid, cfg.num_clients, timeout=cfg.strategy.round_timeout_s)
    if cfg.strategy.implementation == "flower_fedavg":
        final = _run_flower_fedavg(grid, cfg, initial, train_config, evaluate_config, on_version)
    else:
        final = _run_parameter_server(
            grid,
            cfg,
            initial,
            restored,
            train_config,
            evaluate_config,
            on_version,
        )
    history.write(output_dir)
    log.info(
        "done: final test acc %.4f, best %.4f; history in %s",
        history.final_acc,
        history.best_acc,
        output_dir / "history.json",
    )
    return ExperimentResult(history=history, final_arrays=final, exported_versions=exported)


def wait_for_nodes(grid: Grid, expected: int, timeout: float, stall: float = 60.0) -> None:
    """Nodes register asynchronously: start when ``expected`` are connected, or fail clearly.

    Gives up after ``timeout`` seconds, or after ``stall`` seconds without a new node (a
    federation smaller than ``num_clients`` never grows by itself).
    """
    started = last_change = time.monotonic()
    seen = -1
    while (connected := len(list(grid.get_node_ids()))) < expected:
        now = time.monotonic()
        if connected != seen:
            seen, last_change = connected, now
        if now - started > timeout or now - last_change > stall:
            raise TimeoutError(
                f"num_clients={expected} but only {connected} nodes connected after "
                f"{now - started:.0f} s; set num_clients={connected} (in --run-config "
                f"overrides) or start {expected} SuperNodes (--federation-config "
                f"'num-supernodes={expected}' in simulation)"
            )
        time.sleep(0.2)
    log.info("%d nodes connected", connected)


def _run_parameter_server(
    grid: Grid,
    cfg: ExperimentConfig,
    initial: dict[str, np.ndarray],
    restored: dict[str, Any] | None,
    train_config: ConfigRecord,
    evaluate_config: ConfigRecord,
    on_version: Any,
) -> dict[str, np.ndarray]:
    strategy = ParameterServer(cfg.strategy, seed=cfg.seed)
    if restored is not None:
        strategy.state.load_state_dict(restored)
    # The query carries the task: every client loads its data (and warms up) before it answers,
    # and version 1's seconds count from start(), as later versions' do from the one before.
    strategy.ensure_partitions(grid, cfg.strategy.round_timeout_s, train_config)

    class Hook:
        def accept(self, event: VersionEvent) -> bool:
            return on_version(
                event.version,
                event.round,
                event.arrays,
                dict(event.train_metrics),
                dict(event.counts),
                event.state,
                seconds=event.seconds,
                made_at=event.made_at,
            )

        def close(self) -> None:
            pass

    strategy.start(
        grid,
        to_array_record(initial),
        num_rounds=cfg.rounds,
        timeout=cfg.strategy.round_timeout_s,
        train_config=train_config,
        evaluate_config=evaluate_config,
        sink=Hook(),
    )
    return strategy.state.published_arrays()


def _run_flower_fedavg(
    grid: Grid,
    cfg: ExperimentConfig,
    initial: dict[str, np.ndarray],
    train_config: ConfigRecord,
    evaluate_config: ConfigRecord,
    on_version: Any,
) -> dict[str, np.ndarray]:
    """Flower's built-in FedAvg on full weights: the reference for benchmarks and parity tests."""
    nodes = max(1, min(cfg.num_clients, round(cfg.strategy.fraction_train * cfg.num_clients)))
    strategy = _RecordingFedAvg(
        fraction_train=cfg.strategy.fraction_train,
        fraction_evaluate=cfg.strategy.fraction_evaluate,
        min_train_nodes=nodes,
        min_evaluate_nodes=0,
        min_available_nodes=cfg.num_clients,
    )
    train_config = ConfigRecord({**dict(train_config), "reply": "weights"})
    last: dict[str, np.ndarray] = dict(initial)

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        nonlocal last
        if server_round > 0:
            last = from_array_record(arrays)
            if on_version(server_round, server_round, last, strategy.last_train_metrics, {}, None):
                raise _StopRun(server_round)
        return None

    try:
        strategy.start(
            grid,
            to_array_record(initial),
            num_rounds=cfg.rounds,
            timeout=cfg.strategy.round_timeout_s,
            train_config=train_config,
            evaluate_config=evaluate_config,
            evaluate_fn=evaluate_fn,
        )
    except _StopRun as stop:
        # Flower's Strategy.start has no stop hook. Central evaluation is the last step of a
        # round, after every train/evaluate reply was received: nothing is in flight here.
        log.info("flower_fedavg stopped after round %d (stop_at_accuracy)", stop.round)
    return last


class _StopRun(Exception):
    """Raised from Flower FedAvg's ``evaluate_fn`` to end ``start`` after a round."""

    def __init__(self, server_round: int) -> None:
        super().__init__(f"stop after round {server_round}")
        self.round = server_round


class _RecordingFedAvg(FedAvg):
    """Flower's FedAvg, keeping the last round's aggregated client metrics for the history."""

    last_train_metrics: dict[str, float] = {}

    def aggregate_train(self, server_round, replies):  # type: ignore[no-untyped-def]
        arrays, metrics = super().aggregate_train(server_round, replies)
        self.last_train_metrics = dict(metrics) if metrics is not None else {}
        return arrays, metrics
