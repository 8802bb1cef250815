"""The dataplane: what every front end (HTTP, NDJSON stream, gRPC) does, done once.

A front end only turns its wire format into calls here and the answers back (KServe's python
server has the same split: thin protocol front ends over one dataplane)::

    async def decode(specs):                 # the model's input specs: for messages only
        return <codec>.decode(body, specs)
    request, result = await dataplane.infer_with(name, version, decode)
        # NotFound (404), Unavailable (503), InputError (400), Overloaded (429)
    body = <codec>.encode(result, request)
    dataplane.record_success(result, latency_s)             # or record_failure(name, status)

Every method a front end calls is in :class:`FrontEndPlane`, awaited: a front-end process
(``serving.frontends > 1``) runs the same front ends over
:class:`~serving.dataplane_link.RemoteDataPlane`, which makes each call here, in the engine
process.

* **Lookup** (:meth:`DataPlane.lookup`) is the one place a model name and version become an
  engine pool (the newest loaded version when ``version`` is None or empty);
  :meth:`DataPlane.acquire` is the same on the inference path, and when the version is not
  loaded it has the scheduler load it (on demand, evicting the least recently used idle version)
  and awaits that load, bounded by ``serving.load_timeout_s``. When the version is loaded it
  returns without suspending.
* **Validation**: the decoded tensors against the version's
  :class:`~serving.signature.ModelSignature`, and the requested outputs against its outputs,
  before anything is queued.
* **Dispatch and retry on swap**: a pool closed by a swap raises ``PoolClosed``; the request is
  looked up again (and validated again when the new version's signature differs) and re-sent,
  at most three times, then 503.
* **Documents** for the metadata routes (model metadata, readiness, Triton's model configuration,
  the repository index, server metadata) as plain dicts each front end serialises its way.
* **Model control and statistics** (Triton's model repository and statistics extensions):
  :meth:`DataPlane.repository_index`, :meth:`DataPlane.load_model`,
  :meth:`DataPlane.unload_model` (the scheduler's explicit model control) and
  :meth:`DataPlane.model_statistics` (the versions' :mod:`serving.statistics`).
* **Metrics**: :meth:`record_success` / :meth:`record_failure` feed
  :class:`~serving.metrics.ServingMetrics` (a failure for a name that is not loaded is labelled
  ``_unknown`` there, so junk names cannot grow the label set).

Errors are :class:`~serving.errors.ServingError` subclasses carrying both HTTP and gRPC status.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

from google.protobuf import json_format
from tritonclient.grpc.model_config_pb2 import ModelConfig

from serving.errors import BadRequest, NotFound, PoolClosed, RepositoryError, Unavailable
from serving.inference import InferRequest, InferResult
from serving.metrics import ServingMetrics
from serving.model_config import new_config
from serving.pool import EnginePool
from serving.registry import ModelRegistry
from serving.scheduler import Scheduler
from serving.scheduler_metrics import SchedulerCollector
from serving.signature import ModelSignature
from serving.statistics import ModelStatistics
from serving.tensor_spec import TensorSpec

log = logging.getLogger(__name__)

SERVER_NAME = "fedserve"
SERVER_VERSION = "0.1.0"
EXTENSIONS = [
    "binary_tensor_data",
    "model_configuration",
    "model_repository",
    "model_repository(unload_dependents)",
    "statistics",
]
PLATFORM = "onnxruntime_onnx"
#: attempts of one request across pools swapped under it (at least; see DataPlane.infer)
SWAP_ATTEMPTS = 3

#: a front end's decoding of one request: the model's input specs (None: not known yet) in, the
#: request out; it raises BadRequest (400) for bad input, PayloadTooLarge for too much of it
Decoder = Callable[[Mapping[str, TensorSpec] | None], Awaitable[InferRequest]]


class FrontEndPlane(Protocol):
    """What a front end (HTTP, NDJSON stream, gRPC) calls: :class:`DataPlane` in the engine
    process, :class:`~serving.dataplane_link.RemoteDataPlane` in a front-end process."""

    async def server_metadata(self) -> dict[str, Any]: ...
    async def ready(self) -> bool: ...
    async def not_ready_reason(self) -> str | None: ...
    async def repository_index(self, ready_only: bool = False) -> list[dict[str, Any]]: ...
    async def load_model(self, name: str, parameters: Mapping[str, Any] | None = None) -> None: ...
    async def unload_model(
        self, name: str, parameters: Mapping[str, Any] | None = None
    ) -> None: ...
    async def model_statistics(
        self, name: str | None = None, version: str | None = None
    ) -> dict[str, Any]: ...
    async def model_metadata(self, name: str, version: str | None = None) -> dict[str, Any]: ...
    async def model_ready(self, name: str, version: str | None = None) -> dict[str, Any]: ...
    async def model_config(self, name: str, version: str | None = None) -> dict[str, Any]: ...
    async def metrics_text(self) -> bytes: ...
    async def input_specs(
        self, name: str, version: str | int | None = None
    ) -> Mapping[str, TensorSpec]: ...
    async def infer_with(
        self, name: str, version: str | int | None, decode: Decoder
    ) -> tuple[InferRequest, InferResult]: ...
    def record_success(self, result: InferResult, latency_s: float) -> None: ...
    def record_failure(self, name: str, status: int) -> None: ...


class DataPlane:
    """Lookup, validation, dispatch, retry-on-swap, documents and metrics over one registry.

    ``ready`` tells server readiness (e.g. the repository watcher's first load is done) and
    ``not_ready_reason`` why not; ``metrics`` default to a fresh :class:`ServingMetrics` (its own
    CollectorRegistry), to which the scheduler's collector is added; without a ``scheduler`` only
    loaded versions are served and model control is unavailable; ``configs(name, version)``
    gives a version's ModelConfig (the repository's ``version_config``).
    """

    def __init__(
        self,
        registry: ModelRegistry,
        *,
        metrics: ServingMetrics | None = None,
        ready: Callable[[], bool] | None = None,
        not_ready_reason: Callable[[], str | None] | None = None,
        configs: Callable[[str, int], ModelConfig] | None = None,
        scheduler: Scheduler | None = None,
    ) -> None:
        self.registry = registry
        self._not_ready_reason = not_ready_reason or (lambda: None)
        self._configs = configs
        self.metrics = metrics or ServingMetrics(registry)
        self._ready = ready or (lambda: True)
        self.scheduler = scheduler
        if scheduler is not None:
            self.metrics.registry.register(SchedulerCollector(scheduler))

    # ---- server

    async def server_metadata(self) -> dict[str, Any]:
        return {"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": EXTENSIONS}

    async def ready(self) -> bool:
        return bool(self._ready())

    async def not_ready_reason(self) -> str | None:
        """Why the server is not ready, when something says (e.g. the model store's error)."""
        return self._not_ready_reason()

    async def repository_index(self, ready_only: bool = False) -> list[dict[str, Any]]:
        """Triton's repository index: every version the repository serves with its state
        (READY, LOADING, UNLOADING, UNAVAILABLE) and the reason; only the loaded ones without
        a scheduler or when ``ready_only``."""
        if self.scheduler is not None:
            return self.scheduler.index(ready_only)
        return [
            {"name": name, "version": str(v), "state": "READY", "reason": ""}
            for name, versions in self.registry.models().items()
            for v in versions
        ]

    async def load_model(self, name: str, parameters: Mapping[str, Any] | None = None) -> None:
        """Triton's model load: load ``name``'s served versions now (NotFound: not in the
        repository; BadRequest: a version failed to load, with the reason; what was loaded stays
        loaded). A model unloaded through :meth:`unload_model` is served again."""
        scheduler = self._control()
        unsupported = sorted(k for k in parameters or {} if k == "config" or k.startswith("file:"))
        if unsupported:
            raise BadRequest(
                f"load parameters {unsupported} are not supported: this server loads models from "
                "its repository as they are"
            )
        await asyncio.to_thread(scheduler.load_model, name)

    async def unload_model(self, name: str, parameters: Mapping[str, Any] | None = None) -> None:
        """Triton's model unload: every version of ``name`` is unloaded (in-flight requests
        finish) and stays unloaded until :meth:`load_model` (NotFound: not in the repository).
        ``unload_dependents`` is accepted; models here have no dependents."""
        await asyncio.to_thread(self._control().unload_model, name)

    async def model_statistics(
        self, name: str | None = None, version: str | None = None
    ) -> dict[str, Any]:
        """Triton's statistics extension: ``{"model_stats": [...]}`` of every loaded version, of
        ``name``'s loaded versions, or of one version (NotFound for an unknown one)."""
        return {"model_stats": [s.to_triton() for s in self.statistics(name, version)]}

    def statistics(
        self, name: str | None = None, version: str | None = None
    ) -> list[ModelStatistics]:
        """The :class:`ModelStatistics` objects :meth:`model_statistics` renders (the Prometheus
        and gRPC front ends read them too)."""
        if self.scheduler is not None:
            return self.scheduler.statistics(name, version or None)
        if name is None:
            return [pool.stats for pool in self.registry.pools()]
        if version in (None, ""):
            return [self.registry.get(name, v).stats for v in self.registry.versions(name)]
        return [self.registry.get(name, version).stats]

    def _control(self) -> Scheduler:
        if self.scheduler is None:
            raise Unavailable("model control needs the repository scheduler; none is running")
        return self.scheduler

    # ---- models

    def lookup(self, name: str, version: str | int | None = None) -> EnginePool:
        """The pool serving ``name`` at ``version`` (None or "": the newest loaded); NotFound."""
        return self.registry.get(name, version)

    async def acquire(self, name: str, version: str | int | None = None) -> EnginePool:
        """:meth:`lookup` for the inference path: a version that is not loaded is loaded (on
        demand) and awaited; NotFound (not served), Unavailable (still loading after
        ``serving.load_timeout_s``, or no room). Does not suspend when the version is loaded."""
        try:
            return self.registry.get(name, version)
        except NotFound:
            if self.scheduler is None:
                raise
        return await self.scheduler.acquire(name, version)

    async def model_metadata(self, name: str, version: str | None = None) -> dict[str, Any]:
        pool = self.lookup(name, version)
        sig = pool.signature
        return {
            "name": pool.name,
            "versions": [str(v) for v in self.registry.versions(pool.name)],
            "platform": PLATFORM,
            "inputs": [s.to_dict() for s in sig.inputs],
            "outputs": [s.to_dict() for s in sig.outputs],
        }

    async def model_ready(self, name: str, version: str | None = None) -> dict[str, Any]:
        """``{"name", "version", "ready"}``: ready while the version has a live engine."""
        pool = self.lookup(name, version)
        return {"name": pool.name, "version": str(pool.version), "ready": pool.ready}

    async def model_config(self, name: str, version: str | None = None) -> dict[str, Any]:
        """Triton's model configuration extension: ``json_format.MessageToDict`` of
        :meth:`model_config_message` (protobuf's JSON, proto field names), nothing added."""
        return json_format.MessageToDict(
            self.model_config_message(name, version), preserving_proto_field_name=True
        )

    async def metrics_text(self) -> bytes:
        """``/metrics``: Prometheus' text format of every metric (ours, Triton's, the budget's)."""
        return self.metrics.render()

    def model_config_message(self, name: str, version: str | None = None) -> ModelConfig:
        """The served version's Triton ModelConfig: its repository config completed for it
        (``configs``; without, one made from the signature), with what runs put in:
        ``instance_group`` (engines, CPU or GPU), ``dynamic_batching``'s queue delay and the
        ``providers``/``policy`` parameters."""
        pool = self.lookup(name, version)
        sig = pool.signature
        config = None
        if self._configs is not None:
            try:
                config = self._configs(pool.name, pool.version)
            except RepositoryError as exc:  # e.g. config.pbtxt edited badly since the load
                log.warning("serving %s's config made from its signature: %s", pool.name, exc)
        if config is None:
            config = new_config(
                pool.name, sig.inputs, sig.outputs, max_batch_size=sig.max_batch_size
            )
            config.ClearField("version_policy")
        gpu = pool.obtained_providers[:1] == ["CUDAExecutionProvider"]
        del config.instance_group[:]
        config.instance_group.add(
            name=pool.name, kind="KIND_GPU" if gpu else "KIND_CPU", count=len(pool.workers)
        )
        if sig.max_batch_size > 0:
            delay_us = int(pool.settings.max_queue_delay_ms * 1000)
            config.dynamic_batching.max_queue_delay_microseconds = delay_us
        config.parameters["providers"].string_value = ",".join(pool.obtained_providers)
        config.parameters["policy"].string_value = pool.settings.policy
        return config

    # ---- inference

    async def input_specs(
        self, name: str, version: str | int | None = None
    ) -> Mapping[str, TensorSpec]:
        """The input specs of the version :meth:`acquire` finds (NotFound, Unavailable): what a
        decoder names in its messages, and the check that a model is served before a stream."""
        return (await self.acquire(name, version)).signature.input_map

    async def infer_with(
        self, name: str, version: str | int | None, decode: Decoder
    ) -> tuple[InferRequest, InferResult]:
        """A front end's whole inference: :meth:`acquire`, then ``decode(specs)`` (the front
        end's wire format into an InferRequest; the specs only make its messages name the
        model's expectation), then :meth:`infer`. Returns the request and its result."""
        pool = await self.acquire(name, version)
        request = await decode(pool.signature.input_map)
        return request, await self.infer(pool, request, version)

    async def infer_request(
        self, name: str, version: str | int | None, request: InferRequest
    ) -> InferResult:
        """:meth:`infer` of a request decoded elsewhere (a front-end process; it is validated
        here against the version that runs it)."""
        return await self.infer(await self.acquire(name, version), request, version)

    async def infer(
        self, pool: EnginePool, request: InferRequest, version: str | int | None
    ) -> InferResult:
        """Validate ``request`` against ``pool``'s signature, run it, and answer.

        ``version`` is the one the client asked for (None: the newest), looked up again when a
        swap closes ``pool`` under the request. Raises InputError / BadRequest (400), Overloaded
        (429), Unavailable (503) or the error the engine finished the request with.
        """
        signature = pool.signature
        n = signature.validate(request.inputs)
        wanted = _output_names(signature, request, pool.name)
        retry_until: float | None = None
        for attempt in itertools.count(1):
            try:
                done = await pool.infer_async(request.inputs, n)
            except PoolClosed:
                # With a scheduler, an eviction may close the version between this request's
                # lookup and its dispatch, again after each reload under a thrashing cache: retry
                # for as long as a request may wait for a load (serving.load_timeout_s after the
                # first close), not only SWAP_ATTEMPTS times.
                now = asyncio.get_running_loop().time()
                if retry_until is None:
                    patience = self.scheduler.load_timeout_s if self.scheduler is not None else 0.0
                    retry_until = now + patience
                if attempt >= SWAP_ATTEMPTS and now >= retry_until:
                    break
                fresh = await self.acquire(pool.name, version)
                if fresh is pool:
                    raise
                if fresh.signature != signature:
                    signature = fresh.signature
                    n = signature.validate(request.inputs)
                    wanted = _output_names(signature, request, fresh.name)
                pool = fresh
                continue
            if done.error is not None:
                raise done.error
            assert done.outputs is not None
            return InferResult(
                pool.name, pool.version, request.id, done.outputs, wanted, done.queue_seconds
            )
        raise Unavailable(f"model '{pool.name}' is being swapped; retry")

    # ---- metrics

    def record_success(self, result: InferResult, latency_s: float) -> None:
        self.metrics.observe(
            result.model_name, result.model_version, latency_s, result.queue_seconds
        )

    def record_failure(self, name: str, status: int) -> None:
        self.metrics.failure(name, status)


def _output_names(signature: ModelSignature, request: InferRequest, model: str) -> list[str]:
    """The outputs to answer: the requested ones (each must exist) or all, in the model's order."""
    if request.outputs is None:
        return signature.output_names
    names = signature.output_names
    for name, _ in request.outputs:
        if name not in names:
            raise BadRequest(
                f"unknown output '{name}'; model '{model}' has outputs {', '.join(names)}"
            )
    return [name for name, _ in request.outputs]
