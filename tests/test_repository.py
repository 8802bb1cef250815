"""The model repository: layout, metadata, versions that only grow, names, retention with leases,
external data (no torch here). Integrity under failures: test_repository_integrity.py."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from repository_helpers import CLASSES, FEATURES, ROOT, make_onnx, publish, snapshot

from serving.errors import RepositoryError
from serving.layout import DATA_FILE, MODEL_FILE
from serving.onnx_specs import specs_from_onnx
from serving.repository import ModelRepository
from serving.tensor_spec import TensorSpec


@pytest.fixture
def repo(tmp_path: Path) -> ModelRepository:
    return ModelRepository(tmp_path / "repo")


def test_publish_writes_triton_layout_and_metadata(repo: ModelRepository, tmp_path: Path) -> None:
    assert repo.list_models() == [] and repo.latest("tiny") is None
    version = publish(repo, tmp_path, seed=0, test_acc=0.75)
    assert version == 1
    mdir = repo.root / "tiny"
    assert (mdir / "config.pbtxt").is_file()
    vdir = mdir / "1"
    assert sorted(p.name for p in vdir.iterdir()) == ["metadata.json", "model.onnx"]
    meta = json.loads((vdir / "metadata.json").read_text())
    expected_keys = {"version", "global_version", "round", "metrics", "files", "inputs", "outputs"}
    assert expected_keys | {"opset", "config", "created"} <= set(meta)
    assert meta["version"] == 1 and meta["round"] == 0 and meta["metrics"] == {"test_acc": 0.75}
    assert meta["opset"] == 18 and meta["config"] == {"s": 0}
    assert meta["files"] == {
        "model.onnx": hashlib.sha256((vdir / MODEL_FILE).read_bytes()).hexdigest()
    }
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, FEATURES]}]
    assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, CLASSES]}]
    assert repo.list_models() == ["tiny"] and repo.list_versions("tiny") == [1]
    assert repo.load_metadata("tiny", 1) == meta
    assert repo.model_path("tiny", 1) == vdir / MODEL_FILE
    repo.verify("tiny", 1)
    # onnxruntime runs the published file and gives the model's numbers
    w, b = make_onnx(tmp_path / "ref.onnx", 0)
    x = np.random.default_rng(1).standard_normal((5, FEATURES)).astype(np.float32)
    sess = ort.InferenceSession(str(repo.model_path("tiny", 1)), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(None, {"input": x})[0], x @ w + b, rtol=1e-5, atol=1e-6)
    assert not [p for p in mdir.iterdir() if p.name.startswith(".tmp-")]


def test_specs_default_to_graph_and_must_agree(repo: ModelRepository, tmp_path: Path) -> None:
    src = tmp_path / "m.onnx"
    make_onnx(src)
    inputs, outputs = specs_from_onnx(src)
    assert inputs == [TensorSpec("input", "FP32", [-1, FEATURES])]
    assert outputs == [TensorSpec("logits", "FP32", [-1, CLASSES])]
    assert repo.publish("m", src, max_batch_size=4) == 1
    before = snapshot(repo.root)
    bad = [
        ([TensorSpec("x", "FP32", [-1, FEATURES])], "names"),
        ([TensorSpec("input", "INT64", [-1, FEATURES])], "datatype"),
        ([TensorSpec("input", "FP32", [-1, FEATURES + 1])], "shape"),
    ]
    for inputs_, word in bad:
        with pytest.raises(RepositoryError, match=word):
            repo.publish("m", src, inputs=inputs_, max_batch_size=4)
    fixed = tmp_path / "fixed.onnx"
    make_onnx(fixed, batch=2)
    with pytest.raises(RepositoryError, match="dynamic batch"):
        repo.publish("m", fixed, max_batch_size=4)
    assert snapshot(repo.root) == before and repo.list_versions("m") == [1]
    with pytest.raises(RepositoryError, match="datatype"):
        TensorSpec("t", "float32", [1])


def test_versions_only_grow(repo: ModelRepository, tmp_path: Path) -> None:
    assert [publish(repo, tmp_path, seed=s) for s in range(3)] == [1, 2, 3]
    # even when the newest directories vanish, their numbers are never handed out again
    import shutil

    shutil.rmtree(repo.root / "tiny" / "3")
    shutil.rmtree(repo.root / "tiny" / "2")
    assert repo.list_versions("tiny") == [1]
    assert publish(repo, tmp_path, seed=9) == 4
    assert repo.apply_retention("tiny", keep_last=1) == [1]
    assert publish(repo, tmp_path, seed=10) == 5


def test_concurrent_publishers_get_distinct_versions(repo: ModelRepository, tmp_path: Path) -> None:
    versions: list[int] = []
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            for j in range(2):
                versions.append(publish(ModelRepository(repo.root), tmp_path, seed=10 * k + j))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(versions) == list(range(1, 9))
    assert repo.list_versions("tiny") == list(range(1, 9))
    for v in versions:
        repo.verify("tiny", v)


@pytest.mark.parametrize(
    "name",
    [
        "a/b",
        "..",
        "a..b",
        "has space",
        "x" * 65,
        "",
        ".hidden",
        "-dash",
        "../escape",
        "ü",
        None,
        "clf\n",  # '$' matches before a trailing newline: the name passed
    ],
)
def test_bad_model_names_are_refused(repo: ModelRepository, tmp_path: Path, name) -> None:
    src = tmp_path / "m.onnx"
    make_onnx(src)
    with pytest.raises(RepositoryError) as info:
        repo.publish(name, src, max_batch_size=4)
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    assert repr(name) in message and "A-Za-z0-9" in message and "'..'" in message
    assert not repo.root.exists() or list(repo.root.iterdir()) == []
    with pytest.raises(RepositoryError):
        repo.list_versions(name)


def test_names_ending_in_a_newline_are_no_models_and_no_versions(
    repo: ModelRepository, tmp_path: Path
) -> None:
    """A directory 'tiny\n' was listed as a model, and a version directory '2\n' as version 2
    (int('2\n') is 2) whose files lie under '2', so its load failed: both are now ignored, as
    any other directory that is not a model or a version."""
    publish(repo, tmp_path)
    shutil.copytree(repo.root / "tiny" / "1", repo.root / "tiny" / "2\n")
    shutil.copytree(repo.root / "tiny", repo.root / "tiny\n")
    assert repo.list_models() == ["tiny"]
    assert repo.list_versions("tiny") == [1]


def test_good_model_names(repo: ModelRepository, tmp_path: Path) -> None:
    for name in ["a", "Model_1.v2-x", "x" * 64, "9lives"]:
        assert publish(repo, tmp_path, name=name) == 1
    assert repo.list_models() == sorted(["a", "Model_1.v2-x", "x" * 64, "9lives"])


def test_repository_path_that_is_a_file(tmp_path: Path) -> None:
    path = tmp_path / "not-a-dir"
    path.write_text("hello")
    with pytest.raises(RepositoryError, match="is a file"):
        ModelRepository(path)
    assert path.read_text() == "hello"


def test_retention_keeps_newest_best_and_leased(repo: ModelRepository, tmp_path: Path) -> None:
    accs = [0.1, 0.9, 0.3, 0.4, 0.5, 0.6]
    for seed, acc in enumerate(accs):
        publish(repo, tmp_path, seed=seed, test_acc=acc, test_loss=1 - acc)
    assert repo.best("tiny", "test_acc") == 2
    assert repo.best("tiny", "test_loss", mode="min") == 2
    assert repo.best("tiny", "nope") is None
    lease = repo.mark_in_use("tiny", 1)
    assert repo.leased_versions("tiny") == {1}
    assert repo.apply_retention("tiny", keep_last=2, keep_best_metric="test_acc") == [3, 4]
    assert repo.list_versions("tiny") == [1, 2, 5, 6]
    repo.release("tiny", 1, lease)
    assert repo.leased_versions("tiny") == set()
    assert repo.apply_retention("tiny", keep_last=2, keep_best_metric="test_acc") == [1]
    assert repo.apply_retention("tiny", keep_last=1) == [2, 5]
    assert repo.list_versions("tiny") == [6]
    repo.verify("tiny", 6)
    assert not [p for p in (repo.root / "tiny").iterdir() if p.name.startswith(".tmp-")]
    with pytest.raises(RepositoryError, match="keep_last"):
        repo.apply_retention("tiny", keep_last=0)
    with pytest.raises(RepositoryError, match="does not exist"):
        repo.mark_in_use("tiny", 3)


def test_lease_context_and_dead_process_leases(repo: ModelRepository, tmp_path: Path) -> None:
    for seed in range(4):
        publish(repo, tmp_path, seed=seed)
    with repo.in_use("tiny", 1):
        assert repo.apply_retention("tiny", keep_last=2) == [2]
    # a reader that dies without releasing its lease does not pin a version forever
    script = (
        "import sys; from serving.repository import ModelRepository as M; "
        "M(sys.argv[1]).mark_in_use('tiny', 1)"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-c", script, str(repo.root)], check=True, cwd=ROOT, env=env)
    leases = [p for p in repo.root.iterdir() if p.name.startswith(".lease-")]
    assert len(leases) == 1 and json.loads(leases[0].read_text())["versions"] == {"tiny": [1]}
    assert repo.leased_versions("tiny") == set()
    assert repo.apply_retention("tiny", keep_last=2) == [1]
    assert not leases[0].exists()  # dead lease cleaned
    assert not (repo.root / "tiny" / ".in_use").exists()  # nothing inside the model dir


def test_external_data_publish(repo: ModelRepository, tmp_path: Path) -> None:
    src = tmp_path / "ext" / "big.onnx"
    w, b = make_onnx(src, seed=3, external_location="weights.bin")
    with pytest.raises(RepositoryError, match="external_data"):
        repo.publish("ext", src, max_batch_size=8)
    version = repo.publish(
        "ext", src, external_data=src.parent / "weights.bin", max_batch_size=8, metadata={}
    )
    vdir = repo.version_dir("ext", version)
    assert sorted(p.name for p in vdir.iterdir()) == ["metadata.json", MODEL_FILE, DATA_FILE]
    assert set(repo.load_metadata("ext", version)["files"]) == {MODEL_FILE, DATA_FILE}
    repo.verify("ext", version)
    x = np.ones((2, FEATURES), np.float32)
    sess = ort.InferenceSession(
        str(repo.model_path("ext", version)), providers=["CPUExecutionProvider"]
    )
    np.testing.assert_allclose(sess.run(None, {"input": x})[0], x @ w + b, rtol=1e-5, atol=1e-6)
    data = bytearray((vdir / DATA_FILE).read_bytes())
    data[0] ^= 0xFF
    (vdir / DATA_FILE).write_bytes(bytes(data))
    with pytest.raises(RepositoryError, match=r"checksum mismatch .*model\.onnx\.data"):
        repo.verify("ext", version)


def test_list_models_ignores_junk(repo: ModelRepository, tmp_path: Path) -> None:
    publish(repo, tmp_path, name="good")
    (repo.root / "empty").mkdir()
    (repo.root / "bad name").mkdir()
    (repo.root / "file.txt").write_text("x")
    (repo.root / "good" / "007").mkdir()
    (repo.root / "good" / "notaversion").mkdir()
    assert repo.list_models() == ["good"]
    assert repo.list_versions("good") == [1]


def test_serving_does_not_import_torch() -> None:
    code = (
        "import sys, serving, serving.repository, serving.model_config; "
        "bad = [m for m in ('torch', 'flwr') if m in sys.modules]; "
        "assert not bad, bad"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env=env)


def test_publish_refuses_a_misspelt_or_missing_option(tmp_path: Path) -> None:
    """Both repository kinds take their options through one typed dict; a typo must still fail
    as a misspelt keyword argument does, not be ignored."""
    onnx_file = tmp_path / "m.onnx"
    make_onnx(onnx_file)
    repo = ModelRepository(tmp_path / "repo")
    with pytest.raises(TypeError, match="max_batch_sise"):
        repo.publish("m", onnx_file, max_batch_size=8, max_batch_sise=8)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="max_batch_size"):
        repo.publish("m", onnx_file)  # type: ignore[call-arg]
    assert repo.publish("m", onnx_file, max_batch_size=8) == 1
