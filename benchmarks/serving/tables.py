"""The serving benchmark's report: the markdown-ish text tables of every section, with the
ratios and the targets each comparison is held to."""

from __future__ import annotations

import argparse
import time
from typing import Any

from benchmarks.serving.config import BATCHES, CONNECTIONS


def fmt(v: float, digits: int = 0) -> str:
    """``v`` with thousands separators and ``digits`` decimals; ``-`` for NaN."""
    return "-" if v != v else f"{v:,.{digits}f}"


def table(headers: list[str], rows: list[list[str]]) -> str:
    """A text table, first column left-aligned, the others right-aligned."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = "  ".join("-" * w for w in widths)
    out = [line, "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip(), line]
    for r in rows:
        cells = zip(r, widths, strict=True)
        out.append("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(cells)))
    out.append(line)
    return "\n".join(out)


def load_cells(r: dict) -> list[str]:
    """The cells under ``LOAD_HEADERS`` of one load's summary."""
    return [
        fmt(r["requests_per_s"]),
        fmt(r["rows_per_s"]),
        fmt(r["p50_ms"], 1),
        fmt(r["p99_ms"], 1),
        str(r.get("errors", 0)),
        f"{r['client_cores']:.2f}",
        f"{r['server_cores']:.2f}",
        fmt(r["rows_per_core_s"]),
    ]


LOAD_HEADERS = [
    "req/s",
    "images/s",
    "p50 ms",
    "p99 ms",
    "errors",
    "client cores",
    "server cores",
    "img/server core-s",
]


def met(ok: bool) -> str:
    """The verdict of a target."""
    return "met" if ok else "MISSED"


def report(results: dict[str, Any], args: argparse.Namespace) -> str:
    """The whole report of ``results`` (what ``bench.main`` collected) as text."""
    lines = [
        f"# Serving benchmark ({time.strftime('%Y-%m-%d %H:%M')})",
        f"machine: {results['machine']}",
        f"command: {results['command']}",
        f"load: wrk, {CONNECTIONS} closed-loop connections, binary KServe v2 bodies, medians of "
        f"{args.rounds} interleaved rounds; each round: a warm-up of max({args.warmup:g} s, 1.5 x "
        f"the expected latency), then a window of max({args.window:g} s, min(latency, 8 s))",
        "",
    ]
    for name, res in results["models"].items():
        info = res["info"]
        lines.append(f"## {name} ({info['params'] / 1e6:.2f}M params, input {list(info['shape'])})")
        if "http" in res:
            h = res["http"]
            lines.append("")
            lines.append(
                "ceiling (raw onnxruntime in-process, best layout per round; its p50/p99: one "
                "onnxruntime call) vs ours vs a no-op endpoint (same uvicorn settings, 1 worker, "
                "same bodies and answers)"
            )
            rows = []
            for b in BATCHES:
                s = h[f"b{b}"]
                c = s["ceiling"]
                layouts = ", ".join(sorted(set(s["best_layouts"])))
                rows.append(
                    [
                        f"ceiling, batch {b} ({layouts})",
                        "-",
                        fmt(c["rows_per_s"]),
                        fmt(c["p50_ms"], 2),
                        fmt(c["p99_ms"], 2),
                        "-",
                        "-",
                        f"{c['cores']:.2f}",
                        fmt(c["rows_per_core_s"]),
                        "1.00",
                        "-",
                    ]
                )
                o = s["ours"]
                cells = load_cells(o)
                rows.append(
                    [
                        f"ours, batch {b}",
                        *cells,
                        f"{s['ratio_ceiling']:.2f}",
                        f"{s['ratio_noop']:.2f}",
                    ]
                )
                z = s["noop"]
                rows.append([f"no-op, batch {b}", *load_cells(z), "-", "1.00"])
            lines.append(
                table(["contender", *LOAD_HEADERS, "x ceiling img/s", "x no-op req/s"], rows)
            )
            s1, s64 = h["b1"], h["b64"]
            w64, c64 = s64["ratio_ceiling"], s64["ratio_ceiling_per_core"]
            lines.append(
                f"target batch 64 >= 0.8 x ceiling: images/s {w64:.2f} ({met(w64 >= 0.8)}); images "
                f"per server core-second {c64:.2f} ({met(c64 >= 0.8)}) (ceiling per core: its most "
                f"efficient layout; batch 1 per core: {s1['ratio_ceiling_per_core']:.2f})"
            )
            bound = max(s1["ceiling"]["rows_per_core_s"], s64["ceiling"]["rows_per_core_s"])
            noop_core = s1["noop"]["rows_per_core_s"]
            lines.append(
                f"target batch 1 >= 0.6 x no-op req/s: {s1['ratio_noop']:.2f} "
                f"({met(s1['ratio_noop'] >= 0.6)}); any server's bound here: onnxruntime alone "
                f"does {bound:,.0f} images per core-second at its best batch size, "
                f"{bound / noop_core:.2f} x the no-op's {noop_core:,.0f} requests per core-second"
            )
        if "interop" in res:
            lines.append("")
            lines.extend(interop_lines(res["interop"]))
        ray = results.get("ray", {})
        if f"{name}_b1" in ray:
            lines.append("")
            lines.append(
                f"ours vs Ray Serve (2 onnxruntime replicas, @serve.batch <= 64 rows, 1 ms wait); "
                f"Ray: {ray.get('processes', '?')} processes, "
                f"{ray.get('rss_gb', float('nan')):.1f} GB "
                f"RSS, first answer {ray.get('startup_s', float('nan')):.0f} s after ray.init"
            )
            rows = []
            verdict = []
            for b in BATCHES:
                r = ray[f"{name}_b{b}"]
                rows.append([f"ours, batch {b}", *load_cells(r["ours"]), "1.00"])
                rows.append([f"Ray Serve, batch {b}", *load_cells(r["ray"]), f"{r['ratio']:.2f}"])
                ok = (
                    r["ours"]["rows_per_s"] > r["ray"]["rows_per_s"]
                    and r["ours"]["p99_ms"] < r["ray"]["p99_ms"]
                )
                verdict.append(f"batch {b}: {met(ok)}")
            lines.append(table(["server", *LOAD_HEADERS, "x ours img/s"], rows))
            lines.append("target: ours higher throughput and lower p99: " + ", ".join(verdict))
        if "policy" in res:
            p = res["policy"]
            lines.append("")
            lines.append(
                f"least-loaded vs round-robin: 2 engines, e0 slowed {args.slow_factor:g}x "
                "(sleeps), "
                "inline runs off"
            )
            rows = []
            verdict = []
            for b in BATCHES:
                if f"b{b}" not in p:
                    continue
                s = p[f"b{b}"]
                for policy in ("least_loaded", "round_robin"):
                    ratio = f"{s['ratio_p99']:.2f}" if policy == "least_loaded" else "1.00"
                    rows.append([f"{policy}, batch {b}", *load_cells(s[policy]), ratio])
                verdict.append(f"batch {b}: {s['ratio_p99']:.2f} ({met(s['ratio_p99'] <= 1 / 3)})")
            lines.append(table(["policy", *LOAD_HEADERS, "p99 / RR p99"], rows))
            lines.append("target: least-loaded p99 <= 1/3 of round-robin: " + ", ".join(verdict))
        lines.append("")
    if "dispatch" in results:
        d = results["dispatch"]
        lines.append(
            "## dispatcher overhead in-process (null engine: run returns its input; 2 workers)"
        )
        rows = [
            ["Dispatcher.select, least_loaded", d["select_least_loaded"]],
            ["Dispatcher.select, round_robin", d["select_round_robin"]],
            ["pool.infer, blocking caller (queue, worker thread, wake-up)", d["blocking_queued"]],
            ["await pool.infer_async, the API's path, queued", d["async_queued"]],
            ["await pool.infer_async, the API's path, inline on an idle engine", d["async_inline"]],
        ]
        lines.append(
            table(
                ["path (one request at a time, max_queue_delay 0)", "p50 us", "p99 us"],
                [[label, fmt(v["p50_us"], 1), fmt(v["p99_us"], 1)] for label, v in rows],
            )
        )
        cap = d["capacity_32_concurrent"]
        lines.append(
            f"32 concurrent callers, queued path, default 1 ms batching delay: "
            f"{cap['requests_per_s']:,.0f} req/s, {cap['cpu_us_per_request']:.0f} us CPU per "
            "request (all threads)"
        )
        p50 = d["async_queued"]["p50_us"]
        lines.append(f"target: p50 < 100 us (API path, queued): {p50:.0f} us ({met(p50 < 100)})")
    if "ray" in results:
        left = results["ray"].get("leftover", [])
        lines.append("")
        lines.append(
            "Ray after serve.shutdown(); ray.shutdown(): "
            + (
                "no process of this run left (raylet, gcs_server, workers gone)"
                if not left
                else f"STILL ALIVE: {left}"
            )
        )
    return "\n".join(lines)


def interop_lines(r: dict[str, Any]) -> list[str]:
    """The interop table (ours over HTTP and gRPC, Triton over both, the ceiling) and its
    targets."""
    lines = [
        "ours (fedserve-serve, HTTP: wrk 32 connections; gRPC: h2load 4 connections x 8 streams) "
        "vs NVIDIA Triton through PyTriton (2 instances of a 1-thread onnxruntime session, "
        "max_batch_size 64, 1 ms dynamic batching) vs the raw onnxruntime ceiling"
    ]
    rows = []
    for b in BATCHES:
        s = r[f"b{b}"]
        c = s["ceiling"]
        rows.append(
            [f"ceiling, batch {b}", "-", fmt(c["rows_per_s"]), fmt(c["p50_ms"], 2),
             fmt(c["p99_ms"], 2), "-", "-", f"{c['cores']:.2f}", fmt(c["rows_per_core_s"]), "-"]
        )  # fmt: skip
        multi = [k for k in s if k.startswith("ours ") and k.endswith(" vs triton")]
        for key in ("ours http", "ours grpc", *(k.removesuffix(" vs triton") for k in multi),
                    "triton http", "triton grpc"):  # fmt: skip
            proto = key.split()[1]
            if key.startswith("triton"):
                ratio = "1.00"
            elif len(key.split()) == 3:  # ours with front-end processes
                ratio = f"{s[f'{key} vs triton']:.2f}"
            else:
                ratio = f"{s[f'{proto}_vs_triton']:.2f}"
            rows.append([f"{key}, batch {b}", *load_cells(s[key]), ratio])
    lines.append(table(["contender", *LOAD_HEADERS, "x Triton req/s"], rows))
    b1, b64 = r["b1"], r["b64"]
    verdict = []
    for proto in ("http", "grpc"):
        ratio = b1[f"{proto}_vs_triton"]
        p99_ok = b1[f"ours {proto}"]["p99_ms"] <= b1[f"triton {proto}"]["p99_ms"]
        verdict.append(
            f"{proto} batch 1 >= 1.5 x Triton req/s: {ratio:.2f} ({met(ratio >= 1.5)}), p99 <= "
            f"Triton's: {fmt(b1[f'ours {proto}']['p99_ms'], 1)} vs "
            f"{fmt(b1[f'triton {proto}']['p99_ms'], 1)} ms ({met(p99_ok)})"
        )
    for proto in ("http", "grpc"):
        ratio = b64[f"{proto}_vs_ceiling"]
        per_core = b64[f"ours {proto}"]["rows_per_core_s"] / b64["ceiling"]["rows_per_core_s"]
        verdict.append(
            f"{proto} batch 64 >= 0.9 x ceiling: images/s {ratio:.2f} ({met(ratio >= 0.9)}), per "
            f"server core-second {per_core:.2f} ({met(per_core >= 0.9)})"
        )
    g = b1["grpc_vs_http"]
    verdict.append(f"gRPC batch 1 >= HTTP batch 1: {g:.2f} ({met(g >= 1.0)})")
    lines.extend(f"target: {v}" for v in verdict)
    return lines
