"""conf/ composes into the typed config; bad values stop the run with a message naming them."""

from __future__ import annotations

import tomllib
from dataclasses import asdict, fields
from pathlib import Path

import pytest
import yaml

from server.config import ExperimentConfig
from server.config_loader import compose_experiment, parse_overrides
from server.export import ExportConfig
from server.strategy.config import StrategyConfig
from task.config import DatasetConfig, ModelConfig, PartitionConfig, TaskConfig

ROOT = Path(__file__).resolve().parents[1]
GROUPS = {
    "dataset": DatasetConfig,
    "partition": PartitionConfig,
    "model": ModelConfig,
    "strategy": StrategyConfig,
    "export": ExportConfig,
}


def test_default_composition_is_the_digits_demo() -> None:
    cfg = compose_experiment([])
    assert (cfg.dataset.name, cfg.partition.name, cfg.model.name) == ("digits", "iid", "cnn")
    assert (cfg.num_clients, cfg.rounds, cfg.strategy.name) == (10, 5, "fedavg")


@pytest.mark.parametrize("group", sorted(GROUPS))
def test_group_options_hold_only_what_differs_from_the_schema(group: str) -> None:
    """The schema (the dataclass) holds every key and default; an option states its differences,
    so a default is written once and any override works with any option (sweeps need it)."""
    defaults = asdict(GROUPS[group]())
    for path in sorted((ROOT / "conf" / group).glob("*.yaml")):
        for key, value in (yaml.safe_load(path.read_text()) or {}).items():
            assert key in defaults, f"{path.name}: {key} is not in the schema"
            if key != "name" and value != "???":
                assert value != defaults[key], f"{path.name}: {key}={value!r} is the default"


def test_any_key_overrides_with_any_option() -> None:
    cfg = compose_experiment(["strategy=fedadam", "strategy.buffer_size=7", "dataset=synthetic"])
    assert (cfg.strategy.optimizer, cfg.strategy.buffer_size) == ("adam", 7)
    assert cfg.dataset.test_fraction == 0.2  # from the schema, not written in synthetic.yaml


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "rounds=abc",
            "Value 'abc' of type 'str' could not be converted to Integer "
            "(key rounds, expected int)",
        ),
        ("rounds=2.5", "Value '2.5' of type 'float' could not be converted to Integer (key rounds"),
        ("resume=no", "resume=no: expected a bool (true or false)"),
        ("export.enabled=no", "export.enabled=no: expected a bool (true or false)"),
        (
            "strategy.server_lr=fast",
            "could not be converted to Float (key strategy.server_lr, expected float)",
        ),
        ("train.learning_rate=0.1", "unknown config key 'train.learning_rate'; allowed there"),
        (
            "+train.learning_rate=0.1",
            "unknown config key 'train.learning_rate'; allowed there: local_epochs",
        ),
    ],
)
def test_a_wrongly_typed_or_unknown_override_is_one_line_naming_it(
    override: str, message: str
) -> None:
    with pytest.raises(ValueError) as err:
        compose_experiment([override])
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_true_and_false_are_booleans() -> None:
    assert compose_experiment(["resume=true"]).resume is True
    assert compose_experiment(["export.enabled=false"]).export.enabled is False


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


def test_clients_rebuild_the_task_from_its_sections_only() -> None:
    cfg = compose_experiment(["strategy=fedadam", "train.lr=0.2"])
    task = TaskConfig.from_dict(cfg.task_dict())
    assert set(cfg.task_dict()) == {f.name for f in fields(TaskConfig)}
    assert task.train.lr == 0.2 and not hasattr(task, "strategy")


def test_overrides_travel_as_json_or_shell_words() -> None:
    assert parse_overrides('["a=1", "b=x y"]') == ["a=1", "b=x y"]
    assert parse_overrides("a=1 'b=x y'") == ["a=1", "b=x y"]
    assert parse_overrides("  ") == []


def test_flower_run_config_declares_the_keys_the_server_app_reads() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    app = pyproject["tool"]["flwr"]["app"]
    assert app["components"] == {"serverapp": "server.app:app", "clientapp": "client.app:app"}
    assert set(app["config"]) == {"overrides", "output-dir"}
