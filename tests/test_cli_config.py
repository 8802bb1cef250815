"""Both command-line apps refuse a bad key or value before anything starts, in one line."""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from serving_helpers import publish_classifier

from server.launcher import FLWR_ENV
from server.processes import free_port
from serving.repository import ModelRepository

BIN = Path(sys.executable).parent


def _run(program: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / program), *args],
        cwd=cwd,
        env={**os.environ, **FLWR_ENV},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("rounds=abc", "rounds=abc"),
        ("rounds=2.5", "key rounds, expected int"),
        ("resume=no", "resume=no: expected a bool (true or false)"),
        ("export.enabled=no", "export.enabled=no: expected a bool"),
        ("+strategy.bogus=1", "unknown config key 'strategy.bogus'; allowed there: name"),
    ],
)
def test_fedserve_train_names_the_key_and_the_type_in_one_line(
    tmp_path: Path, override: str, needle: str
) -> None:
    result = _run("fedserve-train", [override, f"hydra.run.dir={tmp_path}"], tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("fedserve-train: invalid configuration: ")
    assert needle in lines[0]
    assert not (tmp_path / "history.json").exists()


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("serving.bogus=1", "unknown config key 'serving.bogus'; allowed there: instances"),
        ("+serving.bogus=1", "unknown config key 'serving.bogus'"),
        ("port=http", "key port, expected int"),
        ("serving.warmup=no", "serving.warmup=no: expected a bool"),
        ("serving.policy=fastest", "serving.policy must be least_loaded or round_robin"),
        ("serving.load=lazy", "serving.load must be eager or on_demand, got 'lazy'"),
        ("serving.pin=[a:x]", "serving.pin entries are 'model' or 'model:version', got 'a:x'"),
        ("serving.budget.memory_fraction=2", "serving.budget.memory_fraction must be in (0, 1]"),
        ("serving.budget.rebalance_s=inf", "serving.budget.rebalance_s must be a finite number"),
        ("serving.frontends=0", "serving.frontends must be >= 1 (1: no front-end processes)"),
        ("serving.grpc_port=8000", "serving.grpc_port and port are both 8000"),
    ],
)
def test_fedserve_serve_rejects_unknown_keys_and_bad_values_in_one_line(
    tmp_path: Path, override: str, needle: str
) -> None:
    (tmp_path / "repo").mkdir()
    result = _run("fedserve-serve", [f"repository={tmp_path / 'repo'}", override], tmp_path)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert needle in lines[0]


@pytest.mark.parametrize(
    "key",
    [
        "load_timeout_s",
        "max_queue_delay_ms",
        "inline_max_ms",
        "run_timeout_s",
        "poll_interval_s",
        "drain_timeout_s",
        "keep_alive_timeout_s",
        "header_timeout_s",
        "store.poll_s",
        "store.retry_max_s",
        "budget.rebalance_s",
    ],
)
@pytest.mark.parametrize("value", [math.inf, math.nan, 1e300])
def test_every_duration_must_be_one_a_thread_can_wait_for(key: str, value: float) -> None:
    """``serving.budget.rebalance_s=inf`` passed ``> 0`` and the rebalancer thread died on
    ``Event.wait(inf)`` (OverflowError); ``drain_timeout_s=inf`` failed the start with a
    traceback, ``poll_interval_s=inf`` killed the repository watcher. Each duration key now
    refuses a value no wait can take, naming the key."""
    from serving.config_schema import ConfigError
    from serving.settings import ServingConfig

    settings = ServingConfig()
    *parents, leaf = key.split(".")
    target = settings
    for part in parents:
        target = getattr(target, part)
    setattr(target, leaf, value)
    with pytest.raises(ConfigError, match=f"serving.{key} must be "):
        settings.validate()


def test_pins_are_counted_as_the_versions_they_keep_and_read_as_ascii_digits() -> None:
    """serving.pin=[a, a] (or [a, a:1]) with serving.budget.engines=1 was refused as "2
    versions resident ... pin fewer"; a pin 'a:²' passed (str.isdigit) and failed the start
    with int()'s traceback."""
    from serving.config_schema import ConfigError
    from serving.settings import BudgetConfig, ServingConfig

    for pins in (["a", "a"], ["a", "a:1"], ["a:1", "a:01"]):
        ServingConfig(pin=pins, budget=BudgetConfig(engines=1)).validate()
    with pytest.raises(ConfigError, match="keeps 2 versions resident"):
        ServingConfig(pin=["a:1", "a:2"], budget=BudgetConfig(engines=1)).validate()
    with pytest.raises(ConfigError, match="entries are 'model' or 'model:version', got 'a:²'"):
        ServingConfig(pin=["a:²"]).validate()


def test_fedserve_serve_defaults_come_from_the_schema(tmp_path: Path) -> None:
    from serving.settings import ServeConfig, ServingConfig

    assert ServingConfig().poll_interval_s == 0.05  # the cli and the yaml used to disagree
    assert "serving" not in (
        Path(__file__).resolve().parents[1] / "conf" / "serve.yaml"
    ).read_text().split("defaults:")[1].split("_self_")[0].replace("serve_schema", "")
    assert ServeConfig().serving == ServingConfig()


def test_fedserve_serve_refuses_a_budget_the_pins_do_not_fit(tmp_path: Path) -> None:
    """At config time when the engine budget is given; at start when only the loads tell (the
    pinned version's files alone exceed the memory budget); one line, exit 2, no lease left."""
    repo = ModelRepository(tmp_path / "repo")
    for name in ("a", "b", "c"):
        publish_classifier(repo, tmp_path, name=name)
    cases = [
        (
            ["serving.instances=2", "serving.budget.engines=4", "serving.pin=[a,b,c]"],
            "serving.pin keeps 3 versions resident, each with >= 2 engine(s), but "
            "serving.budget.engines=4",
        ),
        (
            ["serving.budget.memory_bytes=100", "serving.pin=[a]"],
            "pinned version a:1 cannot be loaded: version 1 of model 'a' needs at least",
        ),
    ]
    for overrides, needle in cases:
        result = _run(
            "fedserve-serve", [f"repository={repo.root}", "log_level=warning", *overrides], tmp_path
        )
        assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and needle in lines[0], result.stderr
        assert "serving.budget.memory_bytes=100" in lines[0] or "engines=4" in lines[0]
    assert all(repo.leased_versions(name) == set() for name in ("a", "b", "c"))


@pytest.mark.parametrize("frontends", [1, 2])
@pytest.mark.parametrize("front_end", ["http", "grpc"])
def test_fedserve_serve_names_a_port_in_use_in_one_line(
    tmp_path: Path, front_end: str, frontends: int
) -> None:
    """It printed uvicorn's or our OSError's whole traceback and exited 1. With front-end
    processes the ports are bound with SO_REUSEPORT, which joins a socket bound so by the same
    user instead of failing: the port held here that way must still be refused."""
    (tmp_path / "repo").mkdir()
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        http, grpc = (busy, free_port()) if front_end == "http" else (free_port(), busy)
        ports = [f"port={http}", f"serving.grpc_port={grpc}", f"serving.frontends={frontends}"]
        result = _run("fedserve-serve", [f"repository={tmp_path / 'repo'}", *ports], tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-2000:]
    assert "Traceback" not in output, output[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    key = {"http": "port=<a free port>", "grpc": "serving.grpc_port=<a free port>"}[front_end]
    assert last.startswith("fedserve-serve: invalid configuration: cannot listen for")
    assert f"127.0.0.1:{busy}" in last and key in last
