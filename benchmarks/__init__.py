"""Benchmarks by concern, each a module run from the repository root with ``python -m``:
``benchmarks.training`` (rounds and time to a target accuracy), ``benchmarks.aggregation``
(server memory and aggregation throughput), ``benchmarks.serving`` (the HTTP server against the
hardware, a no-op endpoint and Ray Serve; train->serve latency) and ``benchmarks.gpu`` (what runs
on CUDA). What they share is in :mod:`benchmarks.common`; results go to ``benchmarks/results/``.
See ``benchmarks/README.md``. Nothing outside ``benchmarks`` imports it.
"""
