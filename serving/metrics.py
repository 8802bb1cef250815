"""Prometheus metrics of the serving stack, rendered at scrape time from what is loaded now.

Nothing here outlives the version it describes: every per-version series is produced when
``/metrics`` is scraped, from the versions loaded at that moment (request series of a version that
was unloaded are dropped then, and when a new version is first observed), so the exposition stays
the size of what is served after any number of swaps.

Per request (recorded by the dataplane for every front end, from its event loop):
``fedserve_requests_total``, ``fedserve_request_failures_total`` (by model and HTTP status; a name
that is not loaded counts as ``_unknown``), ``fedserve_request_latency_seconds`` (receive to
response) and ``fedserve_queue_time_seconds`` (dispatch to batch start) histograms, labelled by
model and version.

Per engine (read from the dispatcher's state at scrape time, so nothing is paid per request):
``fedserve_engine_queue_depth`` (requests), ``fedserve_engine_outstanding_items`` (queued + running
rows), ``fedserve_engine_latency_ewma_seconds``, ``fedserve_engine_batches_total``,
``fedserve_engine_items_total``, ``fedserve_engine_errors_total``; per pool the batch-size histogram
``fedserve_batch_size``, ``fedserve_pool_engines``, ``fedserve_pool_engine_failures_total`` and
``fedserve_pool_engine_replacements_total``.

Triton's own (``nv_inference_*``, :mod:`serving.triton_metrics`) follow, for dashboards made for
Triton.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from serving.registry import ModelRegistry
from serving.triton_metrics import render_triton_metrics

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

LATENCY_BUCKETS = (
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
#: the label a failure of a model that is not loaded gets (junk names cannot grow the label set)
UNKNOWN_MODEL = "_unknown"


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


class _Histogram:
    """Bucket counts, sum and count of one series (Prometheus' cumulative form at scrape)."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def buckets(self) -> list[tuple[str, float]]:
        out = []
        running = 0
        for bound, count in zip(self.bounds, self.counts, strict=False):
            running += count
            out.append((str(bound), running))
        out.append(("+Inf", running + self.counts[-1]))
        return out


class _VersionRequests:
    """The request series of one (model, version)."""

    __slots__ = ("count", "latency", "queue")

    def __init__(self) -> None:
        self.count = 0
        self.latency = _Histogram(LATENCY_BUCKETS)
        self.queue = _Histogram(LATENCY_BUCKETS)


class ServingMetrics:
    """The app's metrics; :meth:`render` gives the Prometheus text exposition.

    :meth:`observe` and :meth:`failure` are called from the event loop only (plain counters, no
    locks); everything is rendered at scrape time for the versions loaded then.
    """

    def __init__(self, models: ModelRegistry) -> None:
        self.models = models
        self._versions: dict[tuple[str, int], _VersionRequests] = {}
        self._failures: dict[tuple[str, int], int] = {}
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_RequestCollector(self))
        self.registry.register(_EngineCollector(models))

    def observe(self, model: str, version: int, latency_s: float, queue_s: float) -> None:
        series = self._versions.get((model, version))
        if series is None:
            self.prune()
            series = self._versions[(model, version)] = _VersionRequests()
        series.count += 1
        series.latency.observe(latency_s)
        series.queue.observe(queue_s)

    def failure(self, model: str, status: int) -> None:
        """One failed request of ``model`` (:data:`UNKNOWN_MODEL` unless it is loaded)."""
        if model not in self.models:
            model = UNKNOWN_MODEL
        key = (model, status)
        self._failures[key] = self._failures.get(key, 0) + 1

    def prune(self) -> None:
        """Drop the series of versions (and failures of models) no longer loaded."""
        loaded = {(p.name, p.version) for p in self.models.pools()}
        for key in [k for k in self._versions if k not in loaded]:
            del self._versions[key]
        names = {name for name, _ in loaded} | {UNKNOWN_MODEL}
        for key in [k for k in self._failures if k[0] not in names]:
            del self._failures[key]

    def render(self) -> bytes:
        self.prune()
        return generate_latest(self.registry) + render_triton_metrics(self.models.pools())


class _RequestCollector(Collector):
    def __init__(self, metrics: ServingMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Any]:
        labels = ["model", "version"]
        requests = CounterMetricFamily(
            "fedserve_requests", "Inference requests received", labels=labels
        )
        failures = CounterMetricFamily(
            "fedserve_request_failures",
            "Inference requests answered with an error",
            labels=["model", "code"],
        )
        latency = HistogramMetricFamily(
            "fedserve_request_latency_seconds",
            "Inference request latency, body received to response ready",
            labels=labels,
        )
        queue = HistogramMetricFamily(
            "fedserve_queue_time_seconds",
            "Time a request waited before its batch started",
            labels=labels,
        )
        for (model, version), series in sorted(self.metrics._versions.items()):
            lv = [model, str(version)]
            requests.add_metric(lv, series.count)
            latency.add_metric(lv, series.latency.buckets(), sum_value=series.latency.sum)
            queue.add_metric(lv, series.queue.buckets(), sum_value=series.queue.sum)
        for (model, status), count in sorted(self.metrics._failures.items()):
            failures.add_metric([model, str(status)], count)
        yield from (requests, failures, latency, queue)
