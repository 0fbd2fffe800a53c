"""Wiring of the sidecar daemon: build the services from settings and run them.

Nothing here decides anything: the CLI parses flags into `SidecarSettings`, and this
module connects backend -> data plane -> dispatch -> server, plus metrics and the
optional Kubernetes pieces (device plugin, node publishing), and handles signals.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import CollectorRegistry, start_http_server

from faastube_sidecar.backends import create_backend, cuda_visible
from faastube_sidecar.dataplane import DataPlane, DataPlaneConfig
from faastube_sidecar.dispatch import Dispatcher
from faastube_sidecar.identity import Attestor, ClaimAttestor
from faastube_sidecar.metrics import SidecarMetrics
from faastube_sidecar.pool import PoolLimits
from faastube_sidecar.server import ServerConfig, SidecarServer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SidecarSettings:
    socket_path: Path
    backend: str = "auto"                     # auto | cuda | host
    metrics_port: int = 0                     # 0: no metrics endpoint
    metrics_host: str = "0.0.0.0"
    gpu_limits: PoolLimits = PoolLimits(slab_bytes=512 << 20, max_bytes=16 << 30)
    host_limits: PoolLimits = PoolLimits(slab_bytes=64 << 20, max_bytes=8 << 30)
    default_ttl_s: float = 600.0
    max_clients: int = 1024
    max_body_bytes: int = 1 << 20
    identity: str = "local"                   # local | kubernetes
    node_name: str | None = None
    extra: dict[str, object] = field(default_factory=dict)


def resolve_backend(name: str) -> str:
    if name == "auto":
        return "cuda" if cuda_visible() else "host"
    return name


def build(settings: SidecarSettings, *, registry: CollectorRegistry | None = None,
          attestor: Attestor | None = None) -> SidecarServer:
    backend_name = resolve_backend(settings.backend)
    options = {"pool_max_bytes": settings.gpu_limits.max_bytes} if backend_name == "cuda" else {}
    backend = create_backend(backend_name, **options)
    metrics = SidecarMetrics(registry or CollectorRegistry())
    config = DataPlaneConfig(default_ttl_s=settings.default_ttl_s, host_limits=settings.host_limits,
                             gpu_limits=settings.gpu_limits)
    dataplane = DataPlane(backend, config, observer=metrics)
    metrics.watch(dataplane)
    dispatcher = Dispatcher(dataplane, attestor or ClaimAttestor(), metrics)
    server_config = ServerConfig(settings.socket_path, max_clients=settings.max_clients,
                                 max_body_bytes=settings.max_body_bytes)
    return SidecarServer(server_config, dispatcher, metrics)


async def serve(settings: SidecarSettings, *, attestor: Attestor | None = None) -> None:
    registry = CollectorRegistry()
    server = build(settings, registry=registry, attestor=attestor)
    server.bind()
    if settings.metrics_port:
        start_http_server(settings.metrics_port, addr=settings.metrics_host, registry=registry)
        logger.info("metrics on http://%s:%d/metrics", settings.metrics_host, settings.metrics_port)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, server.stop)
    try:
        await server.serve()
    finally:
        server.dataplane.close()
        server.dataplane.backend.close()
