"""Resume checks everything before anything starts: checksums, the config against the run's,
``resume_allow_changes``, a missing checkpoint; repository versions follow the global version."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from fake_grid import FakeGrid
from process_marker import wait_until_marked_gone
from repository_helpers import make_onnx
from runs import run_train
from test_early_stop import NODES, _scripted_experiment, weights_or_delta_client

import server.experiment as experiment
from server.checkpoint import CHECKPOINT_NAME, CheckpointError, load_checkpoint, save_checkpoint
from server.config import ExperimentConfig
from server.resume import ResumeError, check_resume
from serving.errors import RepositoryError
from serving.repository import ModelRepository
from serving.store_repository import open_repository
from task.config import ConfigError

ADAM = {"name": "fedadam", "optimizer": "adam", "server_lr": 0.05}

pytestmark = pytest.mark.usefixtures("flower_task_identity")


# ------------------------------------------------------------------ checksums
def _state() -> dict:
    rng = np.random.default_rng(0)
    return {
        "arrays": {"w": rng.standard_normal((64, 32)).astype(np.float32)},
        "version": 3,
        "history": {"rounds": [{"test_acc": 0.5}]},
    }


def test_a_truncated_checkpoint_is_refused_in_one_line(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / CHECKPOINT_NAME, _state())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(CheckpointError, match="cannot be read \\(truncated") as refused:
        load_checkpoint(path)
    assert "\n" not in str(refused.value)


def test_four_flipped_bytes_in_a_weight_are_refused(tmp_path: Path) -> None:
    """torch.load reads such a file without complaint: only the checksum notices."""
    state = _state()
    path = save_checkpoint(tmp_path / CHECKPOINT_NAME, state)
    data = bytearray(path.read_bytes())
    # torch.save pickles bytes (protocol 2) as their latin-1 text, UTF-8 encoded: find the
    # weight's bytes in that form and flip 4 ASCII ones (the pickle stays valid)
    encoded = state["arrays"]["w"].tobytes().decode("latin-1").encode("utf-8")
    start = data.find(encoded)
    assert start >= 0
    at = next(i for i in range(start + 1000, start + len(encoded)) if max(data[i : i + 4]) < 128)
    data[at : at + 4] = bytes(b ^ 1 for b in data[at : at + 4])
    path.write_bytes(bytes(data))
    import torch

    assert torch.load(path, weights_only=False)["version"] == 3  # loads "fine"
    with pytest.raises(CheckpointError, match="is corrupt: its content does not match its sha256"):
        load_checkpoint(path)


def test_an_intact_checkpoint_loads_without_its_checksum_key(tmp_path: Path) -> None:
    state = _state()
    loaded = load_checkpoint(save_checkpoint(tmp_path / CHECKPOINT_NAME, state))
    assert loaded is not None and set(loaded) == set(state)
    assert loaded["arrays"]["w"].tobytes() == state["arrays"]["w"].tobytes()


# ------------------------------------------------------------------ the config
def _cfg(tmp_path: Path, **values: object) -> ExperimentConfig:
    base = {
        "rounds": 4,
        "num_clients": len(NODES),
        "output_dir": str(tmp_path),
        "repository": None,
        "device": "cpu",
        "dataset": {"name": "synthetic", "num_samples": 200},
        "model": {"name": "mlp"},
        "strategy": {**ADAM, "round_timeout_s": 30.0},
        "resume": True,
    }
    for key, value in values.items():
        section, _, leaf = key.partition("__")
        if leaf:
            base[section] = {**base.get(section, {}), leaf: value}  # type: ignore[dict-item]
        else:
            base[key] = value
    return ExperimentConfig.from_dict(base)


@pytest.fixture
def two_versions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A run of two versions (fedadam, server_lr 0.05) in ``tmp_path / "run"``."""
    run = tmp_path / "run"
    _scripted_experiment(run, monkeypatch, rounds=2, strategy=ADAM)
    return run


def test_resume_without_a_checkpoint_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ResumeError, match="resume=true but there is no checkpoint at"):
        check_resume(_cfg(tmp_path), tmp_path)


def test_run_experiment_with_resume_and_no_checkpoint_starts_nothing(tmp_path: Path) -> None:
    """It used to warn and start from scratch, overwriting the directory's config.json."""
    (tmp_path / "config.json").write_text("{}")
    grid = FakeGrid(dict(NODES), weights_or_delta_client)
    with pytest.raises(ResumeError, match="no checkpoint"):
        experiment.run_experiment(grid, _cfg(tmp_path))
    assert not grid.log and (tmp_path / "config.json").read_text() == "{}"


def test_fedserve_train_refuses_a_resume_before_anything_starts(
    tmp_path: Path, process_marker: str
) -> None:
    """The check runs before the SuperLink and Ray start (25-35 s each time otherwise)."""
    (tmp_path / "config.json").write_text("{}")
    result = run_train(["resume=true", "model=mlp", f"hydra.run.dir={tmp_path}"], tmp_path, 120)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-2000:]
    assert "resume=true but there is no checkpoint at" in output and "Traceback" not in output
    assert "running:" not in output  # the launcher never got to `flwr run`
    assert (tmp_path / "config.json").read_text() == "{}"
    assert wait_until_marked_gone(process_marker) == []


def test_fedserve_train_compares_only_the_experiment_with_the_checkpoint(
    two_versions: Path, process_marker: str
) -> None:
    """fedserve-train's launcher-only ``simulation`` section is in no checkpoint: it was reported
    as a change ("simulation.client_cpus=None (now 1)") on every resume."""
    fixed = ["dataset.name=synthetic", "model=mlp", "strategy=fedadam"]
    result = run_train(["resume=true", *fixed, f"hydra.run.dir={two_versions}"], two_versions, 120)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-2000:]
    assert "the config differs from the run in" in output, output[-2000:]
    assert "strategy.server_lr=0.05" in output and "simulation" not in output
    assert wait_until_marked_gone(process_marker) == []


def test_the_same_config_with_more_rounds_resumes(two_versions: Path) -> None:
    checkpoint = check_resume(_cfg(two_versions, rounds=9, stop_at_accuracy=0.99), two_versions)
    assert checkpoint is not None and checkpoint["version"] == 2


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"strategy__server_lr": 0.1}, "strategy.server_lr=0.05 (now 0.1)"),
        ({"strategy__beta2": 0.9}, "strategy.beta2=0.99 (now 0.9)"),
        ({"seed": 3}, "seed=0 (now 3)"),
        ({"num_clients": 5}, "num_clients=4 (now 5)"),
        ({"partition__name": "dirichlet"}, "partition.name='iid' (now 'dirichlet')"),
        ({"train__lr": 0.1}, "train.lr=0.05 (now 0.1)"),
        ({"dataset__num_samples": 300}, "dataset.num_samples=200 (now 300)"),
    ],
)
def test_a_changed_hyper_parameter_is_refused_unless_allowed(
    two_versions: Path, change: dict, named: str
) -> None:
    (two_versions / "config.json").write_text("the run's")
    with pytest.raises(ResumeError) as refused:
        check_resume(_cfg(two_versions, **change), two_versions)
    message = str(refused.value)
    assert named in message and "\n" not in message
    key = named.split("=")[0]
    assert f"'resume_allow_changes=[{key}]'" in message
    assert (two_versions / "config.json").read_text() == "the run's"  # checks write nothing
    allowed = _cfg(two_versions, resume_allow_changes=[key], **change)
    assert check_resume(allowed, two_versions) is not None
    section = _cfg(two_versions, resume_allow_changes=[key.split(".")[0]], **change)
    assert check_resume(section, two_versions) is not None  # a section allows its keys


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"model__name": "cnn"}, "model.name='mlp' (now 'cnn')"),
        ({"strategy__optimizer": "yogi"}, "strategy.optimizer='adam' (now 'yogi')"),
    ],
)
def test_another_model_or_optimizer_can_never_resume(
    two_versions: Path, change: dict, named: str
) -> None:
    with pytest.raises(ResumeError, match="resume cannot change that") as refused:
        check_resume(_cfg(two_versions, **change), two_versions)
    assert named in str(refused.value)
    key = named.split("=")[0]
    with pytest.raises(ConfigError, match=f"resume_allow_changes cannot allow {key}"):
        check_resume(_cfg(two_versions, resume_allow_changes=[key], **change), two_versions)


def test_an_unknown_allowed_key_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="resume_allow_changes names 'strategy.sever_lr'"):
        check_resume(_cfg(tmp_path, resume_allow_changes=["strategy.sever_lr"]), tmp_path)


def test_a_damaged_checkpoint_is_refused_before_the_run(two_versions: Path) -> None:
    path = two_versions / CHECKPOINT_NAME
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ResumeError, match="cannot be read"):
        check_resume(_cfg(two_versions), two_versions)


# ------------------------------------------------------------------ repository versions
def _exporting(run: Path, repo: Path, monkeypatch: pytest.MonkeyPatch, rounds: int, resume: bool):  # type: ignore[no-untyped-def]
    from server.central_evaluation import CentralEvaluator

    monkeypatch.setattr(CentralEvaluator, "__call__", lambda self, a: (1.0, 0.5))
    cfg = _cfg(run, rounds=rounds, resume=resume, repository=str(repo))
    grid = FakeGrid(dict(NODES), weights_or_delta_client, latency=lambda p, i, m: 0.0)
    return experiment.run_experiment(grid, cfg)


def _published(repo: Path) -> dict[int, int]:
    """repository version -> the global version it holds"""
    repository = ModelRepository(repo)
    return {
        v: repository.load_metadata("fedserve", v)["global_version"]
        for v in repository.list_versions("fedserve")
    }


def test_a_resumed_run_never_republishes_nor_goes_backwards(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The trainer dies after publishing version 3 but before checkpointing it: the resumed
    run remakes global version 3 from checkpoint 2, and must not publish it again under 4."""
    run, repo = tmp_path / "run", tmp_path / "repo"
    _exporting(run, repo, monkeypatch, rounds=2, resume=False)
    assert _published(repo) == {1: 1, 2: 2}
    kept = tmp_path / "checkpoint-2.pt"
    shutil.copy(run / CHECKPOINT_NAME, kept)
    _exporting(run, repo, monkeypatch, rounds=3, resume=True)
    shutil.copy(kept, run / CHECKPOINT_NAME)  # version 3 published, its checkpoint lost
    result = _exporting(run, repo, monkeypatch, rounds=4, resume=True)
    assert _published(repo) == {1: 1, 2: 2, 3: 3, 4: 4}
    exported = {e.version: e.exported_version for e in result.history.entries}
    assert exported == {1: 1, 2: 2, 3: None, 4: 4}
    history = json.loads((run / "history.json").read_text())
    assert [e["version"] for e in history["rounds"]] == [1, 2, 3, 4]


def test_a_fresh_run_numbers_on_from_the_repositorys_newest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = tmp_path / "repo"
    _exporting(tmp_path / "a", repo, monkeypatch, rounds=2, resume=False)
    _exporting(tmp_path / "b", repo, monkeypatch, rounds=2, resume=False)
    assert _published(repo) == {1: 1, 2: 2, 3: 1, 4: 2}
    saved = load_checkpoint(tmp_path / "b" / CHECKPOINT_NAME)
    assert saved is not None and saved["publish"]["base"] == 2


@pytest.mark.parametrize("kind", ["directory", "store"])
def test_publishing_as_a_given_version_only_goes_up(tmp_path: Path, kind: str) -> None:
    """The ``version=`` of both repository kinds: a number at or below one the model ever had
    is refused, whatever retention deleted since."""
    import uuid

    location = tmp_path / "repo" if kind == "directory" else f"memory://r-{uuid.uuid4().hex}/repo"
    repo = open_repository(location)
    src = tmp_path / "m.onnx"
    make_onnx(src)
    assert repo.publish("m", src, max_batch_size=4, version=3) == 3
    assert repo.publish("m", src, max_batch_size=4) == 4
    for stale in (2, 4):
        with pytest.raises(RepositoryError, match=f"version {stale}: version 4 or higher"):
            repo.publish("m", src, max_batch_size=4, version=stale)
    assert repo.publish("m", src, max_batch_size=4, version=9) == 9
    assert repo.list_versions("m") == [3, 4, 9]
