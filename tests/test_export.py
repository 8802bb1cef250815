"""torch -> ONNX export: parity for the model zoo at several batch sizes, the parity gate,
external data, export_and_publish into the repository, and the fedserve-export CLI."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from google.protobuf import text_format
from torch import nn

from server.config import ExperimentConfig
from server.export import (
    ExportConfig,
    ExportParityError,
    check_parity,
    export_and_publish,
    export_onnx,
)
from serving.layout import DATA_FILE, MODEL_FILE
from serving.repository import ModelRepository
from task.models import build_model

ATOL = 1e-4
SHAPES = {"mlp": (1, 28, 28), "cnn": (1, 28, 28), "resnet18": (3, 32, 32)}


@pytest.fixture(autouse=True)
def _few_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, tuple[nn.Module, Path]]:
    """One legacy export per model; the resnet is put in train mode with non-trivial BatchNorm
    statistics first, so an export that ignored eval mode would fail parity."""
    out = {}
    torch.set_num_threads(2)
    for name, shape in SHAPES.items():
        torch.manual_seed(0)
        model = build_model(name, shape, 10)
        if name == "resnet18":
            model.train()
            with torch.no_grad():
                model(torch.randn(16, *shape) * 2 + 0.5)  # moves running mean/var
        path = tmp_path_factory.mktemp(name) / "model.onnx"
        was_training = model.training
        info = export_onnx(model, torch.randn(4, *shape), path, opset=18)
        assert info.external_data is None and info.exporter == "legacy"
        assert model.training == was_training, "export must restore the module's mode"
        out[name] = (model, path)
    return out


@pytest.mark.parametrize("name", list(SHAPES))
def test_parity_at_batch_sizes(exported, name: str) -> None:
    model, path = exported[name]
    sess = session(path)
    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == ["input"] and [o.name for o in graph.output] == [
        "logits"
    ]
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch
    model.eval()
    generator = torch.Generator().manual_seed(1)
    for batch in (1, 7, 64):
        x = torch.randn(batch, *SHAPES[name], generator=generator)
        with torch.no_grad():
            expected = model(x).numpy()
        got = sess.run(None, {"input": x.numpy()})[0]
        assert got.shape == (batch, 10)
        diff = float(np.max(np.abs(got - expected)))
        assert diff <= ATOL, f"{name} batch {batch}: max abs diff {diff}"


def test_dynamo_exporter_gives_same_interface(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model("cnn", (1, 28, 28), 10)
    path = tmp_path / "model.onnx"
    info = export_onnx(model, torch.randn(3, 1, 28, 28), path, opset=18, exporter="dynamo")
    assert [s.to_dict() for s in info.inputs] == [
        {"name": "input", "datatype": "FP32", "shape": [-1, 1, 28, 28]}
    ]
    assert [s.to_dict() for s in info.outputs] == [
        {"name": "logits", "datatype": "FP32", "shape": [-1, 10]}
    ]
    x = torch.randn(7, 1, 28, 28)
    assert check_parity(model, path, x, atol=ATOL) <= ATOL


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_batchnorm_model_is_exported_in_eval_mode(tmp_path: Path, exporter: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)
    )
    model.train()
    with torch.no_grad():
        model(torch.randn(32, 1, 8, 8) * 3 + 1)  # running stats far from batch stats
    repo = ModelRepository(tmp_path / "repo")
    x = torch.randn(9, 1, 8, 8)
    result = export_and_publish(model, x, repo, "bn", {}, ExportConfig(), exporter=exporter)
    assert model.training, "export must put the module back in train mode"
    got = session(repo.model_path("bn", result.version)).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        train_out = copy.deepcopy(model)(x).numpy()  # a train-mode forward moves the stats
        eval_out = model.eval()(x).numpy()
    assert np.max(np.abs(got - eval_out)) <= ATOL < np.max(np.abs(got - train_out))


class ShiftsAfterExport(nn.Module):
    """Adds a Python counter to the logits: tracing bakes in one value, later calls differ."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.fc(x) + float(self.calls)


def test_parity_failure_publishes_nothing(tmp_path: Path) -> None:
    repo = ModelRepository(tmp_path / "repo")
    good = nn.Sequential(nn.Linear(4, 3))
    cfg = ExportConfig(max_batch_size=8)
    first = export_and_publish(good, torch.randn(5, 4), repo, "m", {"metrics": {}}, cfg)
    assert first.version == 1
    before = sorted(str(p.relative_to(repo.root)) for p in repo.root.rglob("*"))
    with pytest.raises(ExportParityError) as info:
        export_and_publish(ShiftsAfterExport(), torch.randn(5, 4), repo, "m", {}, cfg)
    err = info.value
    assert err.max_abs_diff >= 1.0 and err.atol == cfg.atol
    assert f"{err.max_abs_diff:.3g}" in str(err) and "0.0001" in str(err)
    assert sorted(str(p.relative_to(repo.root)) for p in repo.root.rglob("*")) == before
    assert repo.list_versions("m") == [1]
    repo.verify("m", 1)


def test_export_and_publish_cnn(tmp_path: Path) -> None:
    mc = pytest.importorskip("tritonclient.grpc.model_config_pb2")
    repo = ModelRepository(tmp_path / "repo")
    torch.manual_seed(0)
    model = build_model("cnn", (1, 28, 28), 10)
    test_batch = torch.randn(64, 1, 28, 28)
    cfg = ExportConfig(keep_last=2, max_batch_size=32)
    results = []
    for k, acc in enumerate([0.9, 0.2, 0.3]):
        meta = {"global_version": k + 1, "round": k + 1, "metrics": {"test_acc": acc}, "config": {}}
        results.append(export_and_publish(model, test_batch, repo, "digits", meta, cfg))
    assert [r.version for r in results] == [1, 2, 3]
    assert results[-1].removed_versions == []  # 1 is the best, 2 and 3 the newest two
    assert all(r.max_abs_diff <= ATOL for r in results)
    assert set(results[0].seconds) == {"export", "check", "publish", "total"}
    meta = repo.load_metadata("digits", 3)
    assert meta["export"]["exporter"] == "legacy" and meta["export"]["max_abs_diff"] <= ATOL
    assert meta["opset"] == 18 and meta["metrics"] == {"test_acc": 0.3}
    repo.verify("digits", 3)
    config = text_format.Parse(
        (repo.root / "digits" / "config.pbtxt").read_text(), mc.ModelConfig()
    )
    graph = onnx.load(str(repo.model_path("digits", 3))).graph
    assert config.max_batch_size == 32
    assert [t.name for t in config.input] == [i.name for i in graph.input] == ["input"]
    assert [t.name for t in config.output] == [o.name for o in graph.output] == ["logits"]
    assert list(config.input[0].dims) == [1, 28, 28] and list(config.output[0].dims) == [10]
    assert mc.DataType.Name(config.input[0].data_type) == "TYPE_FP32"
    # a fourth version: retention drops 2 (not best, not among the newest two)
    meta4 = {"metrics": {"test_acc": 0.5}}
    assert export_and_publish(model, test_batch, repo, "digits", meta4, cfg).removed_versions == [2]
    assert repo.list_versions("digits") == [1, 3, 4]


def test_external_data_over_threshold(tmp_path: Path) -> None:
    repo = ModelRepository(tmp_path / "repo")
    torch.manual_seed(0)
    model = build_model("mlp", (1, 28, 28), 10)  # ~0.7 MB of weights
    x = torch.randn(16, 1, 28, 28)
    result = export_and_publish(
        model, x, repo, "big", {}, ExportConfig(), external_data_threshold_bytes=100_000
    )
    assert result.external_data and result.max_abs_diff <= ATOL
    vdir = repo.version_dir("big", result.version)
    assert sorted(p.name for p in vdir.iterdir()) == ["metadata.json", MODEL_FILE, DATA_FILE]
    assert (vdir / MODEL_FILE).stat().st_size < 100_000 < (vdir / DATA_FILE).stat().st_size
    assert set(repo.load_metadata("big", result.version)["files"]) == {MODEL_FILE, DATA_FILE}
    repo.verify("big", result.version)
    got = session(repo.model_path("big", result.version)).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        assert np.max(np.abs(got - model(x).numpy())) <= ATOL


def test_fedserve_export_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from server.export_cli import main
    from task.data import load_dataset
    from task.params import get_arrays

    cfg = ExperimentConfig.from_dict({"model": {"name": "cnn"}, "export": {"model_name": "cli"}})
    data = load_dataset(cfg.dataset, cfg.seed)
    torch.manual_seed(0)
    model = build_model("cnn", data.input_shape, data.num_classes)
    history = {"rounds": [{"version": 7, "round": 4, "test_acc": 0.81, "test_loss": 0.6}]}
    checkpoint = tmp_path / "checkpoint.pt"
    state = {"arrays": get_arrays(model), "version": 7, "config": cfg.to_dict(), "history": history}
    torch.save(state, checkpoint)
    repo_dir = tmp_path / "repo"
    assert main(["--checkpoint", str(checkpoint), "--repository", str(repo_dir)]) == 0
    assert "published cli version 1" in capsys.readouterr().out
    repo = ModelRepository(repo_dir)
    meta = repo.load_metadata("cli", 1)
    assert meta["global_version"] == 7 and meta["round"] == 4
    assert meta["metrics"] == {"test_acc": 0.81, "test_loss": 0.6}
    assert meta["config"]["model"]["name"] == "cnn"
    assert meta["inputs"][0]["shape"] == [-1, *data.input_shape]
    repo.verify("cli", 1)

    torch.save({"arrays": {}, "version": 1}, tmp_path / "bad.pt")
    rc = main(["--checkpoint", str(tmp_path / "bad.pt"), "--repository", str(repo_dir)])
    assert rc == 1 and "missing ['config']" in capsys.readouterr().err
    rc = main(
        ["--checkpoint", str(checkpoint), "--repository", str(repo_dir), "--model-name", "a/b"]
    )
    assert rc == 1 and "invalid model name 'a/b'" in capsys.readouterr().err
    assert repo.list_models() == ["cli"] and repo.list_versions("cli") == [1]
    json.dumps(meta)  # metadata is plain JSON
