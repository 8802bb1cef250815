"""``fedserve-train``'s schema: the experiment plus how its simulation is launched.

:class:`TrainJobConfig` is what conf/config.yaml is composed against (``experiment_schema`` in
Hydra's ConfigStore, see :mod:`server.config_loader`). Its ``simulation`` section says where the
simulated clients run; it is the launcher's business only, so the ServerApp (which composes the
same conf/) reads the :class:`~server.config.ExperimentConfig` part and drops it: the experiment,
its ``config.json`` and its checkpoint are the same wherever the clients ran.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from server.config import ExperimentConfig
from task.config import ConfigError, check_positive


@dataclass
class SimulationConfig:
    """Where and how big the simulated clients run.

    ``ray_address``: ``host:port`` of the head of a running Ray cluster (``ray start --head
    --port=<port>``) to run the clients on instead of a Ray instance of the run's own; every node
    needs this project installed. ``client_cpus``: the CPUs Ray reserves for each simulated
    client, so each node holds ``floor(its CPUs / client_cpus)`` clients at once (Flower's
    ``client-resources-num-cpus``, an integer in flwr 1.42; for more clients at once than cores,
    give Ray more CPUs than there are: ``RAY_OVERRIDE_RESOURCES='{"CPU": 20}'``).
    """

    ray_address: str | None = None
    client_cpus: int = 1

    def validate(self) -> None:
        check_positive("simulation.client_cpus", self.client_cpus)
        if self.ray_address is not None:
            ray_host_port(self.ray_address)


@dataclass
class TrainJobConfig(ExperimentConfig):
    """One ``fedserve-train`` job: the experiment and its ``simulation`` section."""

    simulation: SimulationConfig = field(default_factory=SimulationConfig)

    def validate(self) -> None:
        super().validate()
        self.simulation.validate()


def ray_host_port(address: str) -> tuple[str, int]:
    """``host:port`` of a Ray head's GCS, split; ConfigError naming the value otherwise."""
    host, sep, port = address.rpartition(":")
    if "://" in address or not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(
            f"simulation.ray_address must be host:port of a Ray head (what `ray start --head` "
            f"prints, e.g. 10.0.0.5:6379), got {address!r}"
        )
    return host, int(port)
