"""``faastube run WORKFLOW.yaml``: run a workflow on this machine and measure it.

Starts a sidecar, one worker process per function replica and the gateway; waits
until every worker is warm (and prints how long each function took); sends
``--requests`` requests on an arrival schedule (or serves until Ctrl-C with
``--requests 0``), prints a latency table, and shuts everything down.

``--nodes N`` runs the workflow over N "nodes" on this machine: N sidecars passing data
to each other over NIXL, the functions placed across them (``nodes``), and prints
which node each function runs on.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import importlib.util
import json
import logging
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from faastube import errors as ft_errors
from faastube import sdk
from faastube_spec.workflow import Workflow, load_workflow

from faastube_runtime import (
    arrivals,
    dag,
    errors,
    gateway_cli,
    handlers,
    loadgen,
    nodes,
    progress,
    report,
)
from faastube_runtime.gateway import GatewayConfig, to_npy
from faastube_runtime.local import LocalOptions, LocalRuntime, check_port_free

logger = logging.getLogger(__name__)

ARRIVALS = ("periodic", "sporadic", "bursty")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("workflow", help="the workflow YAML (handlers resolve next to it)")
    parser.add_argument("--requests", type=int, default=20,
                        help="requests to send (0: serve on --port until Ctrl-C); default 20")
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight at most (default 4)")
    parser.add_argument("--arrival", choices=ARRIVALS, default="periodic",
                        help="arrival pattern of the requests (default periodic)")
    parser.add_argument("--rate", type=float, default=20.0, help="mean requests per second (default 20)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the arrival schedule")
    parser.add_argument("--backend", choices=("host", "cuda", "auto"), default="auto",
                        help="pool memory: host shared memory, CUDA, or CUDA when a GPU is visible")
    parser.add_argument("--passing", choices=sdk.PASSINGS, default="tube",
                        help="tube (through the sidecar's pools) or host-centric (GPU data copied "
                             "through pageable host memory, as host-store platforms do)")
    parser.add_argument("--port", type=int, default=None,
                        help="gateway port (default: any free port; 8080 with --requests 0)")
    parser.add_argument("--host", default="127.0.0.1", help="gateway address (default 127.0.0.1)")
    parser.add_argument("--input", type=Path, default=None,
                        help="an .npy request input (default: make_input() of the entry's handler module)")
    parser.add_argument("--request-timeout", type=float, default=60.0, help="seconds (default 60)")
    parser.add_argument("--call-timeout", type=float, default=30.0, help="seconds per function call (default 30)")
    parser.add_argument("--retries", type=int, default=2, help="extra attempts of a failed call (default 2)")
    parser.add_argument("--json", type=Path, default=None, help="also write the summary as JSON here")
    parser.add_argument("--fail-on-slo", type=float, nargs="?", const=100.0, default=None, metavar="PERCENT",
                        help="exit 3 when fewer than PERCENT of the requests (default 100) answered "
                             "within the workflow's SLO")
    parser.add_argument("--no-autoscale", dest="autoscale", action="store_false",
                        help="keep every function at its starting replica count (at least one): the "
                             "fixed-replica baseline; by default functions with minReplicas/maxReplicas "
                             "follow the load")
    parser.add_argument("--nodes", type=int, default=1, metavar="N",
                        help="run over N \"nodes\" on this machine: a sidecar each, passing data across "
                             "them over NIXL, the GPUs split between them (default 1)")
    parser.add_argument("--node-placement", choices=nodes.NODE_PLACEMENTS, default=None,
                        help="with --nodes: spread (default: the placement's answer if it uses every "
                             "node, else the functions round-robin over the nodes) or cost (the "
                             "placement's answer, as the operator places on a cluster; often one node)")
    gateway_cli.add_limit_arguments(parser)
    gateway_cli.add_autoscale_arguments(parser)


def _validate(args: argparse.Namespace) -> None:
    problems = []
    if args.requests < 0:
        problems.append(f"--requests: must be 0 or more, got {args.requests}")
    if args.concurrency < 1:
        problems.append(f"--concurrency: must be at least 1, got {args.concurrency}")
    if not args.rate > 0:
        problems.append(f"--rate: must be positive, got {args.rate}")
    if args.port is not None and not 0 <= args.port <= 65535:
        problems.append(f"--port: must be in 0..65535, got {args.port}")
    if not args.request_timeout > 0 or not args.call_timeout > 0:
        problems.append("--request-timeout and --call-timeout: must be positive")
    if args.fail_on_slo is not None and not 0 <= args.fail_on_slo <= 100:
        problems.append(f"--fail-on-slo: must be a percentage in 0..100, got {args.fail_on_slo:g}")
    if args.retries < 0:
        problems.append(f"--retries: must be 0 or more, got {args.retries}")
    if args.nodes < 1:
        problems.append(f"--nodes: must be at least 1, got {args.nodes}")
    elif args.nodes == 1 and args.node_placement is not None:
        problems.append("--node-placement has no effect without --nodes 2 or more")
    elif args.nodes > 1 and importlib.util.find_spec("nixl_cu13") is None:
        problems.append(f"--nodes {args.nodes}: passing across nodes needs NIXL, and nixl-cu13 is not "
                        "installed (`make setup` installs it)")
    gateway_cli.limits_config(args, problems)
    gateway_cli.autoscale_config(args, problems)
    if problems:
        raise errors.BadInput("; ".join(problems))


def request_input(workflow: Workflow, path: Path | None) -> np.ndarray:
    """The array every request sends: ``--input``, else the entry module's ``make_input()``."""
    if path is not None:
        try:
            value = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise errors.BadInput(f"--input: cannot read {path} as .npy: {e}") from e
        if not isinstance(value, np.ndarray):
            raise errors.BadInput(f"--input: {path} holds several arrays; give one .npy array")
        return value
    entry = workflow.function(workflow.entry)
    try:
        module = _import_beside(workflow, entry.handler_module)
    except Exception as e:  # noqa: BLE001 - whatever the module raised at import: one line, with where
        raise errors.BadInput(f"cannot import {entry.handler_module!r} to call its make_input(): "
                              f"{handlers.import_problem(e)}; pass --input FILE.npy") from e
    make_input = getattr(module, "make_input", None)
    if make_input is None:
        raise errors.BadInput(f"module {entry.handler_module!r} of the entry function {entry.name!r} "
                              "has no make_input(); pass --input FILE.npy")
    value = make_input()
    if not isinstance(value, np.ndarray):
        raise errors.BadInput(f"{entry.handler_module}.make_input() returned {type(value).__name__}, "
                              "not a NumPy array")
    return value


def _import_beside(workflow: Workflow, module_name: str) -> Any:
    """The handler module next to the workflow, under a private name.

    Examples all call their module ``functions``; one process benchmarking several
    workflows must not get the first one's module back from ``sys.modules``.
    """
    candidate = None if workflow.base_dir is None else workflow.base_dir / (module_name.replace(".", "/") + ".py")
    if candidate is None or not candidate.exists():
        return importlib.import_module(module_name)
    private = f"_faastube_input_{workflow.name.replace('-', '_')}_{module_name.replace('.', '_')}"
    if private in sys.modules:
        return sys.modules[private]
    spec = importlib.util.spec_from_file_location(private, candidate)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {candidate}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[private] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[private]
        raise
    return module


def arrival_offsets(kind: str, count: int, rate_per_s: float, seed: int) -> list[float]:
    """Send times (seconds from the start) of ``count`` requests shaped like the Azure traces."""
    return [float(o) for o in arrivals.offsets(kind, count=count, rate_per_s=rate_per_s, seed=seed)]


async def _serve_forever(runtime: LocalRuntime) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"serving workflow {runtime.workflow.name!r} on {runtime.url}/invoke "
          f"(metrics: {runtime.url}/metrics); Ctrl-C stops", flush=True)
    print(runtime.client_instructions(), flush=True)
    await stop.wait()
    print("stopping", file=sys.stderr)


async def _run(args: argparse.Namespace, workflow: Workflow) -> int:
    port = args.port if args.port is not None else (8080 if args.requests == 0 else 0)
    limits, max_input_bytes = gateway_cli.limits_config(args, [])  # checked in _validate
    autoscale, scale_interval_s = gateway_cli.autoscale_config(args, [])
    options = LocalOptions(
        backend=args.backend, host=args.host, port=port, passing=args.passing, autoscale=args.autoscale,
        autoscale_settings=autoscale, scale_interval_s=scale_interval_s,
        nodes=args.nodes, node_placement=args.node_placement or "spread",
        gateway=GatewayConfig(policy=dag.DagPolicy(request_timeout_s=args.request_timeout,
                                                   call_timeout_s=args.call_timeout,
                                                   max_retries=args.retries),
                              max_input_bytes_in_flight=max_input_bytes, limits=limits))
    check_port_free(args.host, port)  # fail now, not after every worker warmed up
    body = to_npy(request_input(workflow, args.input)) if args.requests else b""
    offsets = arrival_offsets(args.arrival, args.requests, args.rate, args.seed) if args.requests else []
    started = time.monotonic()
    async with LocalRuntime(workflow, options) as runtime:
        print(f"workflow {workflow.name!r}: {len(workflow.functions)} functions, "
              f"{runtime.backend} backend, {args.passing} passing, gateway {runtime.url} "
              f"(started in {time.monotonic() - started:.1f}s, every worker warm)", file=sys.stderr, flush=True)
        if runtime.nodes:
            print(f"{len(runtime.nodes)} nodes ({options.node_placement} placement); each function runs on:\n"
                  f"{nodes.describe(workflow, runtime.placed)}", file=sys.stderr, flush=True)
        print(report.format_warmup({f.name: runtime.warmup.get(f.name, []) for f in workflow.functions}),
              file=sys.stderr, flush=True)
        if args.requests == 0:
            await _serve_forever(runtime)
            return 0
        print(f"sending {args.requests} requests ({args.arrival}, {args.rate:g}/s, "
              f"concurrency {args.concurrency}, {len(body)} B each)", file=sys.stderr, flush=True)
        sent = time.monotonic()
        shown = progress.Progress(args.requests)
        try:
            results = await loadgen.drive(runtime.url, body, offsets, concurrency=args.concurrency,
                                          on_result=shown, timeout_s=args.request_timeout + 10)
        finally:
            shown.close()
        runtime.keep_logs = runtime.keep_logs or not all(r.ok for r in results)  # the workers' logs say why
        summary = report.summarize(results, duration_s=time.monotonic() - sent)
        scaled = runtime.scaling_report()
    slo = report.SloAttainment.of(results, slo_s=workflow.slo_s)
    print(report.format_table(summary), flush=True)
    print(report.format_slo(slo), flush=True)
    print(report.format_scaling(workflow, scaled, autoscale=args.autoscale), flush=True)
    for r in results:
        if not r.ok:
            print(f"request {r.index}: HTTP {r.status}: {r.error}", file=sys.stderr)
            break
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"workflow": workflow.name, "passing": args.passing,
                                         "arrival": args.arrival, "rate_per_s": args.rate,
                                         "autoscale": args.autoscale,
                                         "replicas": {name: s.as_dict() for name, s in scaled.items()},
                                         "nodes": {name: p.node for name, p in runtime.placed.items()},
                                         "slo": slo.as_dict(), **summary.as_dict()}, indent=2))
    if summary.ok != summary.requests:
        return 1
    if args.fail_on_slo is not None and slo.percent < args.fail_on_slo:
        print(f"faastube run: SLO attainment {slo.percent:.1f}% is below --fail-on-slo "
              f"{args.fail_on_slo:g}%", file=sys.stderr)
        return 3
    return 0


def run(args: argparse.Namespace) -> int:
    try:
        _validate(args)
        workflow = load_workflow(args.workflow)
        return asyncio.run(_run(args, workflow))
    except ft_errors.FaastubeError as e:
        print(f"faastube run: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="faastube run", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))
