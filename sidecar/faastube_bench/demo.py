"""`faastube demo`: a sidecar and two function processes pass tensors; print latencies.

Uses the CUDA backend where a GPU is visible (same GPU, and GPU to GPU when there
are two), the shared-memory host backend elsewhere.
"""

from __future__ import annotations

import argparse

from faastube_bench import dataplane

MB = dataplane.MB


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes-mb", type=int, nargs="+", default=[1, 10, 100])
    parser.add_argument("--iterations", type=int, default=20)


def run(args: argparse.Namespace) -> int:
    if any(s <= 0 or s > 1024 for s in args.sizes_mb) or args.iterations < 1:
        raise SystemExit("faastube demo: --sizes-mb must be in 1..1024 and --iterations >= 1")
    print("faastube demo: starting a sidecar and two function processes ...")
    report = dataplane.run_benchmark(sizes=[s * MB for s in args.sizes_mb], iters=args.iterations, warmup=3,
                                     baselines=False, log=lambda line: print(line, flush=True))
    report.pop("targets", None)
    print()
    print(dataplane.format_table(report))
    return 0
