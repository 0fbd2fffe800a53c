"""Wiring of the sidecar daemon: build the services from settings and run them.

Nothing here decides anything: the CLI parses flags into `SidecarSettings`, and this
module connects backend -> data plane -> dispatch -> server, plus metrics and the
optional Kubernetes pieces (device plugin, node publishing, attestation: see ``kube``),
and handles signals.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from faastube.errors import FaastubeError
from faastube.locations import gpu
from prometheus_client import CollectorRegistry, start_http_server

from faastube_sidecar.backends import Backend, create_backend, cuda_visible
from faastube_sidecar.dataplane import (
    DEFAULT_GPU_LIMITS,
    DEFAULT_HOST_LIMITS,
    DEFAULT_MEMORY_POLICY,
    DEFAULT_TTL_S,
    DataPlane,
    DataPlaneConfig,
)
from faastube_sidecar.devicememory import DeviceMemory, NvmlMemory, SimulatedMemory
from faastube_sidecar.dispatch import Dispatcher
from faastube_sidecar.elastic import MemoryPolicy
from faastube_sidecar.identity import Attestor, ClaimAttestor
from faastube_sidecar.kube import KubernetesPieces, KubeSettings
from faastube_sidecar.metrics import SidecarMetrics
from faastube_sidecar.pool import PoolLimits
from faastube_sidecar.server import ServerConfig, SidecarServer

if TYPE_CHECKING:   # grpc and NIXL load only when cross-node passing is on
    from faastube_sidecar.network.pieces import NetworkPieces, NetworkSettings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SidecarSettings:
    socket_path: Path
    backend: str = "auto"                     # auto | cuda | host
    copy_events: bool = True                  # GPU gets reply before their copy ends (IPC events)
    multipath: bool = True                    # large host<->GPU copies over several PCIe links
    metrics_port: int = 0                     # 0: no metrics endpoint
    metrics_host: str = "0.0.0.0"
    gpu_limits: PoolLimits = DEFAULT_GPU_LIMITS
    host_limits: PoolLimits = DEFAULT_HOST_LIMITS
    default_ttl_s: float = DEFAULT_TTL_S
    max_clients: int = 8192
    socket_mode: int = 0o660
    socket_group: int | None = None
    hello_timeout_s: float = 5.0
    max_body_bytes: int = 1 << 20
    identity: str = "local"                   # local | kubernetes
    node_name: str | None = None
    kube: KubeSettings = field(default_factory=KubeSettings)
    shutdown_timeout_s: float = 10.0
    memory: MemoryPolicy = DEFAULT_MEMORY_POLICY
    simulated_gpus: int = 0                   # host backend: GPU locations of shared memory
    simulated_gpu_bytes: int = 4 << 30
    simulated_gpu_busy_bytes: int = 0         # held by "other processes" on each simulated GPU
    network: NetworkSettings | None = None    # cross-node passing (--peer-port)

    @property
    def uses_kubernetes(self) -> bool:
        return self.identity == "kubernetes" or self.kube.needs_topology


def resolve_backend(name: str) -> str:
    if name == "auto":
        return "cuda" if cuda_visible() else "host"
    return name


def build(settings: SidecarSettings, *, registry: CollectorRegistry | None = None,
          attestor: Attestor | None = None) -> SidecarServer:
    backend_name = resolve_backend(settings.backend)
    options: dict[str, object] = {}
    if backend_name == "cuda":
        options = {"pool_max_bytes": settings.gpu_limits.max_bytes, "copy_events": settings.copy_events,
                   "multipath": settings.multipath}
    simulated = _simulated_memory(settings)
    if simulated is not None:
        options = {"simulated_gpus": settings.simulated_gpus, "memory": simulated}
    backend = create_backend(backend_name, **options)
    metrics = SidecarMetrics(registry or CollectorRegistry())
    config = DataPlaneConfig(default_ttl_s=settings.default_ttl_s, host_limits=settings.host_limits,
                             gpu_limits=settings.gpu_limits, memory=settings.memory)
    device_memory = simulated if simulated is not None else _nvml_memory(backend, settings)
    dataplane = DataPlane(backend, config, observer=metrics, device_memory=device_memory)
    if isinstance(device_memory, SimulatedMemory):
        device_memory.used_by_us = lambda index: dataplane.budgets[gpu(index)].total
    dataplane.refresh_memory()
    metrics.watch(dataplane)
    dispatcher = Dispatcher(dataplane, attestor or ClaimAttestor(), metrics)
    server_config = ServerConfig(settings.socket_path, max_clients=settings.max_clients,
                                 socket_mode=settings.socket_mode, socket_group=settings.socket_group,
                                 hello_timeout_s=settings.hello_timeout_s,
                                 max_body_bytes=settings.max_body_bytes)
    return SidecarServer(server_config, dispatcher, metrics)


def _simulated_memory(settings: SidecarSettings) -> SimulatedMemory | None:
    if not settings.simulated_gpus:
        return None
    return SimulatedMemory(settings.simulated_gpus, settings.simulated_gpu_bytes,
                           others_bytes={i: settings.simulated_gpu_busy_bytes for i in range(settings.simulated_gpus)})


def _nvml_memory(backend: Backend, settings: SidecarSettings) -> DeviceMemory | None:
    """Where the elastic policy reads the GPUs' free memory."""
    bus_ids = backend.gpu_bus_ids()
    if not bus_ids or not settings.memory.elastic:
        return None
    try:
        return NvmlMemory(bus_ids)
    except Exception as e:  # noqa: BLE001 - the pools then stay within --gpu-pool-max only: say so
        logger.warning("cannot read the GPUs' free memory through NVML (%s): the pools' cap is "
                       "--gpu-pool-max, whatever else the GPUs hold", e)
        return None


class MetricsPortUnavailable(FaastubeError):
    """The metrics address can't be bound (in use, or not this host's); another port is the fix."""


def _start_metrics(settings: SidecarSettings, registry: CollectorRegistry):  # -> WSGIServer
    try:
        httpd, _ = start_http_server(settings.metrics_port, addr=settings.metrics_host, registry=registry)
    except OSError as e:
        raise MetricsPortUnavailable(f"--metrics-port {settings.metrics_port} on {settings.metrics_host}: "
                                     f"{e.strerror or e}") from e
    return httpd


async def serve(settings: SidecarSettings, *, attestor: Attestor | None = None) -> None:
    """Run until SIGTERM/SIGINT. Startup: Kubernetes setup (may fail on configuration), bind,
    then plugin and publisher. Shutdown in reverse: the plugin stops advertising first."""
    kube: KubernetesPieces | None = None
    if settings.uses_kubernetes:
        kube = KubernetesPieces.prepare(settings.kube, node_name=settings.node_name,
                                        attest=settings.identity == "kubernetes")
        if attestor is None and settings.identity == "kubernetes":
            attestor = kube.attestor()
    _raise_fd_limit(settings.max_clients)
    registry = CollectorRegistry()
    try:
        server = build(settings, registry=registry, attestor=attestor)
    except BaseException:
        if kube is not None:
            kube.close()
        raise
    stop = asyncio.Event()
    serving: asyncio.Task[None] | None = None
    metrics_http = None
    network: NetworkPieces | None = None
    try:
        if settings.network is not None:
            from faastube_sidecar.network.pieces import NetworkPieces

            network = NetworkPieces(settings.network, server.dataplane, registry=registry,
                                    cluster=kube.peer_lookup() if kube is not None else None)
            await network.start()
        # Metrics first: the socket appearing is the readiness signal clients and probes
        # wait for, so everything the sidecar serves must be up by then.
        if settings.metrics_port:
            metrics_http = _start_metrics(settings, registry)
            logger.info("metrics on http://%s:%d/metrics", settings.metrics_host, settings.metrics_port)
        server.bind()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        serving = asyncio.create_task(server.serve(), name="faastube-server")
        if kube is not None:
            await kube.start(server.dataplane, socket_path=settings.socket_path,
                             gpu_limit_bytes=settings.gpu_limits.max_bytes,
                             network=network.published() if network is not None else None)
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        logger.info("shutting down")
    finally:
        if kube is not None:
            await kube.stop()
        server.stop()
        if serving is not None:
            done, _ = await asyncio.wait({serving}, timeout=settings.shutdown_timeout_s)
            if not done:
                logger.warning("server did not stop within %.3gs", settings.shutdown_timeout_s)
                serving.cancel()
        if kube is not None:
            kube.close()
        if network is not None:
            await network.stop()
        server.dataplane.close()
        server.dataplane.backend.close()
        if metrics_http is not None:
            metrics_http.shutdown()
            metrics_http.server_close()
    if serving is not None and serving.done() and not serving.cancelled():
        serving.result()  # a server that died on its own: raise its error


def _raise_fd_limit(max_clients: int) -> None:
    """Every client holds a descriptor (plus a duplicate for fd passing): lift the soft limit."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 2 * max_clients + 256
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as e:
            logger.warning("cannot raise the open-file limit to %d (%s): at most ~%d clients", target, e, soft // 2)
    if hard != resource.RLIM_INFINITY and hard < wanted:
        logger.warning("the open-file limit (%d) allows ~%d clients, fewer than --max-clients %d",
                       hard, hard // 2, max_clients)
