"""Placement benchmark: time and quality of ``place`` (no GPU needed).

Two parts:

1. Speed at the target size: 16-function random workflows on clusters of 8 nodes with
   8 GPUs each (goal: <= 200 ms per placement), for the heuristic alone and with the
   exact phase's default budget.
2. Quality on instances small enough to enumerate: ratio of ``place``'s cost to the
   optimum from ``brute_force`` (goal: <= 1.05 on every instance).

Prints a table and writes ``bench/results/placement.json``.

    .venv/bin/python bench/placement_bench.py [--seeds 10] [--out bench/results/placement.json]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from faastube_placement import core as placement
from faastube_placement import instances as pi
from faastube_spec import topology
from faastube_spec.topology import ClusterTopology, NetworkLink

GIB = 2**30
CLUSTERS_8X8 = {
    "8x dgx1-v100": ["dgx1-v100"] * 8,
    "8x dgx-h100": ["dgx-h100"] * 8,
    "8x 8x-l40s": ["8x-l40s"] * 8,
    "mixed (v100, a100, l40s, h100) x2": ["dgx1-v100", "dgx-a100", "8x-l40s", "dgx-h100"] * 2,
}


def _timed(fn: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def _timed_both(fn: Any) -> tuple[Any, float, float]:
    """Wall and CPU seconds: on a shared machine the wall time includes others' load."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def speed(seeds: int) -> list[dict[str, Any]]:
    rows = []
    for label, kinds in CLUSTERS_8X8.items():
        cluster = pi.cluster_of(kinds)
        for budget_label, budget in (("heuristic", 0), ("default", placement.DEFAULT_EXACT_BUDGET)):
            times, cpu_times, costs, gaps, proven = [], [], [], [], 0
            for seed in range(seeds):
                workflow = pi.random_workflow(random.Random(seed), functions=16, max_replicas=2,
                                              max_memory_bytes=12 * GIB)
                result, elapsed, cpu = _timed_both(
                    functools.partial(placement.place, workflow, cluster, exact_budget=budget))
                times.append(elapsed)
                cpu_times.append(cpu)
                costs.append(result.cost_s)
                if result.lower_bound_s:
                    gaps.append(result.cost_s / result.lower_bound_s)
                proven += result.proven_optimal
            rows.append({
                "cluster": label, "functions": 16, "nodes": 8, "gpusPerNode": 8, "search": budget_label,
                "instances": seeds,
                "medianMs": 1e3 * statistics.median(times), "maxMs": 1e3 * max(times),
                "medianCpuMs": 1e3 * statistics.median(cpu_times), "maxCpuMs": 1e3 * max(cpu_times),
                "meanCostSeconds": statistics.fmean(costs),
                "maxCostOverLowerBound": max(gaps) if gaps else None,
                "provenOptimal": proven,
            })
    return rows


def _small_clusters() -> dict[str, ClusterTopology]:
    v100 = topology.builtin_node("dgx1-v100")
    l40s = topology.builtin_node("8x-l40s")
    h100 = topology.builtin_node("dgx-h100")
    a10 = topology.builtin_node("4x-a10")
    return {
        "v100 {0,1,3,5}": ClusterTopology(nodes=(pi.subset_node(v100, [0, 1, 3, 5], name="v"),)),
        "l40s {0..4}": ClusterTopology(nodes=(pi.subset_node(l40s, [0, 1, 2, 3, 4], name="l"),)),
        "v100x2 + h100x2": ClusterTopology(
            nodes=(pi.subset_node(v100, [0, 4], name="v"), pi.subset_node(h100, [0, 1], name="h")),
            network_links=(NetworkLink("v", "h", 12.5e9, 2e-5),)),
        "a10x2 + l40sx2 + a10x1": ClusterTopology(
            nodes=(pi.subset_node(a10, [0, 1], name="a"), pi.subset_node(l40s, [0, 1], name="l"),
                   pi.subset_node(a10, [2], name="b"))),
    }


def quality(seeds: int) -> list[dict[str, Any]]:
    rows = []
    for label, cluster in _small_clusters().items():
        ratios: dict[str, list[float]] = {"heuristic": [], "default": []}
        times: dict[str, list[float]] = {"heuristic": [], "default": []}
        brute_times = []
        for seed in range(seeds):
            rng = random.Random(f"{label}/{seed}")
            workflow = pi.random_workflow(rng, functions=rng.randint(4, 6), max_replicas=2,
                                          max_memory_bytes=16 * GIB, edge_probability=0.4)
            try:
                best, t_brute = _timed(functools.partial(placement.brute_force, workflow, cluster))
            except placement.PlacementError:
                continue
            brute_times.append(t_brute)
            for name, budget in (("heuristic", 0), ("default", placement.DEFAULT_EXACT_BUDGET)):
                found, elapsed = _timed(
                    functools.partial(placement.place, workflow, cluster, exact_budget=budget))
                times[name].append(elapsed)
                ratios[name].append(found.cost_s / best.cost_s if best.cost_s > 0 else
                                    (1.0 if found.cost_s == 0 else float("inf")))
        for name in ("heuristic", "default"):
            if not ratios[name]:
                continue
            rows.append({
                "cluster": label, "search": name, "instances": len(ratios[name]),
                "maxCostOverOptimum": max(ratios[name]),
                "meanCostOverOptimum": statistics.fmean(ratios[name]),
                "within5Percent": sum(r <= 1.05 + 1e-12 for r in ratios[name]),
                "medianMs": 1e3 * statistics.median(times[name]),
                "bruteForceMedianMs": 1e3 * statistics.median(brute_times),
            })
    return rows


def _print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    def cell(value: Any) -> str:
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    widths = [max(len(c), *(len(cell(r.get(c))) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in rows:
        print("  ".join(cell(row.get(c)).ljust(w) for c, w in zip(columns, widths)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10, help="instances per cluster (default 10)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "placement.json"))
    args = parser.parse_args(argv)
    speed_rows = speed(args.seeds)
    print("Speed: 16 functions, 8 nodes x 8 GPUs (goal: max <= 200 ms)")
    _print_table(speed_rows, ["cluster", "search", "instances", "medianMs", "maxMs", "medianCpuMs", "maxCpuMs",
                              "maxCostOverLowerBound", "provenOptimal"])
    quality_rows = quality(args.seeds * 3)
    print("\nQuality vs brute force on small instances (goal: max cost/optimum <= 1.05)")
    _print_table(quality_rows, ["cluster", "search", "instances", "maxCostOverOptimum",
                                "meanCostOverOptimum", "within5Percent", "medianMs", "bruteForceMedianMs"])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "benchmark": "placement",
        "loadAverage": list(os.getloadavg()), "cpus": os.cpu_count(),
        "python": sys.version.split()[0], "machine": platform.machine(), "processor": platform.processor(),
        "speed": speed_rows, "quality": quality_rows,
    }, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
