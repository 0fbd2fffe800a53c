"""`faastube sidecar`: flags -> SidecarSettings -> app.serve."""

from __future__ import annotations

import argparse
import asyncio
import os
from pathlib import Path

from faastube import errors
from faastube.units import parse_duration, parse_size
from faastube_sidecar.pool import PoolLimits

DEFAULT_SOCKET = "/var/run/faastube/faastube.sock"


def _size(text: str) -> int:
    try:
        return parse_size(int(text) if text.isdigit() else text)
    except errors.InvalidRequest as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except errors.InvalidRequest as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port must be in 0..65535, got {port}")
    return port


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--socket", default=os.environ.get("FAASTUBE_SOCKET", DEFAULT_SOCKET),
                        help="Unix socket path, in a directory of its own that pods mount "
                             "(default: $FAASTUBE_SOCKET or %(default)s)")
    parser.add_argument("--backend", choices=("auto", "cuda", "host"), default="auto",
                        help="cuda: GPU pools; host: shared memory only; auto: cuda when a GPU is visible")
    parser.add_argument("--metrics-port", type=_port, default=0, help="Prometheus port (0: off)")
    parser.add_argument("--metrics-host", default="0.0.0.0")
    parser.add_argument("--gpu-pool-max", type=_size, default=16 << 30, metavar="SIZE",
                        help="most memory each GPU's pool may reserve (default 16Gi)")
    parser.add_argument("--gpu-pool-min", type=_size, default=0, metavar="SIZE",
                        help="memory each GPU's pool keeps reserved when idle (default 0)")
    parser.add_argument("--gpu-slab", type=_size, default=512 << 20, metavar="SIZE",
                        help="GPU pool growth step (default 512Mi)")
    parser.add_argument("--host-pool-max", type=_size, default=8 << 30, metavar="SIZE")
    parser.add_argument("--host-slab", type=_size, default=64 << 20, metavar="SIZE")
    parser.add_argument("--idle-release", type=_duration, default=30.0, metavar="DURATION",
                        help="empty slabs idle this long are given back (default 30s)")
    parser.add_argument("--default-ttl", type=_duration, default=600.0, metavar="DURATION",
                        help="lifetime of objects put without a ttl (default 10m)")
    parser.add_argument("--max-clients", type=_positive_int, default=1024)
    parser.add_argument("--max-frame", type=_size, default=1 << 20, metavar="SIZE",
                        help="largest request body accepted (default 1Mi)")
    parser.add_argument("--identity", choices=("local", "kubernetes"), default="local",
                        help="local: trust what clients claim; kubernetes: attest each peer's pod")
    parser.add_argument("--node-name", default=os.environ.get("NODE_NAME"),
                        help="this Kubernetes node's name (default $NODE_NAME)")


def settings_from(args: argparse.Namespace):  # -> SidecarSettings (import deferred: prometheus)
    from faastube_sidecar.app import SidecarSettings

    for name in ("gpu_slab", "host_slab"):
        if getattr(args, name) < 1 << 20:
            raise SystemExit(f"faastube sidecar: --{name.replace('_', '-')} must be at least 1Mi")
    if args.gpu_pool_min > args.gpu_pool_max:
        raise SystemExit("faastube sidecar: --gpu-pool-min is larger than --gpu-pool-max")
    return SidecarSettings(
        socket_path=Path(args.socket), backend=args.backend, metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
        gpu_limits=PoolLimits(args.gpu_slab, args.gpu_pool_max, args.gpu_pool_min, args.idle_release),
        host_limits=PoolLimits(args.host_slab, args.host_pool_max, 0, args.idle_release),
        default_ttl_s=args.default_ttl, max_clients=args.max_clients, max_body_bytes=args.max_frame,
        identity=args.identity, node_name=args.node_name)


def run(args: argparse.Namespace) -> int:
    from faastube_sidecar import app

    settings = settings_from(args)
    attestor = None
    if settings.identity == "kubernetes":
        attestor = _kubernetes_attestor(settings.node_name)
    try:
        asyncio.run(app.serve(settings, attestor=attestor))
    except errors.FaastubeError as e:
        raise SystemExit(f"faastube sidecar: {e}") from None
    return 0


def _kubernetes_attestor(node_name: str | None):
    if not node_name:
        raise SystemExit("faastube sidecar: --identity kubernetes needs --node-name (or $NODE_NAME)")
    from faastube_sidecar import identity

    factory = getattr(identity, "kubernetes_attestor", None)
    if factory is None:
        raise SystemExit("faastube sidecar: this build has no Kubernetes attestor")
    return factory(node_name)
