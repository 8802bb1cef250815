"""Section 1, ``http``: the ceiling (raw onnxruntime) vs our server vs a no-op endpoint, per batch
size, measured in interleaved rounds."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from benchmarks.serving.ceiling import ceiling_rounds
from benchmarks.serving.config import BATCHES
from benchmarks.serving.models import bodies_for
from benchmarks.serving.paired import Load, paired, paired_ratio, summary
from benchmarks.serving.servers import noop_server, our_server
from serving.protocol import HEADER_LENGTH
from serving.v2_client import V2Client


def http_section(
    name: str, info: dict[str, Any], repo: Path, args: argparse.Namespace
) -> dict[str, Any]:
    """Starts our server for model ``name``, records its answers to the benchmark's bodies, starts
    the no-op endpoint answering them, and measures the three contenders per batch size; returns
    :func:`summarize_http` of the raw samples."""
    bodies = bodies_for(info)
    raw: dict[str, Any] = {}
    ctx, base = our_server(repo, name, [f"serving.providers={args.providers}"])
    with ctx as ours, V2Client(base, timeout=120.0) as client:
        url = f"{base}/v2/models/{name}/infer"
        answers = {}
        for body, hlen in bodies.values():
            answer = client.post(f"/v2/models/{name}/infer", body, hlen)
            assert answer.status == 200, (answer.status, answer.body[:200])
            answers[len(body)] = (answer.body.hex(), answer.headers[HEADER_LENGTH.lower()])
        with noop_server(answers) as (noop, nbase):
            for rows in BATCHES:
                body, hlen = bodies[rows]
                first, ceiling_round = ceiling_rounds(info, rows, args.ceiling_s, args.providers)

                contenders = {
                    "ceiling": ceiling_round,
                    "ours": Load(f"{name} ours b{rows}", url, body, hlen, rows, [ours.pid]),
                    "noop": Load(
                        f"{name} no-op b{rows}",
                        f"{nbase}/v2/models/{name}/infer",
                        body,
                        hlen,
                        rows,
                        [noop.pid],
                        computes=False,
                    ),
                }
                res = paired(contenders, rows, first["rows_per_s"], args)
                raw[f"b{rows}"] = res
    return summarize_http(raw)


def summarize_http(raw: dict[str, Any]) -> dict[str, Any]:
    """Per batch size: each contender's medians, the ceiling's best layouts, and the paired ratios
    ours/ceiling (images/s), ours/no-op (req/s) and ours/ceiling per server core."""
    out: dict[str, Any] = {"raw": raw}
    for b in BATCHES:
        res = raw[f"b{b}"]
        s = {k: summary(v) for k, v in res.items()}
        s["best_layouts"] = [r["best_layout"] for r in res["ceiling"]]
        s["ratio_ceiling"] = paired_ratio(res["ours"], res["ceiling"], "rows_per_s")
        s["ratio_noop"] = paired_ratio(res["ours"], res["noop"], "requests_per_s")
        s["ratio_ceiling_per_core"] = s["ours"]["rows_per_core_s"] / s["ceiling"]["rows_per_core_s"]
        out[f"b{b}"] = s
    return out
