"""cuDNN's convolution algorithm search vs dynamic batching, on the serving engine's CUDA path.

    python -m benchmarks.gpu.conv_search [--models cnn resnet18] [--cpu-stand-in]

Dynamic batching hands an engine batches of any size from 1 to ``max_batch_size`` (64). With the
CUDA provider's default ``cudnn_conv_algo_search=EXHAUSTIVE`` every new input shape triggers a
benchmark of cuDNN's algorithms for each convolution. For each model and each search mode
(``serving.cudnn_conv_algo_search``) this builds a ``serving.engine.Engine`` as the pool does,
then times

- a first pass over the 64 batch sizes in a shuffled order (every shape new to the engine),
- a second pass in the same order (every shape seen before),
- the steady p50 of one run at batch 1 and at batch 64;

and the same for ``heuristic`` with ``serving.pad_batches`` on (every run padded to 64 rows: one
shape per engine, the default on CUDA).

``--cpu-stand-in`` runs the same on the CPU provider (to exercise the script without a GPU; the
search mode then changes nothing).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from serving.engine import Engine
from serving.providers import CONV_ALGO_SEARCHES

SHAPES = {"cnn": (1, 28, 28), "resnet18": (3, 32, 32)}
MAX_BATCH = 64


def export(name: str, path: Path) -> None:
    import torch

    from server.export import export_onnx
    from task.models import build_model

    torch.manual_seed(0)
    model = build_model(name, SHAPES[name], 10).eval()
    export_onnx(model, torch.randn(2, *SHAPES[name]), path, opset=18)


def p50_ms(engine: Engine, feeds: dict[str, np.ndarray], runs: int = 30) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        engine.run(feeds)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def measure(path: Path, providers: str, search: str, pad: bool) -> dict[str, Any]:
    t0 = time.perf_counter()
    engine = Engine(
        path,
        max_batch_size=MAX_BATCH,
        providers=providers,
        cudnn_conv_algo_search=search,
        pad_batches=pad,
        name=search,
    )
    load = time.perf_counter() - t0
    order = list(range(1, MAX_BATCH + 1))
    np.random.default_rng(0).shuffle(order)
    feeds = {n: engine.signature.example_feeds(n) for n in order}
    passes = []
    for _ in range(2):
        runs = []
        for n in order:
            t = time.perf_counter()
            engine.run(feeds[n])
            runs.append(time.perf_counter() - t)
        passes.append((sum(runs), max(runs)))
    return {
        "load_s": load,
        "first_s": passes[0][0],
        "first_max_ms": passes[0][1] * 1000,
        "second_s": passes[1][0],
        "b1_ms": p50_ms(engine, feeds[1]),
        "b64_ms": p50_ms(engine, feeds[MAX_BATCH]),
        "providers": engine.providers[0].replace("ExecutionProvider", ""),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=sorted(SHAPES), default=list(SHAPES))
    parser.add_argument("--cpu-stand-in", action="store_true")
    args = parser.parse_args(argv)
    providers = "cpu" if args.cpu_stand_in else "cuda"
    header = (
        f"{'model':<9} {'search':<14} {'EP':<5} | {'load+warm s':>11} | "
        f"{'1st pass s':>10} {'max run ms':>10} | {'2nd pass s':>10} | "
        f"{'b1 p50 ms':>9} {'b64 p50 ms':>10}"
    )
    print(f"one engine, batch sizes 1..{MAX_BATCH} each run once per pass (shuffled)")
    print(header)
    print("-" * len(header))
    with tempfile.TemporaryDirectory(prefix="conv-search-") as tmp:
        for name in args.models:
            path = Path(tmp, f"{name}.onnx")
            export(name, path)
            modes = [(search, False) for search in CONV_ALGO_SEARCHES] + [("heuristic", True)]
            for search, pad in modes:
                r = measure(path, providers, search, pad)
                label = f"{search}{'+pad' if pad else ''}"
                print(
                    f"{name:<9} {label:<14} {r['providers']:<5} | {r['load_s']:>11.2f} | "
                    f"{r['first_s']:>10.2f} {r['first_max_ms']:>10.1f} | {r['second_s']:>10.3f} | "
                    f"{r['b1_ms']:>9.2f} {r['b64_ms']:>10.2f}"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
