"""The table of ``async_vs_sync.py``: a row per run and side, the medians, the verdict."""

from __future__ import annotations

from typing import Any

from benchmarks.common import median, table
from benchmarks.training.jobs import JobResult


def report(results: dict[str, Any]) -> str:
    """One row per run and side, then the medians; the verdict is on the median of the per-run
    ratios (each async run against the sync run of the same repeat, run just before it)."""
    target = results["target"]
    runs = results.get("runs") or [results["jobs"]]  # older files: one run under "jobs"
    rows, ratios, walls = [], [], []
    # a run without its own sync job (--only async, fewer reused sync runs): the syncs' median
    syncs = [run["sync"] for run in runs if "sync" in run]
    sync_s = [j["seconds_to_target"] for j in syncs if j["seconds_to_target"]]
    sync_wall = [JobResult.from_dict(j["job"]).wall_s for j in syncs]
    for number, run in enumerate(runs, 1):
        sync = run.get("sync")
        reference_s = sync["seconds_to_target"] if sync else (median(sync_s) if sync_s else None)
        reference_wall = JobResult.from_dict(sync["job"]).wall_s if sync else None
        if sync is None and sync_wall:
            reference_wall = median(sync_wall)
        for side in ("sync", "async"):
            j = run.get(side)
            if j is None:
                continue
            job = JobResult.from_dict(j["job"])
            reached = j["versions_to_target"] is not None
            seconds = j["seconds_to_target"]
            ratio = seconds / reference_s if reached and reference_s else None
            wall = job.wall_s / reference_wall if reference_wall else None
            if side == "async":
                ratios.append(ratio)
                walls.append(wall)
            rows.append(
                [
                    number,
                    j["name"],
                    j["versions_to_target"] if reached else f">{len(job.versions)}",
                    j["updates_to_target"] if reached else "-",
                    f"{seconds:.0f}" if reached else f"not reached (best {j['best_acc']:.4f})",
                    f"{ratio:.2f}x" if ratio is not None else "-",
                    f"{job.wall_s:.0f}",
                    f"{wall:.2f}x" if wall is not None else "-",
                ]
            )
    for side in ("sync", "async"):
        sides = [run[side] for run in runs if side in run]
        reached = [j for j in sides if j["versions_to_target"] is not None]
        if len(sides) < 2 or not reached:
            continue
        paired = [r for r in ratios if r is not None] if side == "async" else []
        rows.append(
            [
                "median",
                sides[0]["name"],
                f"{median([j['versions_to_target'] for j in reached]):g}",
                f"{median([j['updates_to_target'] for j in reached]):g}",
                f"{median([j['seconds_to_target'] for j in reached]):.0f}"
                + ("" if len(reached) == len(sides) else f" ({len(reached)}/{len(sides)} reached)"),
                f"{median(paired):.2f}x" if paired else ("1.00x" if side == "sync" else "-"),
                f"{median([JobResult.from_dict(j['job']).wall_s for j in sides]):.0f}",
                f"{median([w for w in walls if w is not None]):.2f}x"
                if side == "async" and any(w is not None for w in walls)
                else "-",
            ]
        )
    reused = results.get("reused", {})
    first = runs[0]
    lines = [
        f"Time to {target:.0%} test accuracy, 25% of the 20 clients 5x slower "
        f"(Ray CPU slots: {results['ray_cpu_slots']}; devices "
        f"{results.get('device_factor', 1.0):g}x slower than a core here); {len(runs)} run(s), "
        "each async run against the sync run just before it (else the syncs' median)"
        + "".join(f"; {side} from an earlier run ({name})" for side, name in reused.items()),
        "",
        *[f"- {first[side]['name']}: {first[side]['settings']}" for side in first],
        "",
        table(
            [
                "run",
                "strategy",
                "versions",
                "client updates",
                "train s to target",
                "vs sync",
                "job wall s",
                "wall vs sync",
            ],
            rows,
        ),
    ]
    if len(ratios) == len(runs) and all(r is not None for r in ratios):
        ratio = median(ratios)  # type: ignore[arg-type]
        verdict = "MET" if ratio <= 0.5 else "NOT met"
        low, high = min(ratios), max(ratios)  # type: ignore[type-var]
        spread = f", runs {low:.2f}x-{high:.2f}x" if len(ratios) > 1 else ""
        lines += [
            "",
            f"Target (async <= 0.5x sync's time): {verdict} (median {ratio:.2f}x{spread})",
        ]
    elif ratios:
        lines += ["", "Target (async <= 0.5x sync's time): NOT met (a run missed the target)"]
    return "\n".join(lines)
