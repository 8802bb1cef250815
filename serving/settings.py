"""The serving configuration: the schema of ``conf/serve.yaml`` and its ``serving.*`` keys.

:class:`ServeConfig` is what ``fedserve-serve`` composes (a Hydra structured config: every key, its
type and its default live here, nowhere else); an unknown key or a value of the wrong type stops
the server before it loads anything, and :meth:`ServingConfig.validate` checks ranges and choices
with a message naming the key, the value and what is allowed. The engines, the dispatcher, the
repository watcher, the scheduler and the HTTP front end each read their part of
:class:`ServingConfig`.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from typing import Any

from serving.config_schema import ConfigError
from serving.dispatcher import POLICIES
from serving.providers import CONV_ALGO_SEARCHES
from serving.store import StoreConfig

#: how model versions are loaded (``serving.load``)
LOAD_MODES = ("eager", "on_demand")


@dataclass
class BudgetConfig:
    """``serving.budget.*``: what every loaded model version shares (:mod:`serving.scheduler`)."""

    #: engines (concurrent runs) over all loaded versions, >= 1 per loaded version;
    #: null = usable cores (CPU) / engines_per_gpu (CUDA)
    engines: int | None = None
    #: CUDA: engines on the GPU when engines is null
    engines_per_gpu: int = 4
    #: memory the loaded versions may hold (measured as they load: host memory on CPU, device
    #: memory on CUDA); null = memory_fraction of what is available when the server starts
    memory_bytes: int | None = None
    memory_fraction: float = 0.5
    #: seconds between reassignments of engines by demand (also done on every load and unload)
    rebalance_s: float = 1.0

    def validate(self) -> None:
        if self.engines is not None:
            _at_least("serving.budget.engines", self.engines, 1)
        _at_least("serving.budget.engines_per_gpu", self.engines_per_gpu, 1)
        if self.memory_bytes is not None:
            _at_least("serving.budget.memory_bytes", self.memory_bytes, 1)
        if not 0 < self.memory_fraction <= 1:
            raise ConfigError(
                f"serving.budget.memory_fraction must be in (0, 1], got {self.memory_fraction}"
            )
        if not self.rebalance_s > 0:
            raise ConfigError(f"serving.budget.rebalance_s must be > 0, got {self.rebalance_s}")
        _waitable("serving.budget.rebalance_s", self.rebalance_s)


@dataclass
class ServingConfig:
    """``serving.*``: engines, dispatcher, repository watching, the budget and request limits."""

    #: engines per loaded version, fixed; null = the scheduler spreads serving.budget.engines
    #: over the loaded versions by demand
    instances: int | None = None
    #: the engines and memory all loaded versions share
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    #: eager: load what the repository's version policies want at start and on publish, as far
    #: as the budget allows; on_demand: load a version at its first request. Both load a
    #: version that is not resident when it is requested, evicting the least recently used
    load: str = "eager"
    #: how long a request waits for its version to load before 503 + Retry-After
    load_timeout_s: float = 30.0
    #: models ("name", its policy's versions) or versions ("name:version") always resident
    pin: list[str] = field(default_factory=list)
    #: onnxruntime threads per engine
    intra_op_threads: int = 1
    #: idle intra-op spinning steals cores from the other engines
    allow_spinning: bool = False
    #: auto (CUDA if it works, else CPU) | cpu | cuda | a list of provider names
    providers: Any = "auto"
    #: CUDA only: heuristic | exhaustive (benchmarks every new batch shape) | default
    cudnn_conv_algo_search: str = "heuristic"
    #: pad runs to max_batch_size rows, one shape per engine: true | false | auto (on CUDA only)
    pad_batches: Any = "auto"
    #: least_loaded | round_robin
    policy: str = "least_loaded"
    #: rows per dynamic batch (also capped by the model's max_batch_size)
    max_batch_size: int = 64
    #: how long a batch waits for more requests after its first
    max_queue_delay_ms: float = 1.0
    #: queued rows per engine before 429 + Retry-After
    max_queue_items: int = 2048
    #: run in the event loop when the engine is idle and its runs take less than this
    inline_max_ms: float = 1.0
    #: a batch running longer takes its engine out (watchdog)
    run_timeout_s: float = 30.0
    #: attempts at starting a replacement for a failed engine
    replace_attempts: int = 3
    #: one run at batch 1 and one at max_batch_size before a version serves
    warmup: bool = True
    #: input names whose floats may be NaN/Inf
    allow_nonfinite: list[str] = field(default_factory=list)
    #: versions served per model; null = config.pbtxt's version_policy
    versions: int | None = None
    #: repository change check (a few stats); a full poll on a change or every 1 s
    poll_interval_s: float = 0.05
    #: how long an unloaded version may finish its queue
    drain_timeout_s: float = 30.0
    #: request body limit (413 above); per line for infer_stream; gRPC's message limit too
    body_limit_bytes: int = 64 * 1024 * 1024
    #: a repository on a model store (repository=s3://...): polling, local cache, retries
    store: StoreConfig = field(default_factory=StoreConfig)
    #: JSON bodies over this many bytes are decoded in a helper process, off the event loop
    #: (null: never)
    json_offload_bytes: int | None = 256 * 1024
    #: helper processes decoding big JSON bodies (spawned on the first one)
    json_offload_processes: int = 1
    #: KServe v2 / Triton gRPC port (GRPCInferenceService); null disables gRPC
    grpc_port: int | None = 8001
    #: processes running the HTTP and gRPC front ends on the same ports (the kernel spreads
    #: connections over them); 1: the engine process alone. The others forward each call to the
    #: engine process, which keeps the one engine pool per version (serving.dataplane_link)
    frontends: int = 1
    #: open HTTP connections + requests in flight before new requests get 503 (null: no limit)
    max_connections: int | None = 2048
    #: an idle keep-alive HTTP connection is closed after this many seconds
    keep_alive_timeout_s: float = 5.0
    #: a connection must deliver a request's headers within this many seconds of connecting
    #: (or of its previous response): idle and half-sent connections are closed
    header_timeout_s: float = 10.0
    #: Host header values accepted (e.g. [localhost, 127.0.0.1, my.host:8000]); null: any. A
    #: browser page cannot then reach a localhost server through DNS rebinding
    allowed_hosts: list[str] | None = None

    def validate(self) -> None:
        _waitable("serving.max_queue_delay_ms", self.max_queue_delay_ms, per_second=1000)
        _waitable("serving.inline_max_ms", self.inline_max_ms, per_second=1000)
        for key, seconds in (
            ("serving.load_timeout_s", self.load_timeout_s),
            ("serving.run_timeout_s", self.run_timeout_s),
            ("serving.poll_interval_s", self.poll_interval_s),
            ("serving.drain_timeout_s", self.drain_timeout_s),
            ("serving.keep_alive_timeout_s", self.keep_alive_timeout_s),
            ("serving.header_timeout_s", self.header_timeout_s),
            ("serving.store.poll_s", self.store.poll_s),
            ("serving.store.retry_max_s", self.store.retry_max_s),
        ):
            _waitable(key, seconds)
        if self.instances is not None and self.instances < 0:
            raise ConfigError(
                f"serving.instances must be >= 1 (or null/0 = auto), got {self.instances}"
            )
        _at_least("serving.intra_op_threads", self.intra_op_threads, 1)
        _at_least("serving.max_batch_size", self.max_batch_size, 1)
        _at_least("serving.max_queue_delay_ms", self.max_queue_delay_ms, 0)
        _at_least("serving.max_queue_items", self.max_queue_items, 0)
        _at_least("serving.replace_attempts", self.replace_attempts, 0)
        _at_least("serving.drain_timeout_s", self.drain_timeout_s, 0)
        _at_least("serving.body_limit_bytes", self.body_limit_bytes, 1)
        _at_least("serving.json_offload_processes", self.json_offload_processes, 1)
        if self.json_offload_bytes is not None:
            _at_least("serving.json_offload_bytes", self.json_offload_bytes, 0)
        if self.frontends < 1:
            raise ConfigError(
                f"serving.frontends must be >= 1 (1: no front-end processes), got {self.frontends}"
            )
        if self.grpc_port is not None and not 0 <= self.grpc_port <= 65535:
            raise ConfigError(
                f"serving.grpc_port must be in [0, 65535] or null (no gRPC), got {self.grpc_port}"
            )
        if self.max_connections is not None:
            _at_least("serving.max_connections", self.max_connections, 1)
        if not self.keep_alive_timeout_s > 0:
            raise ConfigError(
                f"serving.keep_alive_timeout_s must be > 0, got {self.keep_alive_timeout_s}"
            )
        if not self.header_timeout_s > 0:
            raise ConfigError(f"serving.header_timeout_s must be > 0, got {self.header_timeout_s}")
        self.budget.validate()
        if self.load not in LOAD_MODES:
            raise ConfigError(f"serving.load must be {' or '.join(LOAD_MODES)}, got {self.load!r}")
        if not self.load_timeout_s > 0:
            raise ConfigError(f"serving.load_timeout_s must be > 0, got {self.load_timeout_s}")
        whole: set[str] = set()
        versions: set[tuple[str, int]] = set()
        for pin in self.pin:
            name, _, version = str(pin).partition(":")
            # isdigit() alone takes '²', which int() then refuses (a traceback at start)
            if not name or (version and not (version.isascii() and version.isdigit())):
                raise ConfigError(
                    f"serving.pin entries are 'model' or 'model:version', got {pin!r}"
                )
            if version:
                versions.add((name, int(version)))
            else:
                whole.add(name)
        # at least this many versions stay resident: a repeated pin, or a version of a model
        # pinned whole, is no further one
        resident = len(whole) + len({(n, v) for n, v in versions if n not in whole})
        engines = self.budget.engines
        if engines is not None and resident * (self.instances or 1) > engines:
            raise ConfigError(
                f"serving.pin keeps {resident} versions resident, each with "
                f">= {self.instances or 1} engine(s), but serving.budget.engines={engines}; "
                "raise serving.budget.engines or pin fewer"
            )
        if not self.poll_interval_s > 0:
            raise ConfigError(f"serving.poll_interval_s must be > 0, got {self.poll_interval_s}")
        if self.versions is not None and self.versions < 1:
            raise ConfigError(f"serving.versions must be >= 1 or null, got {self.versions}")
        if not self.store.poll_s > 0:
            raise ConfigError(f"serving.store.poll_s must be > 0, got {self.store.poll_s}")
        if not self.store.retry_max_s > 0:
            raise ConfigError(
                f"serving.store.retry_max_s must be > 0, got {self.store.retry_max_s}"
            )
        _at_least("serving.store.cache_max_bytes", self.store.cache_max_bytes, 1)
        if str(self.cudnn_conv_algo_search).lower() not in CONV_ALGO_SEARCHES:
            raise ConfigError(
                "serving.cudnn_conv_algo_search must be one of "
                f"{', '.join(CONV_ALGO_SEARCHES)}, got {self.cudnn_conv_algo_search!r}"
            )
        if self.pad_batches not in (True, False, "auto"):
            raise ConfigError(
                f"serving.pad_batches must be true, false or auto, got {self.pad_batches!r}"
            )
        if self.policy not in POLICIES:
            raise ConfigError(
                f"serving.policy must be {' or '.join(POLICIES)}, got {self.policy!r}"
            )
        providers = self.providers
        if not isinstance(providers, str) and not (
            isinstance(providers, list | tuple) and all(isinstance(p, str) for p in providers)
        ):
            raise ConfigError(
                "serving.providers must be auto, cpu, cuda or a list of onnxruntime provider "
                f"names, got {providers!r}"
            )


@dataclass
class ServeConfig:
    """``fedserve-serve``'s whole configuration (conf/serve.yaml)."""

    #: Triton-layout repository: a path (relative: to the working directory) or a model store
    #: URL (s3://bucket/prefix; credentials from the store library's environment/config)
    repository: str = "model_repository"
    #: bind address; use 0.0.0.0 deliberately to expose it
    host: str = "127.0.0.1"
    port: int = 8000
    #: bearer token required on every route but /v2/health/*; null = none. Pass it from the
    #: environment (token='${oc.env:FEDSERVE_TOKEN}'): a token on the command line shows in `ps`
    token: str | None = None
    #: model names to serve; null = every model in the repository
    models: list[str] | None = None
    log_level: str = "info"
    serving: ServingConfig = field(default_factory=ServingConfig)

    def validate(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be in [0, 65535], got {self.port}")
        self.serving.validate()
        if self.port != 0 and self.serving.grpc_port == self.port:
            raise ConfigError(
                f"serving.grpc_port and port are both {self.port}: HTTP and gRPC need ports of "
                "their own; pass serving.grpc_port=<another port>"
            )


def _at_least(key: str, value: float, low: float) -> None:
    if value < low:
        raise ConfigError(f"{key} must be >= {low}, got {value}")


def _waitable(key: str, value: float, per_second: float = 1) -> None:
    """A duration (``value`` in 1/``per_second`` s) must be one a thread or the event loop can
    wait for: ``inf`` passed the range checks and killed the thread that waited on it
    (``Event.wait`` raises OverflowError past ``threading.TIMEOUT_MAX``)."""
    most = threading.TIMEOUT_MAX * per_second
    if not math.isfinite(value) or abs(value) > most:
        raise ConfigError(f"{key} must be a finite number of at most {most:.0f}, got {value}")
