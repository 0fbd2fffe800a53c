"""``faastube gateway``: serve one workflow's ``POST /invoke`` in front of its worker pods.

The workflow comes from ``--workflow FILE`` or ``$FAASTUBE_WORKFLOW_DOCUMENT``
(what the operator sets), the sidecar from ``--sidecar`` or ``$FAASTUBE_SOCKET``.
Each function's replicas come from exactly one of:

* ``--function-endpoint NAME=URL`` (repeatable; one flag per replica):
  ``unix:/path``, ``/path``, ``tcp://host:port`` or ``http://host:port``;
* ``--function-service NAME=HOST:PORT``: every address ``HOST`` resolves to is a
  replica listening on ``PORT``, looked up again every ``--resolve-interval``
  seconds (the operator passes each function's headless Service,
  ``<workflow>-<function>.<namespace>.svc``).

The gateway must run on the node whose sidecar holds the workflow's data: refs
are node-local. What one client may cost it is bounded by the limit flags
(``add_limit_arguments``: body size, inputs in flight, header and body timeouts),
which ``faastube run`` takes too.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from aiohttp import web
from faastube import errors as ft_errors
from faastube_autoscale import AutoscaleSettings
from faastube_spec.units import format_size, parse_size
from faastube_spec.workflow import GATEWAY_FUNCTION, Workflow

from faastube_runtime import bodies, dag, discovery, errors, scaling, startup, workflow_source
from faastube_runtime.addresses import MAX_UNIX_PATH_BYTES, Address, parse_address, parse_host_port
from faastube_runtime.gateway import (
    ClientStore,
    Gateway,
    GatewayConfig,
    make_runner,
)
from faastube_runtime.invoker import Replica, WorkerPool
from faastube_runtime.metrics import GatewayMetrics
from faastube_runtime.workflow_source import ENV_SOCKET

logger = logging.getLogger(__name__)

GATEWAY_IDENTITY = GATEWAY_FUNCTION  # the function name the gateway claims at the sidecar
SHUTDOWN_TIMEOUT_S = 10.0


@dataclass(frozen=True, slots=True)
class GatewaySettings:
    workflow: Workflow
    sidecar_socket: str
    host: str = "0.0.0.0"
    port: int = 8080
    endpoints: Mapping[str, tuple[Address, ...]] = field(default_factory=dict)
    services: tuple[discovery.ServiceTarget, ...] = ()
    resolve_interval_s: float = discovery.DEFAULT_INTERVAL_S
    gateway: GatewayConfig = field(default_factory=GatewayConfig)
    startup_timeout_s: float = 60.0
    namespace: str | None = None  # the Workflow's (None: the client's default)
    autoscale: AutoscaleSettings = field(default_factory=AutoscaleSettings)
    scale_interval_s: float = scaling.DEFAULT_INTERVAL_S


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workflow", default=None,
                        help="the Workflow YAML/JSON file (default: $FAASTUBE_WORKFLOW_DOCUMENT)")
    parser.add_argument("--host", default="0.0.0.0", help="address to serve on (default %(default)s)")
    parser.add_argument("--port", type=int, default=8080, help="port to serve on (default %(default)s)")
    parser.add_argument("--sidecar", default=None, help=f"the sidecar's Unix socket (default: ${ENV_SOCKET})")
    parser.add_argument("--namespace", default=None,
                        help="the Workflow's namespace (default: $FAASTUBE_NAMESPACE, else the document's)")
    parser.add_argument("--function-endpoint", action="append", default=[], metavar="NAME=URL",
                        help="a replica of function NAME: unix:/path, /path, tcp://host:port or "
                             "http://host:port (repeat per replica)")
    parser.add_argument("--function-service", action="append", default=[], metavar="NAME=HOST:PORT",
                        help="function NAME's replicas: every address HOST resolves to, on PORT")
    parser.add_argument("--resolve-interval", type=float, default=discovery.DEFAULT_INTERVAL_S,
                        help="seconds between DNS lookups of --function-service names (default %(default)s)")
    parser.add_argument("--request-timeout", type=float, default=60.0, help="seconds (default %(default)s)")
    parser.add_argument("--call-timeout", type=float, default=30.0,
                        help="seconds per function call (default %(default)s)")
    parser.add_argument("--retries", type=int, default=2, help="extra attempts of a failed call (default 2)")
    parser.add_argument("--max-in-flight", type=int, default=256,
                        help="requests served at once; more are answered 503 (default %(default)s)")
    parser.add_argument("--startup-timeout", type=float, default=60.0,
                        help="seconds to wait for the sidecar's socket (default %(default)s)")
    add_limit_arguments(parser)
    add_autoscale_arguments(parser)


def add_autoscale_arguments(parser: argparse.ArgumentParser) -> None:
    """The autoscaler's windows and sampling (also ``faastube run``'s); docs/runtime.md, "Autoscaling"."""
    defaults = AutoscaleSettings()
    group = parser.add_argument_group("autoscaling (functions with minReplicas/maxReplicas)")
    group.add_argument("--stable-window", type=float, default=defaults.stable_window_s, metavar="SECONDS",
                       help="concurrency is averaged over this long to decide (default %(default)s)")
    group.add_argument("--panic-window", type=float, default=defaults.panic_window_s, metavar="SECONDS",
                       help="...and over this long to notice a burst (default %(default)s)")
    group.add_argument("--panic-threshold", type=float, default=defaults.panic_threshold, metavar="RATIO",
                       help="panic when the panic window's load is this many times what the ready "
                            "replicas carry (default %(default)s)")
    group.add_argument("--scale-down-delay", type=float, default=defaults.scale_down_delay_s, metavar="SECONDS",
                       help="scale down only to what every decision of this long allowed (default %(default)s)")
    group.add_argument("--scale-to-zero-grace", type=float, default=defaults.scale_to_zero_grace_s,
                       metavar="SECONDS",
                       help="the last replica goes only after this long without load (default %(default)s)")
    group.add_argument("--scale-interval", type=float, default=scaling.DEFAULT_INTERVAL_S, metavar="SECONDS",
                       help="seconds between load samples and decisions (default %(default)s)")


def autoscale_config(args: argparse.Namespace, problems: list[str]) -> tuple[AutoscaleSettings, float]:
    """The autoscaler's settings and sampling interval from ``add_autoscale_arguments``' flags."""
    settings = AutoscaleSettings(stable_window_s=args.stable_window, panic_window_s=args.panic_window,
                                 panic_threshold=args.panic_threshold, scale_down_delay_s=args.scale_down_delay,
                                 scale_to_zero_grace_s=args.scale_to_zero_grace)
    flags = {"stable_window_s": "--stable-window", "panic_window_s": "--panic-window",
             "panic_threshold": "--panic-threshold", "scale_down_delay_s": "--scale-down-delay",
             "scale_to_zero_grace_s": "--scale-to-zero-grace"}
    for problem in settings.problems():  # named by field: say the flag instead
        for name, flag in flags.items():
            problem = problem.replace(name, flag)
        problems.append(problem)
    if not 0 < args.scale_interval < float("inf"):
        problems.append(f"--scale-interval: must be a positive number of seconds, got {args.scale_interval}")
    return settings, args.scale_interval


def _size(text: str) -> int:
    try:
        return parse_size(int(text) if text.isdigit() else text)
    except ft_errors.InvalidRequest as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_limit_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of what one request may cost the gateway (also ``faastube run``'s)."""
    limits, config = bodies.ReadLimits(), GatewayConfig()
    group = parser.add_argument_group("limits (what one client may cost the gateway)")
    group.add_argument("--max-body-size", type=_size, default=limits.max_body_bytes, metavar="SIZE",
                       help="largest request body, e.g. 300MiB (default "
                            f"{format_size(limits.max_body_bytes)}); larger ones get 413")
    group.add_argument("--max-input-in-flight", type=_size, default=config.max_input_bytes_in_flight,
                       metavar="SIZE",
                       help="input arrays of the requests in flight, together (default "
                            f"{format_size(config.max_input_bytes_in_flight)}); a request that would "
                            "pass it gets 503 before its data is read")
    group.add_argument("--header-timeout", type=float, default=limits.header_timeout_s, metavar="SECONDS",
                       help="close a connection that has sent no complete request head this long after "
                            "it opened or after its last answer (default %(default)s)")
    group.add_argument("--body-idle-timeout", type=float, default=limits.body_idle_timeout_s,
                       metavar="SECONDS",
                       help="answer 408 and close when a body pauses this long (default %(default)s)")
    group.add_argument("--body-timeout", type=float, default=limits.body_timeout_s, metavar="SECONDS",
                       help="answer 408 and close when a body takes longer than this (default %(default)s)")


def limits_config(args: argparse.Namespace, problems: list[str]) -> tuple[bodies.ReadLimits, int]:
    """The read limits and ``max_input_bytes_in_flight`` from ``add_limit_arguments``' flags."""
    if args.max_body_size < 1:
        problems.append(f"--max-body-size: must be at least 1 byte, got {args.max_body_size}")
    if args.max_input_in_flight < args.max_body_size:
        problems.append(f"--max-input-in-flight ({format_size(args.max_input_in_flight)}) must be at least "
                        f"--max-body-size ({format_size(args.max_body_size)})")
    for flag, value in (("--header-timeout", args.header_timeout), ("--body-idle-timeout", args.body_idle_timeout),
                        ("--body-timeout", args.body_timeout)):
        if not 0 < value < float("inf"):
            problems.append(f"{flag}: must be a positive number of seconds, got {value}")
    limits = bodies.ReadLimits(max_body_bytes=args.max_body_size, header_timeout_s=args.header_timeout,
                               body_idle_timeout_s=args.body_idle_timeout, body_timeout_s=args.body_timeout)
    return limits, args.max_input_in_flight


def _split_pair(text: str, *, flag: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name.strip() or not value.strip():
        raise errors.BadInput(f"{flag}: {text!r} is not NAME=VALUE")
    return name.strip(), value.strip()


def _replica_sources(
    workflow: Workflow, endpoint_flags: Sequence[str], service_flags: Sequence[str], problems: list[str],
) -> tuple[dict[str, tuple[Address, ...]], tuple[discovery.ServiceTarget, ...]]:
    known = {f.name for f in workflow.functions}
    known_text = ", ".join(f.name for f in workflow.functions)
    endpoints: dict[str, list[Address]] = {}
    owner: dict[Address, str] = {}
    for text in endpoint_flags:
        try:
            name, value = _split_pair(text, flag="--function-endpoint")
            if name not in known:
                raise errors.BadInput(f"--function-endpoint {text!r}: workflow {workflow.name!r} has no "
                                      f"function {name!r} (it has {known_text})")
            address = parse_address(value, field=f"--function-endpoint {name}")
        except errors.BadInput as e:
            problems.append(str(e))
            continue
        if address in owner:
            problems.append(f"--function-endpoint {text!r}: {address} is already a replica of "
                            f"{owner[address]!r}")
            continue
        owner[address] = name
        endpoints.setdefault(name, []).append(address)
    services: dict[str, discovery.ServiceTarget] = {}
    for text in service_flags:
        try:
            name, value = _split_pair(text, flag="--function-service")
            if name not in known:
                raise errors.BadInput(f"--function-service {text!r}: workflow {workflow.name!r} has no "
                                      f"function {name!r} (it has {known_text})")
            host, port = parse_host_port(value, field=f"--function-service {name}")
        except errors.BadInput as e:
            problems.append(str(e))
            continue
        if name in services:
            problems.append(f"--function-service: function {name!r} is given twice")
        elif name in endpoints:
            problems.append(f"function {name!r}: give either --function-endpoint or "
                            "--function-service, not both")
        else:
            services[name] = discovery.ServiceTarget(name, host, port)
    missing = [f.name for f in workflow.functions if f.name not in endpoints and f.name not in services]
    if missing:
        problems.append(f"no replicas for function(s) {', '.join(missing)}: give --function-endpoint "
                        "NAME=URL or --function-service NAME=HOST:PORT for each")
    return ({name: tuple(a) for name, a in endpoints.items()},
            tuple(services[f.name] for f in workflow.functions if f.name in services))


def build_settings(args: argparse.Namespace, environ: Mapping[str, str]) -> GatewaySettings:
    """The gateway's settings, or ``BadInput`` / ``WorkflowInvalid`` naming every problem."""
    workflow = workflow_source.load(args.workflow, environ)
    problems: list[str] = []
    sidecar = workflow_source.setting(args.sidecar, environ, ENV_SOCKET)
    if sidecar is None:
        problems.append(f"--sidecar: not given and ${ENV_SOCKET} is not set")
    elif len(sidecar.encode()) > MAX_UNIX_PATH_BYTES:
        problems.append(f"--sidecar: {sidecar!r} is longer than {MAX_UNIX_PATH_BYTES} bytes")
    if not 0 <= args.port <= 65535:
        problems.append(f"--port: must be in 0..65535, got {args.port}")
    if not args.host.strip():
        problems.append("--host: empty")
    for flag, value in (("--resolve-interval", args.resolve_interval), ("--request-timeout", args.request_timeout),
                        ("--call-timeout", args.call_timeout)):
        if not value > 0:
            problems.append(f"{flag}: must be positive, got {value}")
    if args.retries < 0:
        problems.append(f"--retries: must be 0 or more, got {args.retries}")
    if args.max_in_flight < 1:
        problems.append(f"--max-in-flight: must be at least 1, got {args.max_in_flight}")
    if not args.startup_timeout >= 0:
        problems.append(f"--startup-timeout: must be 0 or more, got {args.startup_timeout}")
    limits, max_input_bytes = limits_config(args, problems)
    autoscale, scale_interval_s = autoscale_config(args, problems)
    endpoints, services = _replica_sources(workflow, args.function_endpoint, args.function_service, problems)
    if problems or sidecar is None:
        raise errors.BadInput("; ".join(problems))
    policy = dag.DagPolicy(request_timeout_s=args.request_timeout, call_timeout_s=args.call_timeout,
                           max_retries=args.retries)
    return GatewaySettings(
        workflow=workflow, sidecar_socket=sidecar, host=args.host.strip(), port=args.port,
        endpoints=endpoints, services=services, resolve_interval_s=args.resolve_interval,
        gateway=GatewayConfig(policy=policy, max_in_flight=args.max_in_flight,
                              max_input_bytes_in_flight=max_input_bytes, limits=limits),
        startup_timeout_s=args.startup_timeout,
        namespace=workflow_source.namespace(args.namespace, environ, workflow),
        autoscale=autoscale, scale_interval_s=scale_interval_s)


async def serve(settings: GatewaySettings, *, resolver: discovery.Resolver | None = None,
                stop: asyncio.Event | None = None) -> None:
    """Serve until SIGTERM/SIGINT (or ``stop``), then finish in-flight requests and exit."""
    workflow = settings.workflow
    plan = dag.plan_workflow(workflow)
    client = await asyncio.to_thread(startup.connect_sidecar, settings.sidecar_socket,
                                     namespace=settings.namespace, workflow=workflow.name,
                                     function=GATEWAY_IDENTITY,
                                     startup_timeout_s=settings.startup_timeout_s)
    store = ClientStore(client)
    if stop is None:  # the process is ours: signals stop it
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
    static = {name: [Replica(name, i, a) for i, a in enumerate(addresses)]
              for name, addresses in settings.endpoints.items()}
    runner: web.AppRunner | None = None
    try:
        async with contextlib.AsyncExitStack() as stack:
            pool = await stack.enter_async_context(
                WorkerPool(plan, static, discard=store.discard, require_all=False))
            if settings.services:
                await stack.enter_async_context(discovery.ServiceDiscovery(
                    pool, settings.services, resolver=resolver, interval_s=settings.resolve_interval_s))
            metrics = GatewayMetrics.create()
            monitor = await stack.enter_async_context(scaling.ScaleMonitor(
                workflow, pool, settings=settings.autoscale, interval_s=settings.scale_interval_s,
                metrics=metrics))
            gateway = Gateway(workflow.name, plan, pool, store, config=settings.gateway, metrics=metrics,
                              scale=monitor)
            runner = make_runner(gateway, shutdown_timeout_s=SHUTDOWN_TIMEOUT_S)
            await runner.setup()
            site = web.TCPSite(runner, settings.host, settings.port)
            try:
                await site.start()
            except OSError as e:
                raise errors.BadInput(f"--port: cannot listen on {settings.host}:{settings.port}: "
                                      f"{e.strerror or e}") from e
            counts = ", ".join(f"{f.name}={len(pool.replicas(f.name))}" for f in workflow.functions)
            logger.info("gateway of workflow %s serving on %s; replicas %s", workflow.name,
                        runner.addresses, counts)
            await stop.wait()
            logger.info("stopping: finishing in-flight requests")
            await runner.cleanup()  # before the pool closes: requests still use it
            runner = None
    finally:
        if runner is not None:
            await runner.cleanup()
        store.close()
        client.close()


def run(args: argparse.Namespace) -> int:
    try:
        settings = build_settings(args, os.environ)
        asyncio.run(serve(settings))
    except ft_errors.FaastubeError as e:
        print(f"faastube gateway: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0
