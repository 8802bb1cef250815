"""Triton's ``nv_inference_*`` metrics rendered from per-version statistics (Triton's
``model_stats`` shape): names, types, labels, units, and gone with the version."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from serving.triton_metrics import TRITON_COUNTERS, render_triton_metrics


def stats(name: str, version: int, success: int, fail: int, rows: int, batches: int) -> Any:
    def duration(count: int, ns: int) -> dict[str, int]:
        return {"count": count, "ns": ns}

    doc = {
        "name": name,
        "version": str(version),
        "last_inference": 1_700_000_000_000,
        "inference_count": rows,
        "execution_count": batches,
        "inference_stats": {
            "success": duration(success, success * 2_500_000),
            "fail": duration(fail, fail * 1_000_000),
            "queue": duration(success, success * 400_000),
            "compute_input": duration(batches, batches * 10_000),
            "compute_infer": duration(batches, batches * 1_200_000),
            "compute_output": duration(batches, batches * 20_000),
            "cache_hit": duration(0, 0),
            "cache_miss": duration(0, 0),
        },
        "batch_stats": [],
    }
    return SimpleNamespace(stats=SimpleNamespace(to_triton=lambda: doc))


def test_nv_inference_counters_as_triton_defines_them() -> None:
    pools = [stats("mnist", 2, 10, 3, 40, 7), stats("mnist", 1, 1, 0, 1, 1), SimpleNamespace()]
    text = render_triton_metrics(pools).decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert set(families) == {name for name, _, _ in TRITON_COUNTERS}
    for family in families.values():
        assert family.type == "counter"
    # exactly Triton's sample names: no _total suffix
    assert 'nv_inference_request_success{model="mnist",version="2"} 10' in text
    assert 'nv_inference_request_failure{model="mnist",version="2"} 3' in text
    assert 'nv_inference_count{model="mnist",version="2"} 40' in text
    assert 'nv_inference_exec_count{model="mnist",version="2"} 7' in text
    assert 'nv_inference_request_duration_us{model="mnist",version="2"} 25000' in text
    assert 'nv_inference_queue_duration_us{model="mnist",version="2"} 4000' in text
    assert 'nv_inference_compute_infer_duration_us{model="mnist",version="2"} 8400' in text
    assert 'nv_inference_compute_input_duration_us{model="mnist",version="1"} 10' in text
    assert 'nv_inference_compute_output_duration_us{model="mnist",version="1"} 20' in text
    # a version that unloaded is simply not among the pools: its series are gone
    assert 'version="1"' not in render_triton_metrics(pools[:1]).decode()
    assert render_triton_metrics([]) == b""
