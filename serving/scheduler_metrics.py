"""Prometheus metrics of the scheduler center, read from its state at scrape time.

Per loaded version (label ``model``, ``version``; a version's series go when it unloads):
``fedserve_scheduler_engines`` (engines assigned) and ``fedserve_scheduler_memory_bytes``
(measured at load, in the budget's kind of memory). Per model (``model``):
``fedserve_scheduler_loads_total``, ``fedserve_scheduler_evictions_total`` and the histogram
``fedserve_scheduler_cold_start_seconds`` (first request to a version that was not resident ->
that version serving). The budget: ``fedserve_scheduler_budget_engines`` (absent when unbounded),
``fedserve_scheduler_budget_memory_bytes``, ``fedserve_scheduler_memory_used_bytes`` and
``fedserve_scheduler_memory_peak_bytes``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from serving.scheduler import COLD_START_BUCKETS, READY, Scheduler


class SchedulerCollector(Collector):
    """Register into the app's CollectorRegistry: ``registry.register(SchedulerCollector(s))``."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler

    def collect(self) -> Iterator[Any]:
        s = self.scheduler
        vlabels = ["model", "version"]
        engines = GaugeMetricFamily(
            "fedserve_scheduler_engines", "Engines assigned to the loaded version", labels=vlabels
        )
        memory = GaugeMetricFamily(
            "fedserve_scheduler_memory_bytes",
            "Memory the loaded version holds, measured when it loaded",
            labels=vlabels,
        )
        for view in s.versions():
            if view.state != READY:
                continue
            labels = [view.model, str(view.version)]
            engines.add_metric(labels, view.engines)
            memory.add_metric(labels, view.memory_bytes)
        loads = CounterMetricFamily(
            "fedserve_scheduler_loads", "Versions of the model loaded", labels=["model"]
        )
        evictions = CounterMetricFamily(
            "fedserve_scheduler_evictions",
            "Versions of the model evicted (least recently used) to make room",
            labels=["model"],
        )
        cold = HistogramMetricFamily(
            "fedserve_scheduler_cold_start_seconds",
            "First request to a version that was not resident, until it served",
            labels=["model"],
        )
        for model, counters in s.counters().items():
            loads.add_metric([model], counters.loads)
            evictions.add_metric([model], counters.evictions)
            buckets = [
                (str(bound), count)
                for bound, count in zip(
                    COLD_START_BUCKETS, counters.cold_start_buckets, strict=False
                )
            ]
            buckets.append(("+Inf", counters.cold_start_buckets[-1]))
            cold.add_metric([model], buckets, sum_value=counters.cold_start_sum)
        yield from (engines, memory, loads, evictions, cold)
        budget = s.budget
        if budget.engines is not None:
            yield GaugeMetricFamily(
                "fedserve_scheduler_budget_engines",
                "Engines all loaded versions share (serving.budget.engines)",
                value=budget.engines,
            )
        yield GaugeMetricFamily(
            "fedserve_scheduler_budget_memory_bytes",
            "Memory all loaded versions share (serving.budget.memory_bytes)",
            value=budget.memory_bytes,
        )
        yield GaugeMetricFamily(
            "fedserve_scheduler_memory_used_bytes",
            "Memory the loaded versions hold plus what loads in progress reserved",
            value=s.memory_used(),
        )
        yield GaugeMetricFamily(
            "fedserve_scheduler_memory_peak_bytes",
            "The most memory the loaded versions held at once",
            value=s.peak_memory_bytes,
        )
