"""What a loaded model costs in memory, measured: host heap in use and, on CUDA, device memory.

:class:`MemorySample` reads both; the engine takes one before and after its session is created
and after its warm-up, and reports the growth. What that measures, honestly:

* **Host (CPU).** The bytes the process's C heap has in use (glibc ``mallinfo2``: in-use chunks
  plus mmapped chunks), which is where onnxruntime's CPU allocator and its arena put the session's
  weights, its optimised graph and the activations of a run. Unlike the resident set size it does
  not depend on what the allocator kept from earlier frees: measured in fresh processes, RSS growth
  for one ResNet-18 session swung between 75 and 144 MB from one load to the next, while the heap
  grew by 45.1 MB every time (its weights are 44.7 MB). It still counts what other threads
  allocate during the load (an over-estimate: in-flight request buffers, another session's arena
  growing; another load made at the same time), so the scheduler keeps a version's smallest
  measurement (:mod:`serving.scheduler`) and the caller floors the figure at the model files'
  size. What it does not count: the transient copies a session
  creation frees before it returns (the parsed file; they are reused by the next load), and
  memory a library maps itself (ONNX external data is mmapped: the files' size covers it). Where
  ``mallinfo2`` is missing (not glibc >= 2.33) the resident set size is used instead.
* **Device (CUDA).** ``cudaMemGetInfo`` of the CUDA runtime onnxruntime loaded: device memory in
  use, by every process on the device. The first session of a process also creates the CUDA
  context (a few hundred MB), which is counted to the first model loaded.

``device_bytes`` is None where no CUDA runtime is loaded.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable
from dataclasses import dataclass

import psutil

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


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


@functools.cache
def _mallinfo2() -> Callable[[], _MallInfo2] | None:
    try:
        fn = ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = _MallInfo2
    return fn


def host_in_use() -> int:
    """Bytes of the C heap in use (``mallinfo2``: in-use chunks + mmapped chunks), else RSS."""
    fn = _mallinfo2()
    if fn is None:
        return int(psutil.Process().memory_info().rss)
    info = fn()
    return int(info.uordblks + info.hblkhd)


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
        return cls(host_in_use(), None if device is None else device[0])

    def growth_since(self, before: MemorySample) -> MemorySample:
        """Bytes grown since ``before`` (never negative)."""
        device = None
        if self.device_bytes is not None and before.device_bytes is not None:
            device = max(0, self.device_bytes - before.device_bytes)
        return MemorySample(max(0, self.host_bytes - before.host_bytes), device)
