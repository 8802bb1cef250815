"""The benchmark's models: random-weight ``cnn``/``resnet18`` exported into a model repository,
and the binary KServe v2 request bodies sent to them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.serving.config import BATCHES, MODELS
from serving.v2_client import encode_request


def export_models(repo_dir: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """Exports each model of ``names`` (seed 0, max batch 64) through ``server/export.py`` into a
    repository at ``repo_dir``; returns per model its ONNX path, input shape, parameter count and
    input/output tensor names."""
    import torch

    from server.export import ExportConfig, export_and_publish
    from serving.repository import ModelRepository
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


def bodies_for(info: dict[str, Any]) -> dict[int, tuple[bytes, int]]:
    """Per batch size of ``BATCHES``: a binary-tensor request body (what tritonclient sends) of
    random rows (seeded by the batch size) for the model ``info`` describes, and its JSON header
    length."""
    out = {}
    for rows in BATCHES:
        x = np.random.default_rng(rows).standard_normal((rows, *info["shape"]))
        body, header_length = encode_request(
            {info["input"]: x.astype(np.float32)}, [info["output"]]
        )
        assert header_length is not None  # binary
        out[rows] = (body, header_length)
    return out
