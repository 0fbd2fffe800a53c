"""Runs one device-plugin gRPC server per resource and keeps them registered with the kubelet.

Resources: one per GPU (``faastube.io/gpu-<i>``) and, when asked, ``faastube.io/socket``.

The kubelet forgets every plugin when it restarts: it recreates ``kubelet.sock`` and
deletes the other sockets in its directory. We notice either by checking, every
``kubelet_poll_interval_s``, the identity (inode, ctime) of ``kubelet.sock`` and the
presence of our own sockets, then restart our servers and register again, as NVIDIA's
plugin does. A stat() every couple of seconds costs nothing and needs no inotify.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import grpc
from faastube.errors import RetryableError

from faastube_sidecar.deviceplugin import api_pb2, api_pb2_grpc, devices, plugin
from faastube_sidecar.gpuhealth import HealthMonitor

logger = logging.getLogger(__name__)


class RegistrationFailed(RetryableError):
    """The kubelet refused or did not answer Register; retried at the next check."""


@dataclass(frozen=True)
class DevicePluginSettings:
    plugin_dir: str = "/var/lib/kubelet/device-plugins"
    kubelet_socket_name: str = "kubelet.sock"
    kubelet_poll_interval_s: float = 2.0
    register_timeout_s: float = 5.0
    stop_grace_s: float = 1.0

    @property
    def kubelet_socket(self) -> str:
        return os.path.join(self.plugin_dir, self.kubelet_socket_name)


_FileId = tuple[int, int, int]  # (st_dev, st_ino, st_ctime_ns): inode numbers get reused


def _file_id(path: str) -> _FileId | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino, st.st_ctime_ns)


# A servicer whose open ListAndWatch streams end after ``stop()``.
_Servicer = plugin.GpuPluginServicer | plugin.SocketPluginServicer


class _PluginServer:
    """One resource's servicer on its own socket; restartable (a fresh servicer each start)."""

    def __init__(self, resource_name: str, *, socket_path: str,
                 make_servicer: Callable[[], _Servicer]) -> None:
        self.resource_name = resource_name
        self.socket_path = socket_path
        self._make_servicer = make_servicer
        self._server: grpc.aio.Server | None = None
        self._servicer: _Servicer | None = None

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)  # a stale socket from a previous run blocks bind()
        servicer = self._make_servicer()
        server = grpc.aio.server()
        api_pb2_grpc.add_DevicePluginServicer_to_server(servicer, server)
        server.add_insecure_port(f"unix://{self.socket_path}")
        await server.start()
        self._servicer = servicer
        self._server = server

    async def stop(self, grace_s: float) -> None:
        if self._servicer is not None:
            self._servicer.stop()
        if self._server is not None:
            await self._server.stop(grace_s)
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)


class DevicePluginService:
    """Serves ``faastube.io/gpu-<index>`` for every GPU of this node, and ``faastube.io/socket``
    when ``socket_resource`` is given; start()/stop() from asyncio."""

    def __init__(
        self,
        gpus: Sequence[devices.GpuDevice],
        *,
        health: HealthMonitor,
        socket: devices.SocketMount,
        settings: DevicePluginSettings = DevicePluginSettings(),
        exposure: devices.GpuExposure = devices.DEFAULT_EXPOSURE,
        socket_resource: devices.SocketResource | None = None,
    ) -> None:
        indices = [g.index for g in gpus]
        if len(set(indices)) != len(indices):
            raise ValueError(f"duplicate GPU indices {indices}")
        self._settings = settings
        self._health = health
        self._servers = [
            _PluginServer(g.resource_name, socket_path=os.path.join(settings.plugin_dir, g.endpoint),
                          make_servicer=_gpu_servicer(g, health=health, socket=socket, exposure=exposure))
            for g in gpus
        ]
        if socket_resource is not None:
            self._servers.append(_PluginServer(
                socket_resource.resource_name,
                socket_path=os.path.join(settings.plugin_dir, socket_resource.endpoint),
                make_servicer=lambda: plugin.SocketPluginServicer(socket_resource, socket=socket)))
        self._registered_kubelet: _FileId | None = None
        self._registrations = 0
        self._watch: asyncio.Task[None] | None = None

    @property
    def registrations(self) -> int:
        """How many times all plugins were registered (1 + kubelet restarts seen)."""
        return self._registrations

    @property
    def socket_paths(self) -> list[str]:
        return [s.socket_path for s in self._servers]

    async def start(self) -> None:
        if self._watch is not None:
            return
        os.makedirs(self._settings.plugin_dir, exist_ok=True)
        for s in self._servers:
            await s.start()
        await self._check()
        self._watch = asyncio.create_task(self._watch_kubelet(), name="device-plugin-kubelet-watch")

    async def stop(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
            self._watch = None
        for s in self._servers:
            await s.stop(self._settings.stop_grace_s)
        self._registered_kubelet = None

    async def _watch_kubelet(self) -> None:
        while True:
            await asyncio.sleep(self._settings.kubelet_poll_interval_s)
            try:
                await self._check()
            except Exception:  # keep watching: the next check retries
                logger.exception("device plugin: kubelet check failed")

    async def _check(self) -> None:
        kubelet = _file_id(self._settings.kubelet_socket)
        if kubelet is None:
            if self._registered_kubelet is not None:
                logger.warning("kubelet socket %s disappeared; waiting for the kubelet",
                               self._settings.kubelet_socket)
            self._registered_kubelet = None
            return
        ours_gone = any(not os.path.exists(s.socket_path) for s in self._servers)
        if kubelet == self._registered_kubelet and not ours_gone:
            return
        if self._registered_kubelet is not None or ours_gone:
            logger.info("kubelet restarted (its socket was recreated); restarting device plugins")
            for s in self._servers:
                await s.stop(self._settings.stop_grace_s)
                await s.start()
        try:
            await self._register_all()
        except RegistrationFailed as e:
            logger.error("device plugin registration failed, will retry: %s", e)
            self._registered_kubelet = None
            return
        self._registered_kubelet = kubelet
        self._registrations += 1

    async def _register_all(self) -> None:
        target = f"unix://{self._settings.kubelet_socket}"
        async with grpc.aio.insecure_channel(target) as channel:
            stub = api_pb2_grpc.RegistrationStub(channel)
            for s in self._servers:
                request = api_pb2.RegisterRequest(
                    version=plugin.API_VERSION,
                    endpoint=os.path.basename(s.socket_path),
                    resource_name=s.resource_name,
                    options=plugin.OPTIONS,
                )
                try:
                    await stub.Register(request, timeout=self._settings.register_timeout_s)
                except grpc.aio.AioRpcError as e:
                    raise RegistrationFailed(
                        f"{s.resource_name}: {e.code().name}: {e.details()}"
                    ) from e
                logger.info("registered %s at %s", s.resource_name, s.socket_path)


def _gpu_servicer(gpu: devices.GpuDevice, *, health: HealthMonitor, socket: devices.SocketMount,
                  exposure: devices.GpuExposure) -> Callable[[], plugin.GpuPluginServicer]:
    return lambda: plugin.GpuPluginServicer(gpu, health=health, socket=socket, exposure=exposure)
