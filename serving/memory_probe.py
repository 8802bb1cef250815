"""What a loaded model costs in memory, measured: host RSS and, on CUDA, device memory in use.

:class:`MemoryProbe` reads both before and after an operation (an engine's session creation, its
warm-up) and reports the growth. What that measures, honestly:

* **Host (CPU).** The process's resident set size (``psutil``), so it counts everything the
  operation touched: the session's copy of the weights, the optimised graph, and the part of
  onnxruntime's CPU arena a warm-up run grew. It is noisy in a serving process, because other
  threads allocate and free meanwhile: a concurrent free hides memory (an under-estimate),
  a concurrent allocation adds some (an over-estimate). Loads are therefore made one at a time
  (:mod:`serving.scheduler`), and the caller takes the larger of the growth and a floor it knows
  (the weights' file size), so the figure errs upwards. The arena never shrinks, so memory freed
  inside it stays counted: again an upper bound.
* **Device (CUDA).** ``cudaMemGetInfo`` of the CUDA runtime onnxruntime loaded: device memory in
  use, by every process on the device. The first session of a process also creates the CUDA
  context (a few hundred MB), which is counted to the first model loaded.

``device_bytes`` is None where no CUDA runtime is loaded.
"""

from __future__ import annotations

import ctypes
import functools
import logging
from dataclasses import dataclass

import psutil

log = logging.getLogger(__name__)

_CUDART_NAMES = ("libcudart.so.12", "libcudart.so.13", "libcudart.so.11.0", "libcudart.so")


@functools.cache
def _cudart() -> ctypes.CDLL | None:
    """The CUDA runtime already loaded in this process (by onnxruntime's CUDA provider), or None.

    ``RTLD_NOLOAD`` finds a loaded library without loading one: a CPU-only process never loads
    CUDA because of this probe."""
    noload = getattr(ctypes, "RTLD_NOLOAD", 4)
    for name in _CUDART_NAMES:
        try:
            return ctypes.CDLL(name, mode=noload | ctypes.RTLD_GLOBAL)
        except OSError:
            continue
    return None


def device_memory() -> tuple[int, int] | None:
    """(used, total) bytes of the current CUDA device, or None without a loaded CUDA runtime."""
    lib = _cudart()
    if lib is None:
        return None
    free, total = ctypes.c_size_t(), ctypes.c_size_t()
    if lib.cudaMemGetInfo(ctypes.byref(free), ctypes.byref(total)) != 0:
        return None
    return total.value - free.value, total.value


def host_rss() -> int:
    """Resident set size of this process, bytes."""
    return int(psutil.Process().memory_info().rss)


def host_available() -> int:
    """Memory the system can still give processes (``MemAvailable``), bytes."""
    return int(psutil.virtual_memory().available)


@dataclass(frozen=True)
class MemorySample:
    host_bytes: int
    device_bytes: int | None

    @classmethod
    def now(cls) -> MemorySample:
        device = device_memory()
        return cls(host_rss(), None if device is None else device[0])

    def growth_since(self, before: MemorySample) -> MemorySample:
        """Bytes grown since ``before`` (never negative)."""
        device = None
        if self.device_bytes is not None and before.device_bytes is not None:
            device = max(0, self.device_bytes - before.device_bytes)
        return MemorySample(max(0, self.host_bytes - before.host_bytes), device)
