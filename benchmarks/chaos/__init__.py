"""The chaos benchmark: one reliability table, each row a measured figure under a fault.

    .venv/bin/python -m benchmarks.chaos.run [--soak-minutes 10] [--fuzz-requests 5000]

The serving rows are :mod:`benchmarks.chaos.serving_rows` (tiny ONNX models of
:mod:`benchmarks.chaos.models`, the fuzzer :mod:`benchmarks.chaos.fuzz`); the trainer's rows come
from ``benchmarks.chaos.training`` when it is there. Fast versions of each row are tests
(tests/test_chaos.py).
"""
