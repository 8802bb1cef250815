"""The watcher notices a new version through its cheap change stamp (well before a full poll is
due) and records where the load time went (train->serve latency breakdown); it names, at start,
the models it was asked for that the repository lacks."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
from serving_helpers import publish_classifier

from serving.registry import ModelRegistry
from serving.repository import ModelRepository
from serving.settings import ServingConfig
from serving.watcher import RepositoryWatcher

TIMING_KEYS = {
    "params_at",
    "published_at",
    "detected_at",
    "serving_at",
    "verify_s",
    "gate_s",
    "load_s",
    "warm_s",
    "swap_s",
    # where the scheduler's load waited before it built: a loader thread, room, an engine
    "queued_s",
    "room_s",
    "engine_s",
}


def test_new_version_is_detected_by_the_change_stamp_and_timed(tmp_path: Path) -> None:
    repo = ModelRepository(tmp_path / "repo")
    publish_classifier(repo, tmp_path, seed=1)
    registry = ModelRegistry()
    # full polls only every 60 s: a prompt swap proves the stat-based change check found it
    watcher = RepositoryWatcher(
        repo,
        registry,
        ServingConfig(instances=1, providers="cpu"),
        poll_interval_s=0.02,
        full_poll_s=60.0,
    )
    watcher.start()
    try:
        assert registry.get("clf").version == 1
        time.sleep(0.3)  # past the "changed recently" window of the first publish
        published = time.time()
        publish_classifier(repo, tmp_path, seed=2)
        deadline = time.monotonic() + 10
        while registry.get("clf").version != 2 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert registry.get("clf").version == 2
        assert time.time() - published < 5.0
    finally:
        watcher.stop()
    timing = watcher.timings[("clf", 2)]
    assert set(timing) == TIMING_KEYS
    assert timing["params_at"] is None  # not published by the trainer: no params_at
    assert timing["published_at"] is not None
    assert timing["published_at"] - 0.01 <= timing["detected_at"] <= timing["serving_at"]
    assert timing["detected_at"] - published < 5.0
    assert all(timing[k] >= 0 for k in ("verify_s", "load_s", "warm_s", "swap_s"))


def test_full_poll_still_runs_without_a_root_to_stat(tmp_path: Path) -> None:
    class NoRoot:
        """A repository object without ``root``: every check counts as a change."""

        def __init__(self, inner: ModelRepository) -> None:
            self._inner = inner

        def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
            if name == "root":
                raise AttributeError(name)
            return getattr(self._inner, name)

    inner = ModelRepository(tmp_path / "repo")
    publish_classifier(inner, tmp_path, seed=1)
    registry = ModelRegistry()
    watcher = RepositoryWatcher(
        NoRoot(inner), registry, ServingConfig(instances=1, providers="cpu"), poll_interval_s=0.02
    )
    watcher.start()
    try:
        publish_classifier(inner, tmp_path, seed=2)
        deadline = time.monotonic() + 10
        while registry.get("clf").version != 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert registry.get("clf").version == 2
    finally:
        watcher.stop()


def test_a_model_asked_for_and_absent_is_named_at_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """models=[clf, typo]: the misspelt model was served by nothing, in silence."""
    repo = ModelRepository(tmp_path / "repo")
    publish_classifier(repo, tmp_path, name="clf")
    settings = ServingConfig(providers="cpu", load="on_demand")
    watcher = RepositoryWatcher(
        repo, ModelRegistry(), settings, poll_interval_s=60, models=["clf", "typo"]
    )
    with caplog.at_level(logging.WARNING, logger="serving.watcher"):
        watcher.start()
    try:
        assert "the repository holds no model typo yet (it holds: clf)" in caplog.text
    finally:
        watcher.stop()
