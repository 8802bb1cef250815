"""The model repository's integrity: verify catches a flipped byte, a missing file and an invalid
graph; a publish that fails, or a publisher killed between write and rename, changes nothing that
readers see (no torch here)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import onnx
import pytest
from repository_helpers import ROOT, make_onnx, publish, snapshot

from serving import repository as repository_module
from serving.errors import RepositoryError
from serving.layout import MODEL_FILE
from serving.repository import ModelRepository


@pytest.fixture
def repo(tmp_path: Path) -> ModelRepository:
    return ModelRepository(tmp_path / "repo")


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
    with pytest.raises(RepositoryError, match=r"has no model\.onnx"):
        repo.verify("tiny", 2)
    # without metadata.json a version is a plain Triton version: described by config.pbtxt
    (repo.version_dir("tiny", 3) / "metadata.json").unlink()
    assert repo.list_versions("tiny") == [1, 3]  # a directory without model.onnx is not one
    assert repo.load_metadata("tiny", 3)["source"] == "config"
    repo.verify("tiny", 3)
    with pytest.raises(RepositoryError, match="has no model.onnx"):
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
    assert fresh.read_config("tiny").name == "tiny"
    assert publish(fresh, tmp_path, seed=3) == 3  # ... and the next publish removes it
    assert not tmp_dir.exists()
    assert not [p for p in (repo.root / "tiny").iterdir() if p.name.startswith(".tmp-")]
    for v in (1, 2, 3):
        fresh.verify("tiny", v)
