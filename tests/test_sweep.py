"""Sweeps: each job's objective, the end-of-sweep summary, and an Optuna search end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf
from process_marker import wait_until_marked_gone
from runs import run_train

from server.config_loader import CONF_DIR, register_schemas
from server.history import History, HistoryEntry
from server.sweep import check_direction, objective, objective_direction, summarize_sweep
from task.config import ConfigError


def _history(accs: list[float]) -> History:
    return History(
        [
            HistoryEntry(v + 1, v + 1, test_loss=1.0 - a, test_acc=a, seconds=1.0)
            for v, a in enumerate(accs)
        ]
    )


def _job(
    sweep: Path, index: int, overrides: str, accs: list[float], target: float | None = None
) -> None:
    job = sweep / str(index)
    job.mkdir(parents=True)
    (job / "overrides.txt").write_text(overrides)
    (job / "history.json").write_text(json.dumps(_history(accs).to_dict()))
    (job / "config.json").write_text(json.dumps({"rounds": 3, "stop_at_accuracy": target}))


def test_summary_table_and_plot(tmp_path: Path) -> None:
    for index, (strategy, accs) in enumerate(
        [("fedavg", [0.5, 0.8, 0.7]), ("fedadam", [0.6, 0.9, 0.95])]
    ):
        _job(tmp_path, index, f"strategy={strategy} rounds=3", accs)
    _job(tmp_path, 10, "strategy=fedbuff rounds=3", [0.4])  # job 10 sorts after job 2, not 1

    text = summarize_sweep(tmp_path)

    lines = text.splitlines()
    assert lines[2] == "| 0 | strategy=fedavg | 3 | 0.7000 | 0.8000 |"
    assert lines[3] == "| 1 | strategy=fedadam | 3 | 0.9500 | 0.9500 |"
    assert lines[4] == "| 2 | strategy=fedbuff | 1 | 0.4000 | 0.4000 |"
    assert lines[-1] == "Best: job 1 (strategy=fedadam): final test acc 0.9500"
    assert (tmp_path / "summary.md").read_text().strip() == text
    assert (tmp_path / "summary.png").stat().st_size > 10_000


def test_summary_ranks_by_rounds_to_target_and_shortens_trial_values(tmp_path: Path) -> None:
    _job(tmp_path, 0, "train.lr=0.13291125735654793 rounds=3", [0.5, 0.92, 0.95], target=0.9)
    _job(tmp_path, 1, "train.lr=0.01 rounds=3", [0.3, 0.5, 0.6], target=0.9)
    _job(tmp_path, 2, "train.lr=0.3 rounds=3", [0.91], target=0.9)

    lines = summarize_sweep(tmp_path).splitlines()

    assert lines[0].endswith("| rounds to target |")
    assert lines[2] == "| 0 | train.lr=0.1329 | 3 | 0.9500 | 0.9500 | 2 |"
    assert lines[3] == "| 1 | train.lr=0.01 | 3 | 0.6000 | 0.6000 | not reached (4.300) |"
    assert lines[4] == "| 2 | train.lr=0.3 | 1 | 0.9100 | 0.9100 | 1 |"
    assert lines[-1] == "Best: job 2 (train.lr=0.3): rounds to 0.9 1"


def test_objective_and_its_direction() -> None:
    assert objective(_history([0.5, 0.8, 0.7]), 3, None) == pytest.approx(0.7)
    assert objective_direction(None) == "maximize"
    assert objective_direction(0.9) == "minimize"
    reached_last = objective(_history([0.5, 0.6, 0.91]), 3, 0.9)
    close_miss = objective(_history([0.5, 0.89, 0.8]), 3, 0.9)
    far_miss = objective(_history([0.1, 0.2, 0.3]), 3, 0.9)
    assert reached_last == 3
    # any job reaching the target beats every miss; of two misses the closer is better
    assert reached_last < close_miss < far_miss
    assert close_miss == pytest.approx(4.01)


def test_a_sweeper_optimising_the_wrong_way_is_refused() -> None:
    optuna = {"_target_": "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"}
    check_direction({**optuna, "direction": "maximize"}, None)
    check_direction({**optuna, "direction": "minimize"}, 0.9)
    check_direction({"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"}, 0.9)
    with pytest.raises(ConfigError, match="pass hydra.sweeper.direction=minimize"):
        check_direction({**optuna, "direction": "maximize"}, 0.9)


@pytest.mark.parametrize(
    ("extra", "direction"), [([], "maximize"), (["stop_at_accuracy=0.8"], "minimize")]
)
def test_the_search_config_follows_the_objective(extra: list[str], direction: str) -> None:
    register_schemas()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose("config", overrides=["search=optimizer", *extra], return_hydra_config=True)
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper")
    assert sweeper.direction == direction
    params = OmegaConf.to_container(sweeper.params)
    for key in ("strategy.server_lr", "strategy.momentum", "strategy.beta1", "strategy.beta2"):
        assert key in params
    assert {"train.lr", "train.local_epochs"} <= set(params)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            [
                "hydra/sweeper=optuna",
                "hydra.sweeper.direction=maximize",
                "strategy.server_lrr=interval(0.1, 1)",
            ],
            "unknown config key 'strategy.server_lrr'; allowed there: name, implementation",
        ),
        (
            ["search=optimizer", "hydra.sweeper.direction=maximize", "stop_at_accuracy=0.9"],
            "hydra.sweeper.direction=maximize but this job's objective is the rounds to 0.9",
        ),
    ],
)
def test_a_bad_search_stops_before_any_trial_trains(
    tmp_path: Path, overrides: list[str], expected: str, process_marker: str
) -> None:
    result = run_train(["-m", *overrides, f"hydra.sweep.dir={tmp_path}"], tmp_path, 120)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if "fedserve-train:" in line]
    assert len(errors) == 1 and expected in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not list(tmp_path.glob("*/history.json"))
    assert wait_until_marked_gone(process_marker) == []


@pytest.mark.slow
def test_an_optuna_search_runs_and_its_summary_names_the_best_trial(
    tmp_path: Path, process_marker: str
) -> None:
    sweep = tmp_path / "sweep"
    result = run_train(
        [
            "-m",
            "search=optimizer",
            "hydra.sweeper.n_trials=2",
            "rounds=1",
            "num_clients=2",
            "model=mlp",
            "repository=null",
            f"hydra.sweep.dir={sweep}",
        ],
        tmp_path,
        600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    accs = [
        json.loads((sweep / str(i) / "history.json").read_text())["final_test_acc"] for i in (0, 1)
    ]
    best = max(range(2), key=lambda i: accs[i])
    results = OmegaConf.load(sweep / "optimization_results.yaml")
    assert results["best_value"] == pytest.approx(accs[best])  # Optuna maximised the accuracy
    # every trial drew its own values from the search space
    trials = [(sweep / str(i) / "overrides.txt").read_text() for i in (0, 1)]
    assert trials[0] != trials[1] and all("strategy.server_lr=" in t for t in trials)
    summary = (sweep / "summary.md").read_text().strip().splitlines()
    assert summary[-1].startswith(f"Best: job {best} (")
    assert summary[-1].endswith(f"final test acc {accs[best]:.4f}")
    assert (sweep / "summary.png").exists()
    assert wait_until_marked_gone(process_marker) == []
