"""The benchmark's models: random-weight ``cnn``/``resnet18`` exported into a model repository,
and the binary KServe v2 request bodies sent to them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from bench_config import BATCHES, MODELS


def export_models(repo_dir: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """Exports each model of ``names`` (seed 0, max batch 64) through ``server/export.py`` into a
    repository at ``repo_dir``; returns per model its ONNX path, input shape, parameter count and
    input/output tensor names."""
    import torch

    from server.export import export_and_publish
    from serving.repository import ModelRepository
    from task.config import ExportConfig
    from task.models import build_model

    repo = ModelRepository(repo_dir)
    info = {}
    for name in names:
        shape, classes = MODELS[name]
        torch.manual_seed(0)
        model = build_model(name, shape, classes)
        params = sum(p.numel() for p in model.parameters())
        res = export_and_publish(
            model,
            torch.randn(8, *shape),
            repo,
            name,
            {"round": 0, "metrics": {}},
            ExportConfig(max_batch_size=64, keep_last=1, keep_best=False),
        )
        meta = repo.load_metadata(name, res.version)
        info[name] = {
            "path": str(repo.model_path(name, res.version)),
            "shape": shape,
            "params": params,
            "input": meta["inputs"][0]["name"],
            "output": meta["outputs"][0]["name"],
        }
    return info


def binary_body(x: np.ndarray, input_name: str, output_name: str) -> tuple[bytes, int]:
    """A binary-tensor KServe v2 request (what tritonclient sends) and its JSON header length."""
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": input_name,
                    "datatype": "FP32",
                    "shape": list(x.shape),
                    "parameters": {"binary_data_size": x.nbytes},
                }
            ],
            "outputs": [{"name": output_name, "parameters": {"binary_data": True}}],
        },
        separators=(",", ":"),
    ).encode()
    return header + x.tobytes(), len(header)


def bodies_for(info: dict[str, Any]) -> dict[int, tuple[bytes, int]]:
    """Per batch size of ``BATCHES``: a request body of random rows (seeded by the batch size)
    for the model ``info`` describes, and its header length."""
    out = {}
    for rows in BATCHES:
        x = np.random.default_rng(rows).standard_normal((rows, *info["shape"]))
        out[rows] = binary_body(x.astype(np.float32), info["input"], info["output"])
    return out
