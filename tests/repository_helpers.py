"""Shared by the model-repository tests: a tiny ONNX model, publishing it, hashing a tree."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from serving.repository import ModelRepository
from serving.tensor_spec import TensorSpec

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
