"""The scheduler-center benchmark (issue 15): many model versions under one budget, Zipf load whose
hot set moves, static-equal vs LRU-only vs ours. Run ``python -m benchmarks.scheduler.bench``."""
