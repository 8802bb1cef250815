"""Constants shared by the serving benchmark's modules (:mod:`benchmarks.serving.bench`)."""

from __future__ import annotations

#: model name -> (input shape without the batch axis, number of classes)
MODELS: dict[str, tuple[tuple[int, int, int], int]] = {
    "cnn": ((1, 28, 28), 10),
    "resnet18": ((3, 32, 32), 10),
}
SECTIONS = ("http", "interop", "ray", "policy", "dispatch")
#: closed-loop client connections of every HTTP load
CONNECTIONS = 32
#: rows per request of every HTTP load
BATCHES = (1, 64)
