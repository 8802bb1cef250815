"""Constants shared by the serving benchmark's modules (``benchmarks/serving_bench.py``).

The benchmark's modules are plain scripts' neighbours (``benchmarks/`` is no package): the entry
point puts the repository root and this folder first on ``sys.path`` before importing them.
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

#: model name -> (input shape without the batch axis, number of classes)
MODELS: dict[str, tuple[tuple[int, int, int], int]] = {
    "cnn": ((1, 28, 28), 10),
    "resnet18": ((3, 32, 32), 10),
}
SECTIONS = ("http", "ray", "policy", "dispatch")
#: closed-loop client connections of every HTTP load
CONNECTIONS = 32
#: rows per request of every HTTP load
BATCHES = (1, 64)
#: the KServe v2 binary-tensor extension's header that carries the JSON header's length
HEADER = "Inference-Header-Content-Length"
