"""The ``faastube`` command.

Subcommands are imported lazily: a function image that installs only the light
client can still run ``faastube --help`` without kopf, gRPC or CUDA installed.
Each subcommand module exposes ``add_arguments(parser)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import faulthandler
import importlib
import logging
import sys
from collections.abc import Sequence

# name -> (module implementing it, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "sidecar": ("faastube_sidecar.cli", "run the per-node daemon that owns the GPU memory pools"),
    "demo": ("faastube_bench.demo", "start a sidecar and two function processes, pass tensors, print latencies"),
    "bench": ("faastube_bench.cli", "run a benchmark and write JSON (and plots) under bench/results/"),
    "topology": ("faastube_sidecar.topology_cli", "print this node's GPU topology document"),
    "validate": ("faastube_runtime.validate_cli",
                 "check a workflow: its document, its handlers' imports and signatures, make_input()"),
    "run": ("faastube_runtime.cli", "run a workflow locally: sidecar, gateway and one process per function"),
    "worker": ("faastube_runtime.worker_cli", "serve one function of a workflow (a function pod's command)"),
    "gateway": ("faastube_runtime.gateway_cli", "serve a workflow's POST /invoke in front of its workers"),
    "place": ("faastube_operator.place_cli", "place a workflow's functions on nodes' GPUs and print the cost"),
    "operator": ("faastube_operator.cli", "run the Kubernetes operator (kopf)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="faastube", description="FaaSTube: GPU data passing for serverless ML workflows.",
        epilog="Run 'faastube COMMAND --help' for a command's options.")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    parser.add_argument("--log-format", choices=("text", "json"), default="text")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_module, help_text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def _configure_logging(level: str, fmt: str) -> None:
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise SystemExit(f"faastube: --log-level: unknown level {level!r}")
    if fmt == "json":
        from faastube import logjson

        handler: logging.Handler = logging.StreamHandler()
        handler.setFormatter(logjson.JsonFormatter())
        logging.basicConfig(level=numeric, handlers=[handler])
    else:
        logging.basicConfig(level=numeric, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def main(argv: Sequence[str] | None = None) -> int:
    # A crash in native code (CUDA, a driver) prints the Python stack that led there.
    try:
        faulthandler.enable()
    except (AttributeError, OSError, ValueError):   # stderr is not a real file (captured in tests)
        pass
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # Parse only the global options and the command name; the subcommand parses the rest.
    known, rest = parser.parse_known_args(argv)
    if known.command is None:
        parser.print_help()
        return 2
    module_name, help_text = SUBCOMMANDS[known.command]
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        print(f"faastube {known.command}: needs a component that is not installed ({e}); "
              f"install the matching extra, e.g. pip install 'faastube[dev]'", file=sys.stderr)
        return 2
    sub = argparse.ArgumentParser(prog=f"faastube {known.command}", description=help_text)
    module.add_arguments(sub)
    args = sub.parse_args(rest)
    _configure_logging(known.log_level, known.log_format)
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
