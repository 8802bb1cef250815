"""Prometheus metrics of the serving stack, in a :class:`CollectorRegistry` of its own per app.

Per request (recorded by the dataplane for every front end): ``fedserve_requests_total``,
``fedserve_request_failures_total`` (by HTTP status), ``fedserve_request_latency_seconds`` (receive
to response) and ``fedserve_queue_time_seconds`` (dispatch to batch start) histograms, labelled by
model and version.

Per engine (read from the dispatcher's state at scrape time, so nothing is paid per request):
``fedserve_engine_queue_depth`` (requests), ``fedserve_engine_outstanding_items`` (queued + running
rows), ``fedserve_engine_latency_ewma_seconds``, ``fedserve_engine_batches_total``,
``fedserve_engine_items_total``, ``fedserve_engine_errors_total``; per pool the batch-size histogram
``fedserve_batch_size``, ``fedserve_pool_engines``, ``fedserve_pool_engine_failures_total`` and
``fedserve_pool_engine_replacements_total``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from serving.registry import ModelRegistry

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

LATENCY_BUCKETS = (
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class _EngineCollector(Collector):
    def __init__(self, registry: ModelRegistry) -> None:
        self.models = registry

    def collect(self) -> Iterator[Any]:
        labels = ["model", "version", "engine"]
        depth = GaugeMetricFamily(
            "fedserve_engine_queue_depth", "Requests waiting in the engine's queue", labels=labels
        )
        outstanding = GaugeMetricFamily(
            "fedserve_engine_outstanding_items",
            "Rows queued plus running on the engine (times its per-row EWMA: the least-loaded key)",
            labels=labels,
        )
        ewma = GaugeMetricFamily(
            "fedserve_engine_latency_ewma_seconds",
            "EWMA of the engine's batch run time (the tie breaker)",
            labels=labels,
        )
        batches = CounterMetricFamily(
            "fedserve_engine_batches", "Batches run by the engine", labels=labels
        )
        items = CounterMetricFamily(
            "fedserve_engine_items", "Rows run by the engine", labels=labels
        )
        errors = CounterMetricFamily(
            "fedserve_engine_errors",
            "Engine errors (engine failures and rejected inputs)",
            labels=labels,
        )
        plabels = ["model", "version"]
        engines = GaugeMetricFamily("fedserve_pool_engines", "Live engines", labels=plabels)
        failures = CounterMetricFamily(
            "fedserve_pool_engine_failures", "Engines taken out after an error", labels=plabels
        )
        replacements = CounterMetricFamily(
            "fedserve_pool_engine_replacements", "Replacement engines started", labels=plabels
        )
        sizes = HistogramMetricFamily(
            "fedserve_batch_size", "Rows per batch run by the engines", labels=plabels
        )
        for pool in self.models.pools():
            pv = [pool.name, str(pool.version)]
            counts: dict[int, int] = {}
            total_rows = 0
            for w in pool.workers:
                lv = [*pv, w.name]
                depth.add_metric(lv, w.queue_depth)
                outstanding.add_metric(lv, w.outstanding)
                ewma.add_metric(lv, w.ewma_s)
                batches.add_metric(lv, w.batches)
                items.add_metric(lv, w.items)
                errors.add_metric(lv, w.errors)
                total_rows += w.items
                for size, count in enumerate(w.batch_size_counts):
                    if count:
                        counts[size] = counts.get(size, 0) + count
            engines.add_metric(pv, len(pool.workers))
            failures.add_metric(pv, pool.engine_failures)
            replacements.add_metric(pv, pool.replacements)
            buckets = []
            running = 0
            for bound in BATCH_BUCKETS:
                running = sum(c for s, c in counts.items() if s <= bound)
                buckets.append((str(bound), running))
            buckets.append(("+Inf", sum(counts.values())))
            sizes.add_metric(pv, buckets, sum_value=total_rows)
        yield from (depth, outstanding, ewma, batches, items, errors, engines, failures)
        yield from (replacements, sizes)


class ServingMetrics:
    """The app's metrics; :meth:`render` gives the Prometheus text exposition."""

    def __init__(self, models: ModelRegistry) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        labels = ["model", "version"]
        self.requests = Counter(
            "fedserve_requests", "Inference requests received", labels, registry=self.registry
        )
        self.failures = Counter(
            "fedserve_request_failures",
            "Inference requests answered with an error",
            ["model", "code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "fedserve_request_latency_seconds",
            "Inference request latency, body received to response ready",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.queue_time = Histogram(
            "fedserve_queue_time_seconds",
            "Time a request waited before its batch started",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_EngineCollector(models))
        self._children: dict[tuple[str, int], tuple[Any, Any, Any]] = {}

    def observe(self, model: str, version: int, latency_s: float, queue_s: float) -> None:
        children = self._children.get((model, version))
        if children is None:
            v = str(version)
            children = (
                self.requests.labels(model, v),
                self.latency.labels(model, v),
                self.queue_time.labels(model, v),
            )
            self._children[(model, version)] = children
        children[0].inc()
        children[1].observe(latency_s)
        children[2].observe(queue_s)

    def failure(self, model: str, status: int) -> None:
        self.failures.labels(model, str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
