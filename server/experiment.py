"""One federated experiment on a Grid: the wiring of data, model, strategy and version sink.

The run first checks a resume (:mod:`server.resume`: nothing is written before it passed), then
builds the task (data, model, central evaluator), the publisher (export into the model repository,
numbered after the global version: :mod:`server.version_numbering`), the history (restored from
the checkpoint when resuming) and the app's version sink (:class:`ExperimentSink`: evaluate →
export → history → checkpoint), then runs the configured strategy, which feeds every new global
version to that sink. The same function runs under ``flwr run .``, ``fedserve-train`` and a real
deployment.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord
from flwr.serverapp import Grid

from server.central_evaluation import CentralEvaluator
from server.config import ExperimentConfig
from server.flower_fedavg import run_flower_fedavg
from server.history import History
from server.publisher import Publisher
from server.resume import check_resume, checkpoint_path
from server.strategy.messaging import to_array_record
from server.strategy.parameter_server import ParameterServer
from server.version_numbering import VersionNumbering
from server.version_sink import ExperimentSink
from task.federated import check_partitions, dataset_key, shared_dataset
from task.models import build_model
from task.params import get_arrays
from task.training import get_device, set_seed

log = logging.getLogger(__name__)


@dataclass
class ExperimentResult:
    history: History
    final_arrays: dict[str, np.ndarray]


def task_config(cfg: ExperimentConfig) -> str:
    """The JSON the clients rebuild their task from (data, partition, model, local training)."""
    return json.dumps(cfg.task_dict(), sort_keys=True)


def run_experiment(grid: Grid, cfg: ExperimentConfig) -> ExperimentResult:
    """Train ``cfg.rounds`` global versions on ``grid``; see the module docstring.

    With ``cfg.stop_at_accuracy`` set, the run ends after the first version whose central test
    accuracy reaches it (that version is still exported and checkpointed).
    """
    output_dir = Path(cfg.output_dir or "outputs")
    restored = check_resume(cfg, output_dir)  # before anything is written (config.json too)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))

    set_seed(cfg.seed)
    data = shared_dataset(dataset_key(cfg), cfg.seed)
    device = get_device(cfg.device)
    model = build_model(cfg.model.name, data.input_shape, data.num_classes).to(device)
    evaluator = CentralEvaluator(model, data.test_x, data.test_y, device)
    initial = get_arrays(model)
    publisher = Publisher.create(cfg, data.test_x[:64], model)
    numbering = None
    if publisher is not None:
        name = cfg.export.model_name
        newest = max(publisher.repository.list_versions(name), default=0)
        numbering = VersionNumbering.start(str(cfg.repository), name, newest, restored)

    strategy = None
    if cfg.strategy.implementation == "parameter_server":
        strategy = ParameterServer(cfg.strategy, seed=cfg.seed)
    if strategy is not None and restored is not None:  # flower_fedavg never resumes (checked)
        strategy.state.load_state_dict(restored)
        history = History.from_dict(restored["history"])
    else:
        history = History()
        loss, acc = evaluator(initial)
        history.initial = {"test_loss": loss, "test_acc": acc}
        log.info("initial model: test acc %.4f | test loss %.4f", acc, loss)
    sink = ExperimentSink(
        cfg, evaluator, history, output_dir, checkpoint_path(output_dir), publisher, numbering
    )

    train_config = ConfigRecord({"task": task_config(cfg), "reply": "delta"})
    evaluate_config = ConfigRecord({"task": task_config(cfg)})
    check_partitions(cfg, cfg.num_clients)
    wait_for_nodes(grid, cfg.num_clients, timeout=cfg.strategy.discovery_timeout_s)
    if strategy is None:
        final = run_flower_fedavg(grid, cfg, initial, train_config, evaluate_config, sink)
    else:
        # The query carries the task: every client loads its data (and warms up) before it
        # answers, and version 1's seconds count from start(), as later versions' do from the
        # one before.
        strategy.ensure_partitions(grid, cfg.strategy.discovery_timeout_s, train_config)
        strategy.start(
            grid,
            to_array_record(initial),
            num_rounds=cfg.rounds,
            timeout=cfg.strategy.round_timeout_s,
            train_config=train_config,
            evaluate_config=evaluate_config,
            sink=sink,
        )
        final = strategy.state.published_arrays()
    sink.close()
    log.info(
        "done: final test acc %.4f, best %.4f; history in %s",
        history.final_acc,
        history.best_acc,
        output_dir / "history.json",
    )
    return ExperimentResult(history=history, final_arrays=final)


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
