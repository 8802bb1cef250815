"""Triton's inference metrics (``nv_inference_*``), rendered from the per-version statistics.

Names, help texts, types and units are Triton's (its ``metrics.md``), so dashboards and alerts
made for Triton read our ``/metrics`` unchanged; labels are ``model`` and ``version``. Each value is
cumulative and comes from that version's statistics object (``pool.stats``, whose ``to_triton()`` is
one entry of Triton's ``model_stats``, :mod:`serving.statistics`), read at scrape time from the
loaded pools, so the series of a version vanish when it unloads:

====================================================  ==========================================
``nv_inference_request_success``                      ``inference_stats.success.count``
``nv_inference_request_failure``                      ``inference_stats.fail.count``
``nv_inference_count``                                ``inference_count`` (rows inferred)
``nv_inference_exec_count``                           ``execution_count`` (batches run)
``nv_inference_request_duration_us``                  ``inference_stats.success.ns`` / 1000
``nv_inference_queue_duration_us``                    ``inference_stats.queue.ns`` / 1000
``nv_inference_compute_input_duration_us``            ``inference_stats.compute_input.ns`` / 1000
``nv_inference_compute_infer_duration_us``            ``inference_stats.compute_infer.ns`` / 1000
``nv_inference_compute_output_duration_us``           ``inference_stats.compute_output.ns`` / 1000
====================================================  ==========================================

Triton's counters carry no ``_total`` suffix (prometheus_client would add one), so this module
writes the text exposition itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

Stats = Mapping[str, Any]

#: (name, help, value of one model_stats entry), in Triton's order
TRITON_COUNTERS: list[tuple[str, str, Callable[[Stats], float]]] = [
    (
        "nv_inference_request_success",
        "Number of successful inference requests, all batch sizes",
        lambda s: s["inference_stats"]["success"]["count"],
    ),
    (
        "nv_inference_request_failure",
        "Number of failed inference requests, all batch sizes",
        lambda s: s["inference_stats"]["fail"]["count"],
    ),
    (
        "nv_inference_count",
        "Number of inferences performed (does not include cached requests)",
        lambda s: s["inference_count"],
    ),
    (
        "nv_inference_exec_count",
        "Number of model executions performed (does not include cached requests)",
        lambda s: s["execution_count"],
    ),
    (
        "nv_inference_request_duration_us",
        "Cumulative inference request duration in microseconds (includes cached requests)",
        lambda s: s["inference_stats"]["success"]["ns"] // 1000,
    ),
    (
        "nv_inference_queue_duration_us",
        "Cumulative inference queuing duration in microseconds (includes cached requests)",
        lambda s: s["inference_stats"]["queue"]["ns"] // 1000,
    ),
    (
        "nv_inference_compute_input_duration_us",
        "Cumulative compute input duration in microseconds (does not include cached requests)",
        lambda s: s["inference_stats"]["compute_input"]["ns"] // 1000,
    ),
    (
        "nv_inference_compute_infer_duration_us",
        "Cumulative compute inference duration in microseconds (does not include cached requests)",
        lambda s: s["inference_stats"]["compute_infer"]["ns"] // 1000,
    ),
    (
        "nv_inference_compute_output_duration_us",
        "Cumulative inference compute output duration in microseconds (does not include cached "
        "requests)",
        lambda s: s["inference_stats"]["compute_output"]["ns"] // 1000,
    ),
]


def version_stats(pools: Iterable[Any]) -> list[Stats]:
    """Triton's ``model_stats`` entry of each pool (loaded version) that keeps statistics."""
    out = []
    for pool in pools:
        stats = getattr(pool, "stats", None)
        if stats is not None:
            out.append(stats.to_triton())
    return out


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def render_triton_metrics(pools: Iterable[Any]) -> bytes:
    """The ``nv_inference_*`` counters of ``pools`` in Prometheus' text format."""
    entries = sorted(version_stats(pools), key=lambda s: (s["name"], int(s["version"])))
    if not entries:
        return b""
    lines = []
    for name, help_text, value in TRITON_COUNTERS:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} counter")
        for stats in entries:
            labels = f'model="{_label(stats["name"])}",version="{_label(str(stats["version"]))}"'
            lines.append(f"{name}{{{labels}}} {int(value(stats))}")
    return ("\n".join(lines) + "\n").encode()
