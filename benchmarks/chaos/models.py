"""Tiny ONNX models for the chaos rows, built with ``onnx.helper`` (no torch), and publishing them.

* :func:`classifier`: ``logits = x @ W + b``, ``x: FP32[batch, 4]`` (``b`` shifted by 10 x seed,
  so an answer shows which version gave it);
* :func:`poison`: ``y = x * W`` with ``W`` of shape [4] and ``x: FP32[batch, -1]``: onnxruntime
  broadcasts widths 1 and 4 and fails (``Fail``, not ``InvalidArgument``) on any other, so a
  request of width 3 is a poison input that passes the signature check;
* :func:`slow`: ``x @ W @ W ...`` (100 MatMul nodes, ``W`` the 512 x 512 identity) with
  ``x: FP32[1, rows, 512]``: the run time grows with ``rows`` (2,000 rows: ~10 s on one thread), a
  model slower than any ``run_timeout_s`` on demand, made of many nodes as real models are (an
  onnxruntime run can be stopped between nodes, not inside one).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from serving.repository import ModelRepository
from serving.tensor_spec import TensorSpec

SLOW_WIDTH, SLOW_DEPTH = 512, 100


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def classifier(path: Path, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((4, 3)).astype(np.float32)
    b = (rng.standard_normal(3) + 10.0 * seed).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["m"]),
            helper.make_node("Add", ["m", "B"], ["logits"]),
        ],
        "classifier",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")],
    )
    return _save(graph, path)


def poison(path: Path) -> Path:
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "W"], ["y"])],
        "poison",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "width"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "width"])],
        [numpy_helper.from_array(np.full(4, 2.0, np.float32), "W")],
    )
    return _save(graph, path)


def slow(path: Path, width: int = SLOW_WIDTH, depth: int = SLOW_DEPTH) -> Path:
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", [f"h{i}" if i else "x", "W"], [f"h{i + 1}"])
            for i in range(depth)
        ]
        + [helper.make_node("Identity", [f"h{depth}"], ["y"])],
        "slow",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "rows", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "rows", width])],
        [numpy_helper.from_array(np.eye(width, dtype=np.float32), "W")],
    )
    return _save(graph, path)


def publish(repo: ModelRepository, kind: str, name: str, seed: int = 1) -> int:
    """Publish one model of ``kind`` (classifier | poison | slow) as the next version of
    ``name``; returns the version."""
    with tempfile.TemporaryDirectory(prefix="fedserve-chaos-") as tmp:
        path = Path(tmp, "model.onnx")
        if kind == "classifier":
            classifier(path, seed)
            specs = ([TensorSpec("x", "FP32", [-1, 4])], [TensorSpec("logits", "FP32", [-1, 3])])
            batch = 64
        elif kind == "poison":
            poison(path)
            specs = ([TensorSpec("x", "FP32", [-1, -1])], [TensorSpec("y", "FP32", [-1, -1])])
            batch = 64
        elif kind == "slow":
            slow(path)
            specs = (
                [TensorSpec("x", "FP32", [1, -1, SLOW_WIDTH])],
                [TensorSpec("y", "FP32", [1, -1, SLOW_WIDTH])],
            )
            batch = 0
        else:
            raise ValueError(f"unknown chaos model kind {kind!r}")
        return repo.publish(
            name,
            path,
            inputs=specs[0],
            outputs=specs[1],
            metadata={"round": seed, "seed": seed},
            max_batch_size=batch,
        )
