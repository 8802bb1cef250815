"""Any Triton-layout ONNX repository is served: a repository made by hand (config.pbtxt +
``<v>/model.onnx``, no metadata.json) or with no config at all (Triton's auto-complete from the
graph), verified by onnx's checker; configs that do not describe the graph, other backends and
broken files are refused with a message, and whatever else serves keeps serving."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import json_format
from serving_helpers import CLASSES, IN_FEATURES, classifier_weights, make_classifier
from tritonclient.grpc.model_config_pb2 import ModelConfig

from serving.dataplane import DataPlane
from serving.errors import RepositoryError
from serving.inference import InferRequest
from serving.registry import ModelRegistry
from serving.repository import ModelRepository
from serving.settings import ServingConfig
from serving.watcher import RepositoryWatcher

HAND_CONFIG = """
name: "clf"
backend: "onnxruntime"
max_batch_size: 16
input [ { name: "x" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "logits" data_type: TYPE_FP32 dims: [ 3 ] } ]
instance_group [ { count: 2 kind: KIND_CPU } ]
parameters { key: "intra_op_thread_count" value: { string_value: "1" } }
"""


def hand_made(root: Path, config: str | None, versions: tuple[int, ...] = (1,)) -> Path:
    """``root/clf/{config.pbtxt, <v>/model.onnx}`` as a person lays it out for Triton."""
    mdir = root / "clf"
    mdir.mkdir(parents=True, exist_ok=True)
    if config is not None:
        (mdir / "config.pbtxt").write_text(config)
    for version in versions:
        make_classifier(mdir / str(version) / "model.onnx", seed=version)
    return root


def serve_repo(repo: ModelRepository) -> tuple[RepositoryWatcher, DataPlane]:
    registry = ModelRegistry()
    watcher = RepositoryWatcher(
        repo, registry, ServingConfig(instances=1, providers="cpu"), poll_interval_s=0.05
    )
    watcher.start()
    return watcher, DataPlane(registry, ready=lambda: watcher.ready, configs=repo.version_config)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[ModelRepository, RepositoryWatcher, DataPlane]]:
    repo = ModelRepository(hand_made(tmp_path / "repo", HAND_CONFIG, versions=(1, 2)))
    watcher, dataplane = serve_repo(repo)
    try:
        yield repo, watcher, dataplane
    finally:
        watcher.stop()


def infer(dataplane: DataPlane, x: np.ndarray) -> np.ndarray:
    pool = dataplane.lookup("clf")
    result = asyncio.run(dataplane.infer(pool, InferRequest({"x": x}), None))
    return result.outputs["logits"]


def test_hand_made_repository_is_served(served) -> None:
    repo, watcher, dataplane = served
    assert repo.list_versions("clf") == [1, 2] and not repo.has_metadata("clf", 2)
    meta = repo.load_metadata("clf", 2)
    assert meta["source"] == "config" and meta["max_batch_size"] == 16
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, IN_FEATURES]}]
    assert watcher.failed == {}
    x = np.random.default_rng(0).random((3, IN_FEATURES), dtype=np.float32)
    w, b = classifier_weights(2)  # the newest version answers (Triton's default policy)
    np.testing.assert_allclose(infer(dataplane, x), x @ w + b, rtol=1e-5, atol=1e-5)
    config = json_format.ParseDict(asyncio.run(dataplane.model_config("clf")), ModelConfig())
    assert config.backend == "onnxruntime" and config.max_batch_size == 16
    assert config.parameters["intra_op_thread_count"].string_value == "1"  # the file's own
    assert config.instance_group[0].count == 1  # what runs (serving.instances=1)
    assert repo.leased_versions("clf") == {2}


def test_repository_without_any_config_is_auto_completed(tmp_path: Path) -> None:
    repo = ModelRepository(hand_made(tmp_path / "repo", config=None))
    assert repo.list_models() == ["clf"]
    config = repo.version_config("clf", 1)
    assert config.name == "clf" and config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == 4  # Triton's auto-complete for a graph that can batch
    assert [list(t.dims) for t in config.output] == [[CLASSES]]
    watcher, dataplane = serve_repo(repo)
    try:
        x = np.ones((2, IN_FEATURES), np.float32)
        w, b = classifier_weights(1)
        np.testing.assert_allclose(infer(dataplane, x), x @ w + b, rtol=1e-5, atol=1e-5)
    finally:
        watcher.stop()


def test_config_that_omits_outputs_takes_them_from_the_graph(tmp_path: Path) -> None:
    config = 'max_batch_size: 8 input [ { name: "x" data_type: TYPE_FP32 dims: [ 4 ] } ]'
    repo = ModelRepository(hand_made(tmp_path / "repo", config))
    inputs, outputs = repo.tensor_specs("clf", 1)
    assert [s.shape for s in inputs] == [(-1, IN_FEATURES)]
    assert [(s.name, s.shape) for s in outputs] == [("logits", (-1, CLASSES))]
    repo.verify("clf", 1)


@pytest.mark.parametrize(
    "config, message",
    [
        (HAND_CONFIG.replace("dims: [ 4 ]", "dims: [ 5 ]"), r"input 'x': shape \[-1, 5\]"),
        (HAND_CONFIG.replace("TYPE_FP32 dims: [ 3 ]", "TYPE_INT64 dims: [ 3 ]"), "INT64"),
        (HAND_CONFIG.replace('name: "x"', 'name: "image"'), "input names"),
        (HAND_CONFIG.replace('backend: "onnxruntime"', 'backend: "python"'), "'python'"),
    ],
)
def test_config_that_does_not_describe_the_graph_is_refused(
    tmp_path: Path, config: str, message: str
) -> None:
    repo = ModelRepository(hand_made(tmp_path / "repo", config))
    with pytest.raises(RepositoryError, match=message):
        repo.verify("clf", 1)


def test_broken_versions_are_skipped_and_the_good_one_serves(tmp_path: Path) -> None:
    root = hand_made(tmp_path / "repo", HAND_CONFIG, versions=(1,))
    half = root / "clf" / "2" / "model.onnx"  # a copy cut short
    half.parent.mkdir()
    half.write_bytes((root / "clf" / "1" / "model.onnx").read_bytes()[:50])
    (root / "clf" / "3").mkdir()  # a version directory without model.onnx is not a version
    ensemble = root / "pipeline"
    (ensemble / "1").mkdir(parents=True)
    (ensemble / "config.pbtxt").write_text('name: "pipeline" platform: "ensemble"')
    repo = ModelRepository(root)
    assert repo.list_versions("clf") == [1, 2] and repo.list_versions("pipeline") == []
    with pytest.raises(RepositoryError, match="clf"):
        repo.verify("clf", 2)
    watcher, dataplane = serve_repo(repo)
    try:
        assert ("clf", 2) in watcher.failed
        assert dataplane.lookup("clf").version == 1
        # the copy completes: a good version 4 replaces it
        shutil.copytree(root / "clf" / "1", root / "clf" / "4")
        watcher.poll_once()
        assert dataplane.lookup("clf").version == 4
    finally:
        watcher.stop()
