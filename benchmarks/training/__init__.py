"""Training benchmarks, each a series of ``fedserve-train`` jobs (:mod:`benchmarks.training.jobs`):
``strategies`` (rounds to 97%: Flower's FedAvg vs our server optimizers) and ``async_vs_sync``
(time to 97% with slow clients: FedBuff vs sync FedAdam)."""
