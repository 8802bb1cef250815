"""Section 3, ``policy``: least-loaded vs round-robin dispatch when one of the two engines is
slower (it sleeps after each run: slower without taking CPU from the other)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from benchmarks.serving.config import BATCHES
from benchmarks.serving.models import bodies_for
from benchmarks.serving.paired import Load, paired, paired_ratio, summary
from benchmarks.serving.servers import slow_servers


def policy_section(
    name: str,
    info: dict[str, Any],
    repo: Path,
    expected: dict[int, float],
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Two slowed servers of model ``name`` (e0 ``args.slow_factor`` x slower), one per policy,
    measured in interleaved rounds per batch size (ResNet-18: batch 1 only unless
    ``args.policy_resnet_b64``); per batch: raw samples, medians and the paired ratio of p99s
    least-loaded / round-robin. ``expected`` is the ceiling's images/s per batch size."""
    bodies = bodies_for(info)
    out: dict[str, Any] = {}
    batches = [1] if name == "resnet18" and not args.policy_resnet_b64 else list(BATCHES)
    policies = ("least_loaded", "round_robin")
    with slow_servers(repo, name, policies, args.slow_factor, args.providers) as servers:
        for rows in batches:
            body, hlen = bodies[rows]
            contenders = {
                policy: Load(f"{name} {policy} b{rows}", url, body, hlen, rows, [proc.pid])
                for policy, (url, proc) in servers.items()
            }
            # warm-up and window sized for round-robin, the slower one: its queue builds up on the
            # slow engine over several of that engine's batches (~0.2 x the ceiling here)
            raw = paired(contenders, rows, expected[rows] * 0.15, args)
            out[f"b{rows}"] = {
                "raw": raw,
                "least_loaded": summary(raw["least_loaded"]),
                "round_robin": summary(raw["round_robin"]),
                "ratio_p99": paired_ratio(raw["least_loaded"], raw["round_robin"], "p99_ms"),
            }
    return out
