"""The budget every loaded model version shares: engines and memory, resolved from the config.

``serving.budget.engines`` counts engines (concurrent runs) over all loaded versions; every loaded
version holds at least one (``serving.instances`` each when that is set), so it also bounds how
many versions can be resident. Unset, it is the usable cores on the CPU (one engine per core: the
engines run one intra-op thread each) and ``engines_per_gpu`` on CUDA (the sessions run on one
device); with a fixed ``serving.instances`` and no budget set, engines are not bounded (each
loaded version simply gets its instances, as before the scheduler existed).

``serving.budget.memory_bytes`` bounds what the loaded versions hold, as measured when they load
(:mod:`serving.memory_probe`): host memory on the CPU, device memory on CUDA. Unset, it is
``memory_fraction`` of the memory available when the server starts (``MemAvailable``, or the
device's total memory on CUDA).
"""

from __future__ import annotations

from dataclasses import dataclass

from serving.memory_probe import device_memory, host_available
from serving.providers import CUDA, resolve_providers, usable_cores
from serving.settings import ServingConfig


@dataclass(frozen=True)
class Budget:
    #: engines over all loaded versions (None: unbounded)
    engines: int | None
    #: engines each loaded version gets when fixed (``serving.instances``); None: by demand
    engines_per_version: int | None
    memory_bytes: int
    #: "host" or "device": which memory ``memory_bytes`` bounds
    memory_kind: str

    @classmethod
    def resolve(cls, settings: ServingConfig) -> Budget:
        conf = settings.budget
        on_gpu = resolve_providers(settings.providers)[:1] == [CUDA]
        fixed = settings.instances or None
        engines = conf.engines
        if engines is None and fixed is None:
            engines = conf.engines_per_gpu if on_gpu else usable_cores()
        device = device_memory() if on_gpu else None
        kind = "device" if device is not None else "host"
        memory = conf.memory_bytes
        if memory is None:
            available = device[1] if device is not None else host_available()
            memory = int(conf.memory_fraction * available)
        return cls(engines, fixed, int(memory), kind)

    def versions_fitting(self) -> int | None:
        """How many versions the engine budget can hold at once (None: unbounded)."""
        if self.engines is None:
            return None
        return self.engines // (self.engines_per_version or 1)

    def describe(self) -> str:
        engines = "unbounded" if self.engines is None else str(self.engines)
        per = self.engines_per_version
        split = f"{per} per version" if per else "shared by demand"
        return (
            f"engines {engines} ({split}), {self.memory_kind} memory "
            f"{self.memory_bytes / 1e6:.1f} MB"
        )
