"""Emulated device speeds for sync-vs-async experiments (config group ``heterogeneity``).

A simulated client's ``train`` does ``work`` seconds of compute here: its thread's CPU time on a
CPU device (what the training used, not the time it waited for a core while other simulated
clients ran), its wall time on a GPU. The emulated device takes

    T = work · device_factor · (slow_factor if the client is slow else 1)

and the client sleeps ``T − elapsed`` (when positive) before it replies. ``slow_factor`` makes a
seeded, fixed ``round(slow_fraction · n)`` of the n partitions slower for the whole run;
``device_factor`` > 1 makes every device slower than this machine's cores, so that the simulated
clients mostly sleep instead of competing for the CPU and a round's time is the devices' time,
as in a real federation where every client has a device of its own.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from task.config import HeterogeneityConfig


def slow_partitions(cfg: HeterogeneityConfig, num_partitions: int, seed: int) -> set[int]:
    """The partitions that are slow for the whole run (depends only on the config and seed)."""
    count = round(cfg.slow_fraction * num_partitions)
    return set(np.random.default_rng(seed + 7919).permutation(num_partitions)[:count].tolist())


class WorkTimer:
    """Started at construction; ``work_s`` is thread CPU time on CPU and wall time on a GPU."""

    def __init__(self) -> None:
        self.wall0 = time.perf_counter()
        self.cpu0 = time.thread_time()

    def elapsed_s(self) -> float:
        return time.perf_counter() - self.wall0

    def work_s(self, device_type: str) -> float:
        if device_type == "cpu":
            return time.thread_time() - self.cpu0
        return self.elapsed_s()


def device_seconds(cfg: HeterogeneityConfig, slow: bool, work_s: float) -> float:
    """``T`` above: how long the emulated device takes for ``work_s`` seconds of work here."""
    return work_s * cfg.device_factor * (cfg.slow_factor if slow else 1.0)


def pad_to_device_time(
    cfg: HeterogeneityConfig,
    slow: bool,
    timer: WorkTimer,
    device_type: str,
    sleep: Callable[[float], None] = time.sleep,
) -> float:
    """Sleep until the emulated device would be done; returns the seconds slept (0 if none)."""
    remaining = device_seconds(cfg, slow, timer.work_s(device_type)) - timer.elapsed_s()
    if remaining <= 0:
        return 0.0
    sleep(remaining)
    return remaining
