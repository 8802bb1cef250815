"""conf/ composes into the typed config; bad values stop the run with a message naming them."""

from __future__ import annotations

import tomllib
from dataclasses import asdict
from pathlib import Path

import pytest
import yaml

from server.config_loader import compose_experiment, parse_overrides
from task.config import (
    DatasetConfig,
    ExperimentConfig,
    ExportConfig,
    PartitionConfig,
    StrategyConfig,
)

ROOT = Path(__file__).resolve().parents[1]
GROUPS = {
    "dataset": DatasetConfig,
    "partition": PartitionConfig,
    "strategy": StrategyConfig,
    "export": ExportConfig,
}


def test_default_composition_is_the_digits_demo() -> None:
    cfg = compose_experiment([])
    assert (cfg.dataset.name, cfg.partition.name, cfg.model.name) == ("digits", "iid", "cnn")
    assert (cfg.num_clients, cfg.rounds, cfg.strategy.name) == (10, 5, "fedavg")


@pytest.mark.parametrize("group", sorted(GROUPS))
def test_every_group_option_lists_every_key(group: str) -> None:
    """So an override such as partition.alpha=0.1 works whatever the option (sweeps need it)."""
    expected = set(asdict(GROUPS[group]()))
    for path in sorted((ROOT / "conf" / group).glob("*.yaml")):
        keys = set(yaml.safe_load(path.read_text()))
        if group == "export" and path.stem == "off":
            continue
        assert keys == expected, f"{path.name}: missing {expected - keys}, extra {keys - expected}"


@pytest.mark.parametrize(
    "name", [p.stem for p in sorted((ROOT / "conf" / "strategy").glob("*.yaml"))]
)
def test_every_strategy_composes(name: str) -> None:
    cfg = compose_experiment([f"strategy={name}"])
    assert cfg.strategy.name == name


def test_sweep_overrides_compose_for_every_partition() -> None:
    for partition in ("iid", "dirichlet", "shards"):
        cfg = compose_experiment([f"partition={partition}", "partition.alpha=0.1"])
        assert cfg.partition.alpha == 0.1


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["partition=dirichlet", "partition.alpha=-1"], "partition.alpha must be > 0, got -1"),
        (["partition=dirichlet", "partition.alpha=0"], "partition.alpha must be > 0, got 0"),
        (["dataset=mnist"], "dataset.root must be set"),
        (["model=vgg"], "Could not find 'model/vgg'"),
        (["partition=pathological"], "Available options in 'partition'"),
        (["rounds=0"], "rounds must be > 0, got 0"),
        (["strategy.optimizer=lamb"], "strategy.optimizer must be one of sgd, adam, yogi, adagrad"),
        (["dataset.name=imagenet"], "dataset.name must be one of digits, mnist"),
    ],
)
def test_bad_values_name_the_key_the_value_and_the_choices(
    overrides: list[str], message: str
) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        compose_experiment(overrides)


def test_unknown_keys_are_errors_not_silently_ignored() -> None:
    with pytest.raises(ValueError, match="unknown config key.*train.learning_rate"):
        ExperimentConfig.from_dict({"train": {"learning_rate": 0.1}})


def test_overrides_travel_as_json_or_shell_words() -> None:
    assert parse_overrides('["a=1", "b=x y"]') == ["a=1", "b=x y"]
    assert parse_overrides("a=1 'b=x y'") == ["a=1", "b=x y"]
    assert parse_overrides("  ") == []


def test_flower_run_config_declares_the_keys_the_server_app_reads() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    app = pyproject["tool"]["flwr"]["app"]
    assert app["components"] == {"serverapp": "server.app:app", "clientapp": "client.app:app"}
    assert set(app["config"]) == {"overrides", "output-dir"}
