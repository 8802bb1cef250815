"""Serving benchmarks: ``bench`` (our KServe v2 server vs raw onnxruntime, a no-op endpoint and
Ray Serve; dispatch policies; dispatcher overhead), ``p99_floor`` (the batch-1 latency floor) and
``train_to_serve`` (from a trained round to the first answer of its version)."""
