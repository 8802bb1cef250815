"""``fedserve-export``: publish a saved training checkpoint as a new ONNX version.

    fedserve-export --checkpoint outputs/run/checkpoint.pt --repository model_repository

The checkpoint (written by ``server.checkpoint``) is a ``torch.load``-able dict with ``arrays``
(name -> numpy array), ``version`` (global version), ``config`` (``ExperimentConfig.to_dict()``)
and ``history``. The model is rebuilt from the config, the arrays loaded, and the first
``--parity-batch`` test samples of the configured dataset serve for the parity check. Exit status
0 on success, 1 when the export is refused (the message says why), 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path
from typing import Any

from server.export import DEFAULT_EXPORTER, EXPORTERS, ExportError, ExportResult

log = logging.getLogger(__name__)


def _metrics_for(history: Any, version: int) -> tuple[dict[str, float], int | None]:
    """Test metrics and round recorded in the checkpoint's history for ``version``."""
    rounds = history.get("rounds", []) if isinstance(history, dict) else []
    for entry in reversed(rounds):
        if isinstance(entry, dict) and entry.get("version") == version:
            metrics = {
                k: entry[k]
                for k in ("test_acc", "test_loss")
                if isinstance(entry.get(k), (int, float))
            }
            return metrics, entry.get("round")
    return {}, None


def export_checkpoint(
    checkpoint: str | Path,
    repository: str | Path | None = None,
    *,
    model_name: str | None = None,
    exporter: str = DEFAULT_EXPORTER,
    parity_batch: int = 64,
    export_overrides: dict[str, Any] | None = None,
) -> tuple[ExportResult, str, str]:
    """Export one checkpoint; returns (result, repository path or store URL, model name)."""
    import torch

    from server.config import ExperimentConfig
    from server.export import export_and_publish
    from serving.store_repository import open_repository
    from task.data import load_dataset
    from task.models import build_model
    from task.params import set_arrays

    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} not found")
    state = torch.load(path, map_location="cpu", weights_only=False)
    missing = [
        k for k in ("arrays", "version", "config") if not isinstance(state, dict) or k not in state
    ]
    if missing:
        have = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{path} is not a fedserve checkpoint: missing {missing}, has {have}")
    cfg = ExperimentConfig.from_dict(state["config"])
    if export_overrides:
        cfg.export = dataclasses.replace(cfg.export, **export_overrides)
        cfg.export.validate()
    root = str(repository if repository is not None else (cfg.repository or "model_repository"))
    name = model_name or cfg.export.model_name
    repo = open_repository(root)

    data = load_dataset(cfg.dataset, cfg.seed)
    model = build_model(cfg.model.name, data.input_shape, data.num_classes)
    set_arrays(model, state["arrays"])
    version = int(state["version"])
    metrics, server_round = _metrics_for(state.get("history"), version)
    if server_round is None:
        server_round = state.get("round")
    metadata = {
        "global_version": version,
        "round": server_round,
        "metrics": metrics,
        "config": cfg.to_dict(),
        "source": {"checkpoint": str(path.resolve())},
    }
    sample = data.test_x[:parity_batch]
    result = export_and_publish(model, sample, repo, name, metadata, cfg.export, exporter=exporter)
    return result, root, name


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedserve-export",
        description="Export a fedserve training checkpoint to ONNX and publish it as the next "
        "version in a Triton-layout model repository (after an onnxruntime parity check).",
    )
    parser.add_argument("--checkpoint", required=True, type=Path, help="checkpoint file")
    parser.add_argument(
        "--repository",
        default=None,
        help="model repository directory or store URL (default: the checkpoint config's)",
    )
    parser.add_argument(
        "--model-name", default=None, help="model name (default: config export.model_name)"
    )
    parser.add_argument("--exporter", choices=EXPORTERS, default=DEFAULT_EXPORTER)
    parser.add_argument("--opset", type=int, default=None, help="override export.opset")
    parser.add_argument("--atol", type=float, default=None, help="override export.atol")
    parser.add_argument(
        "--max-batch-size", type=int, default=None, help="override export.max_batch_size"
    )
    parser.add_argument("--keep-last", type=int, default=None, help="override export.keep_last")
    parser.add_argument(
        "--parity-batch", type=int, default=64, help="test samples for the parity check"
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if args.parity_batch < 1:
        parser.error(f"--parity-batch must be >= 1, got {args.parity_batch}")
    overrides = {
        key: value
        for key, value in (
            ("opset", args.opset),
            ("atol", args.atol),
            ("max_batch_size", args.max_batch_size),
            ("keep_last", args.keep_last),
        )
        if value is not None
    }
    try:
        result, root, name = export_checkpoint(
            args.checkpoint,
            args.repository,
            model_name=args.model_name,
            exporter=args.exporter,
            parity_batch=args.parity_batch,
            export_overrides=overrides,
        )
    except (ExportError, ValueError, FileNotFoundError, OSError) as exc:
        print(f"fedserve-export: error: {exc}", file=sys.stderr)
        return 1
    s = result.seconds
    print(
        f"published {name} version {result.version} to {root} "
        f"(max abs diff {result.max_abs_diff:.2e}; export {s['export']:.2f}s, "
        f"check {s['check']:.2f}s, publish {s['publish']:.2f}s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
