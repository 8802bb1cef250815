"""Emulated device speeds for sync-vs-async experiments (config group ``heterogeneity``).

A simulated client's ``train`` does ``work`` seconds of compute here: its thread's CPU time on a
CPU device (what the training used, not the time it waited for a core while other simulated
clients ran), its wall time on a GPU. The emulated device takes

    T = work · device_factor · (slow_factor if the client is slow else 1)

and the client sleeps ``T − elapsed`` (when positive) before it replies. ``work`` is the local
training only: receiving and loading the global model is not the device's compute, and torch's
first training step in a process (~1.4 s of one-off set-up here, mostly the first optimizer
importing ``torch._dynamo``: 15x a whole local epoch of the cnn on a small partition) is done
beforehand by :func:`warm_up_once`, not multiplied into the first update of every simulated
client. ``slow_factor`` makes a
seeded, fixed ``round(slow_fraction · n)`` of the n partitions slower for the whole run;
``device_factor`` > 1 makes every device slower than this machine's cores, so that the simulated
clients mostly sleep instead of competing for the CPU and a round's time is the devices' time,
as in a real federation where every client has a device of its own.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable

import numpy as np
import torch

from task.config import HeterogeneityConfig

# (model class, device) pairs this process has already run a pass of.
_warmed: set[tuple[str, str]] = set()


def emulated(cfg: HeterogeneityConfig) -> bool:
    """Device times are emulated (some client sleeps): the knobs are not all neutral."""
    return cfg.device_factor != 1.0 or (cfg.slow_fraction > 0 and cfg.slow_factor != 1.0)


def warm_up_once(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> bool:
    """One training step (forward, backward, SGD step) on a throwaway copy of ``model``, once per
    process, model class and device; True when it ran. The model and its gradients are untouched."""
    device = next(model.parameters()).device
    key = (type(model).__name__, str(device))
    if key in _warmed or len(targets) < 2:  # batch norm needs two examples in training mode
        return False
    scratch = copy.deepcopy(model).train()
    # A whole step: the first optimizer built in a process imports torch._dynamo (~1.3 s here).
    optimizer = torch.optim.SGD(scratch.parameters(), lr=0.0, momentum=0.9)
    loss = torch.nn.functional.cross_entropy(scratch(inputs.to(device)), targets.to(device))
    loss.backward()
    optimizer.step()
    _warmed.add(key)
    return True


def slow_partitions(cfg: HeterogeneityConfig, num_partitions: int, seed: int) -> set[int]:
    """The partitions that are slow for the whole run (depends only on the config and seed)."""
    count = round(cfg.slow_fraction * num_partitions)
    return set(np.random.default_rng(seed + 7919).permutation(num_partitions)[:count].tolist())


class WorkTimer:
    """Started at construction; ``work_s`` is thread CPU time on CPU and wall time on a GPU.

    ``wall`` and ``cpu`` are the clocks (``time.perf_counter``, ``time.thread_time``); tests
    script them."""

    def __init__(
        self,
        wall: Callable[[], float] = time.perf_counter,
        cpu: Callable[[], float] = time.thread_time,
    ) -> None:
        self.wall, self.cpu = wall, cpu
        self.wall0 = wall()
        self.cpu0 = cpu()

    def elapsed_s(self) -> float:
        return self.wall() - self.wall0

    def work_s(self, device_type: str) -> float:
        if device_type == "cpu":
            return self.cpu() - self.cpu0
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
