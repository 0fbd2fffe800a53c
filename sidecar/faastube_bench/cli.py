"""`faastube bench <name>`: the benchmarks, each writing JSON under bench/results/."""

from __future__ import annotations

import argparse
import importlib

BENCHMARKS = {
    "dataplane": ("faastube_bench.dataplane", "put+get latency between function processes vs host-centric and raw copies"),
    "transfers": ("faastube_bench.transfers", "host<->GPU multi-path bandwidth, isolation and SLO sharing"),
    "e2e": ("faastube_bench.e2e", "the example workflows end to end, tube vs host-centric passing"),
    "memory": ("faastube_bench.memory", "GPU pool memory vs live bytes, and P99 under memory pressure, per policy"),
    "network": ("faastube_bench.network", "a get across two nodes' sidecars vs raw NIXL and host-centric passing"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    for name, (module, help_text) in BENCHMARKS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        try:
            importlib.import_module(module).add_arguments(p)
        except ImportError:
            p.set_defaults(_missing=True)


def run(args: argparse.Namespace) -> int:
    if getattr(args, "_missing", False):
        raise SystemExit(f"faastube bench {args.benchmark}: this benchmark's dependencies are not installed")
    return int(importlib.import_module(args._module).run(args) or 0)
