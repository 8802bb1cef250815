"""``fedserve-train``: the Hydra app that runs one federated simulation per (sweep) job.

The composed config is validated here, before anything starts. The run itself goes the supported
Flower way (a private ``flower-superlink --simulation`` and ``flwr run`` of this project, see
:mod:`server.launcher`; its clients on a Ray instance of its own or, with
``simulation.ray_address``, on a running Ray cluster), carrying this job's Hydra overrides in the
run config, so the ServerApp composes exactly the config validated here — the same experiment
``flwr run .`` runs for the same overrides. A job returns its objective (:mod:`server.sweep`) to
whatever sweeper runs it.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from server.config import ExperimentConfig
from server.config_loader import (
    CONF_DIR,
    check_overrides,
    experiment_from_hydra,
    job_config_from_hydra,
    register_schemas,
)
from server.history import History
from server.launcher import check_ray_address, local_superlink
from server.publisher import check_repository
from server.resume import check_resume
from server.run_lock import RunDirectoryLocked, run_lock
from server.sweep import check_direction, objective, objective_name
from serving.config_schema import config_errors_exit, run_cli
from serving.store import is_remote
from task.config import ConfigError
from task.federated import check_partitions

log = logging.getLogger(__name__)

PATH_KEYS = ("repository", "dataset.root")
#: groups that configure the sweep, not the experiment: the ServerApp does not get them
SWEEP_GROUPS = ("search",)
PROGRAM = "fedserve-train"
#: refused with one line and exit code 2
CONFIG_ERRORS = (ConfigError, RunDirectoryLocked)


def absolute_overrides(overrides: list[str], cfg: ExperimentConfig) -> list[str]:
    """Pin relative paths to this process's cwd (the ServerApp runs in another process) and leave
    out the sweep's own groups."""
    dropped = PATH_KEYS + SWEEP_GROUPS
    pinned = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in dropped]
    repository = cfg.repository
    if repository and not is_remote(repository):
        repository = str(Path(repository).resolve())
    pinned.append(f"repository={repository}" if repository else "repository=null")
    if cfg.dataset.root:
        pinned.append(f"dataset.root={Path(cfg.dataset.root).resolve()}")
    return pinned


def client_gpu_share(cfg: ExperimentConfig, clients_per_gpu: int = 4) -> float:
    """Each simulated client's GPU share: up to ``clients_per_gpu`` train at once per GPU."""
    if cfg.device == "cpu":
        return 0.0
    import torch

    return 1.0 / clients_per_gpu if torch.cuda.is_available() else 0.0


def train_job(cfg: DictConfig) -> float:
    """Run one job; returns its objective (:func:`server.sweep.objective`: the final test
    accuracy, or the rounds to ``stop_at_accuracy``), the value a Hydra sweeper optimises."""
    hydra_cfg = HydraConfig.get()
    check_overrides(list(hydra_cfg.overrides.task))
    experiment = job_config_from_hydra(cfg)
    check_direction(hydra_cfg.sweeper, experiment.stop_at_accuracy)
    check_partitions(experiment, experiment.num_clients)
    if experiment.export.enabled:
        check_repository(experiment.repository)
    simulation = experiment.simulation
    if simulation.ray_address is not None:
        check_ray_address(simulation.ray_address)
    output_dir = Path(experiment.output_dir or hydra_cfg.runtime.output_dir).resolve()
    # a refused resume costs no SuperLink/Ray start-up; the checkpoint holds the experiment only
    check_resume(experiment_from_hydra(cfg), output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    task_overrides = list(hydra_cfg.overrides.task)
    (output_dir / "overrides.txt").write_text(" ".join(task_overrides))
    overrides = absolute_overrides(task_overrides, experiment)
    log.info("job overrides %s -> outputs in %s", task_overrides, output_dir)
    with run_lock(output_dir), local_superlink(ray_address=simulation.ray_address) as link:
        link.run(
            {"overrides": json.dumps(overrides), "output-dir": str(output_dir)},
            num_supernodes=experiment.num_clients,
            client_cpus=simulation.client_cpus,
            client_gpus=client_gpu_share(experiment),
        )
    history_file = output_dir / "history.json"
    if not history_file.exists():
        raise RuntimeError(f"the run wrote no {history_file}; see the log above")
    history = History.from_dict(json.loads(history_file.read_text()))
    score = objective(history, experiment.rounds, experiment.stop_at_accuracy)
    log.info(
        "final test acc %.4f, best %.4f, %s: %g (%s)",
        history.final_acc,
        history.best_acc,
        objective_name(experiment.stop_at_accuracy),
        score,
        history_file,
    )
    return score


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base=None)
def _hydra_main(cfg: DictConfig) -> float:
    with config_errors_exit(PROGRAM, CONFIG_ERRORS):
        return train_job(cfg)


class Interrupted(BaseException):
    """SIGINT or SIGTERM: unwinds like Ctrl-C, so every process of the run is stopped."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _interrupt(signum: int, frame: object) -> None:
    raise Interrupted(signum)


def main() -> None:
    """Console script entry point. SIGINT/SIGTERM stop the run's processes (the checkpoint of the
    last completed version stays) and exit 130/143 with one line, not a traceback."""
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    register_schemas()
    try:
        run_cli(_hydra_main, PROGRAM, CONFIG_ERRORS)
    except Interrupted as stop:
        # further signals while the last line is written must not print a traceback either
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        print(
            f"fedserve-train: stopped by {stop} (the last completed version's checkpoint is kept)",
            file=sys.stderr,
            flush=True,
        )
        sys.exit(128 + stop.signum)


if __name__ == "__main__":
    main()
