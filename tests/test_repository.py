"""The model repository: layout, metadata, versions that only grow, atomic publish under a crash,
retention with leases, verification, and refusals that change nothing (no torch here)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from serving import repository as repository_module
from serving.repository import (
    DATA_FILE,
    MODEL_FILE,
    ModelRepository,
    RepositoryError,
    TensorSpec,
    specs_from_onnx,
)

ROOT = Path(__file__).resolve().parents[1]
FEATURES, CLASSES = 4, 3


def make_onnx(
    path: Path,
    seed: int = 0,
    *,
    external_location: str | None = None,
    batch: str | int = "batch",
) -> tuple[np.ndarray, np.ndarray]:
    """``logits = input @ W + b`` (FP32[batch, 4] -> FP32[batch, 3]); returns (W, b)."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((FEATURES, CLASSES)).astype(np.float32)
    b = rng.standard_normal(CLASSES).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["input", "W"], ["mm"]),
            helper.make_node("Add", ["mm", "b"], ["logits"]),
        ],
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, FEATURES])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, CLASSES])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    path.parent.mkdir(parents=True, exist_ok=True)
    if external_location is None:
        onnx.save(model, str(path))
    else:
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=external_location,
            size_threshold=0,
        )
    return w, b


def publish(repo: ModelRepository, tmp: Path, name: str = "tiny", seed: int = 0, **meta) -> int:
    src = tmp / f"src-{name}-{seed}-{time.monotonic_ns()}.onnx"
    make_onnx(src, seed)
    return repo.publish(
        name,
        src,
        inputs=[TensorSpec("input", "FP32", [-1, FEATURES])],
        outputs=[TensorSpec("logits", "FP32", [-1, CLASSES])],
        metadata={"round": seed, "global_version": seed, "metrics": meta, "config": {"s": seed}},
        max_batch_size=8,
    )


def snapshot(root: Path) -> dict[str, str]:
    """Every published file under root with its sha256 (dot-entries excluded)."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if path.is_file() and not any(part.startswith(".") for part in rel.parts):
            out[str(rel)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


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
    ["a/b", "..", "a..b", "has space", "x" * 65, "", ".hidden", "-dash", "../escape", "ü", None],
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


def test_verify_catches_flipped_byte(repo: ModelRepository, tmp_path: Path) -> None:
    publish(repo, tmp_path, seed=0)
    publish(repo, tmp_path, seed=1)
    path = repo.model_path("tiny", 2)
    expected = repo.load_metadata("tiny", 2)["files"]["model.onnx"]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    actual = hashlib.sha256(bytes(data)).hexdigest()
    with pytest.raises(RepositoryError) as info:
        repo.verify("tiny", 2)
    message = str(info.value)
    assert "checksum mismatch" in message and str(path) in message
    assert expected in message and actual in message
    repo.verify("tiny", 1)  # the other version is untouched


def test_version_dir_without_its_files(repo: ModelRepository, tmp_path: Path) -> None:
    publish(repo, tmp_path, seed=0)
    publish(repo, tmp_path, seed=1)
    publish(repo, tmp_path, seed=2)
    (repo.version_dir("tiny", 2) / MODEL_FILE).unlink()
    with pytest.raises(RepositoryError, match=r"missing model\.onnx"):
        repo.verify("tiny", 2)
    (repo.version_dir("tiny", 3) / "metadata.json").unlink()
    with pytest.raises(RepositoryError, match=r"no metadata\.json"):
        repo.verify("tiny", 3)
    assert repo.list_versions("tiny") == [1]  # only complete versions are listed
    with pytest.raises(RepositoryError, match="does not exist"):
        repo.verify("tiny", 7)
    repo.verify("tiny", 1)
    assert publish(repo, tmp_path, seed=3) == 4  # numbers of broken dirs are not reused


def test_onnx_checker_runs_in_verify(repo: ModelRepository, tmp_path: Path) -> None:
    publish(repo, tmp_path)
    vdir = repo.version_dir("tiny", 1)
    proto = onnx.load(str(vdir / MODEL_FILE))
    proto.graph.node[0].op_type = "NoSuchOp"
    (vdir / MODEL_FILE).write_bytes(proto.SerializeToString())
    meta = json.loads((vdir / "metadata.json").read_text())
    meta["files"]["model.onnx"] = hashlib.sha256((vdir / MODEL_FILE).read_bytes()).hexdigest()
    (vdir / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(RepositoryError, match="onnx checker"):
        repo.verify("tiny", 1)


def test_failed_publish_cleans_up_and_changes_nothing(
    repo: ModelRepository, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    publish(repo, tmp_path, seed=0)
    before = snapshot(repo.root)

    def boom(src: Path, dst: Path) -> None:
        raise OSError("disk on fire")

    monkeypatch.setattr(repository_module, "_rename_into_place", boom)
    with pytest.raises(OSError, match="disk on fire"):
        publish(repo, tmp_path, seed=1)
    monkeypatch.undo()
    assert repo.list_versions("tiny") == [1]
    assert not [p for p in (repo.root / "tiny").iterdir() if p.name.startswith(".tmp-")]
    assert snapshot(repo.root) == before
    assert publish(repo, tmp_path, seed=2) == 2


CRASH_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from serving import repository as r

    root, src, marker = sys.argv[1:4]

    def stall(tmp, dst):
        Path(marker).write_text(str(tmp))
        time.sleep(120)

    r._rename_into_place = stall
    r.ModelRepository(root).publish("tiny", Path(src), max_batch_size=8,
                                    metadata={"metrics": {"test_acc": 0.99}})
    """
)


def test_crash_between_write_and_rename(repo: ModelRepository, tmp_path: Path) -> None:
    assert [publish(repo, tmp_path, seed=s) for s in range(2)] == [1, 2]
    before = snapshot(repo.root)
    src = tmp_path / "crash.onnx"
    make_onnx(src, seed=5)
    marker = tmp_path / "stalled"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", CRASH_SCRIPT, str(repo.root), str(src), str(marker)],
        cwd=ROOT,
        env=env,
    )
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert proc.poll() is None, "publisher exited before reaching the rename"
            assert time.monotonic() < deadline, "publisher never reached the rename"
            time.sleep(0.02)
        # the new version is fully written, not yet renamed: a reader sees the old versions only
        tmp_dir = Path(marker.read_text())
        assert tmp_dir.name.startswith(".tmp-") and (tmp_dir / "metadata.json").is_file()
        assert repo.list_versions("tiny") == [1, 2]
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=10) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    fresh = ModelRepository(repo.root)
    assert fresh.list_models() == ["tiny"] and fresh.list_versions("tiny") == [1, 2]
    for v in (1, 2):
        fresh.verify("tiny", v)
    assert fresh.latest("tiny") == 2
    assert fresh.best("tiny", "test_acc") is None  # the crashed version's metrics are invisible
    assert snapshot(repo.root) == before
    assert tmp_dir.exists()  # only the temp dir is left behind ...
    assert fresh.read_config("tiny")["name"] == "tiny"
    assert publish(fresh, tmp_path, seed=3) == 3  # ... and the next publish removes it
    assert not tmp_dir.exists()
    assert not [p for p in (repo.root / "tiny").iterdir() if p.name.startswith(".tmp-")]
    for v in (1, 2, 3):
        fresh.verify("tiny", v)


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
    assert len(list((repo.root / "tiny" / ".in_use").iterdir())) == 1
    assert repo.leased_versions("tiny") == set()
    assert repo.apply_retention("tiny", keep_last=2) == [1]
    assert list((repo.root / "tiny" / ".in_use").iterdir()) == []  # dead lease cleaned


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
