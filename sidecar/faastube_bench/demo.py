"""`faastube demo`: a sidecar and two function processes pass tensors; print latencies.

Uses the CUDA backend where a GPU is visible (same GPU, and GPU to GPU when there
are two), the shared-memory host backend elsewhere. The data-plane benchmark with
only the tube's put+get and the floor; `faastube bench dataplane` is the full one.
"""

from __future__ import annotations

import argparse

from faastube_bench import dataplane
from faastube_bench import dataplane_report as report

MB = 1_000_000


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes-mb", type=int, nargs="+", default=[1, 10, 100])
    parser.add_argument("--iterations", type=int, default=20)


def run(args: argparse.Namespace) -> int:
    if any(s <= 0 or s > 1024 for s in args.sizes_mb) or args.iterations < 1:
        raise SystemExit("faastube demo: --sizes-mb must be in 1..1024 and --iterations >= 1")
    print("faastube demo: starting a sidecar and two function processes ...")
    gpus = dataplane.gpu_count()
    backend = "cuda" if gpus else "host"
    patterns = ((report.SAME_GPU, report.GPU_GPU) if gpus >= 2 else (report.SAME_GPU,)) if gpus else (report.HOST,)
    cfg = dataplane.Config(
        backend=backend, patterns=patterns, methods=(report.TUBE_PUT, report.FLOOR),
        sizes=tuple(s * MB for s in args.sizes_mb), pairs=(), warmup=3, max_passes=args.iterations,
        min_passes=args.iterations, cell_budget_s=0.0, floor_passes=100, pings=0, loop_s=0.0, spin_us=0.0,
        sidecar_spin_us=0.0, loop="auto", quick=True)
    bench = dataplane.Run(cfg, log=lambda line: print(line, flush=True))
    bench.execute()
    print()
    print(report.format_table(bench.measurements()))
    return 0
