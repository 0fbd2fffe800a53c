"""The gRPC DevicePlugin servicers, one per resource: translate kubelet calls, decide nothing.

:class:`GpuPluginServicer` serves one GPU's ``faastube.io/gpu-<i>``, with health from the
shared :class:`~faastube_sidecar.gpuhealth.HealthMonitor`; :class:`SocketPluginServicer`
serves ``faastube.io/socket``. Policy lives in :mod:`.devices`. Request errors become
INVALID_ARGUMENT with a message naming the offending device id.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Sequence

import grpc
from faastube.errors import InvalidRequest

from faastube_sidecar.deviceplugin import api_pb2, api_pb2_grpc, devices
from faastube_sidecar.gpuhealth import HealthMonitor

logger = logging.getLogger(__name__)

API_VERSION = "v1beta1"
HEALTHY = "Healthy"
UNHEALTHY = "Unhealthy"
OPTIONS = api_pb2.DevicePluginOptions(
    pre_start_required=False, get_preferred_allocation_available=True
)


class GpuPluginServicer(api_pb2_grpc.DevicePluginServicer):
    def __init__(
        self, gpu: devices.GpuDevice, *, health: HealthMonitor, socket: devices.SocketMount,
        exposure: devices.GpuExposure = devices.DEFAULT_EXPOSURE,
    ) -> None:
        self._gpu = gpu
        self._health = health
        self._socket = socket
        self._exposure = exposure
        self._stopped = False

    def stop(self) -> None:
        """Make open ListAndWatch streams end at their next wake-up."""
        self._stopped = True

    def device_list(self) -> api_pb2.ListAndWatchResponse:
        state = self._health.current().get(self._gpu.uuid)
        healthy = state is not None and state.healthy
        topology = None
        if self._gpu.numa_node is not None:
            topology = api_pb2.TopologyInfo(nodes=[api_pb2.NUMANode(ID=self._gpu.numa_node)])
        return api_pb2.ListAndWatchResponse(devices=[
            api_pb2.Device(ID=d, health=HEALTHY if healthy else UNHEALTHY, topology=topology)
            for d in self._gpu.slot_ids()
        ])

    async def GetDevicePluginOptions(
        self, request: api_pb2.Empty, context: grpc.aio.ServicerContext
    ) -> api_pb2.DevicePluginOptions:
        return OPTIONS

    async def ListAndWatch(
        self, request: api_pb2.Empty, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[api_pb2.ListAndWatchResponse]:
        seen = self._health.version
        last = self.device_list()
        logger.debug("%s: ListAndWatch opened", self._gpu.resource_name)
        yield last
        while not self._stopped:
            seen = await self._health.wait_for_change(seen)
            if self._stopped:
                return
            current = self.device_list()
            if current != last:  # another GPU's change is no news for this resource
                last = current
                yield current

    async def GetPreferredAllocation(
        self, request: api_pb2.PreferredAllocationRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.PreferredAllocationResponse:
        return await _preferred(request, context, lambda available, must_include, size:
                                devices.preferred_allocation(self._gpu, available=available,
                                                             must_include=must_include, size=size))

    async def Allocate(
        self, request: api_pb2.AllocateRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.AllocateResponse:
        unhealthy = {u: h.reason or "unhealthy" for u, h in self._health.current().items() if not h.healthy}
        return await _allocate(request, context, lambda device_ids: devices.container_allocation(
            self._gpu, device_ids, socket=self._socket, exposure=self._exposure, unhealthy=unhealthy,
        ), resource_name=self._gpu.resource_name, log_level=logging.INFO)

    async def PreStartContainer(
        self, request: api_pb2.PreStartContainerRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.PreStartContainerResponse:
        return api_pb2.PreStartContainerResponse()


class SocketPluginServicer(api_pb2_grpc.DevicePluginServicer):
    """``faastube.io/socket``: a fixed list of always-healthy devices."""

    def __init__(self, resource: devices.SocketResource, *, socket: devices.SocketMount) -> None:
        self._resource = resource
        self._socket = socket
        self._stopped = asyncio.Event()

    def stop(self) -> None:
        self._stopped.set()

    async def GetDevicePluginOptions(
        self, request: api_pb2.Empty, context: grpc.aio.ServicerContext
    ) -> api_pb2.DevicePluginOptions:
        return OPTIONS

    async def ListAndWatch(
        self, request: api_pb2.Empty, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[api_pb2.ListAndWatchResponse]:
        yield api_pb2.ListAndWatchResponse(devices=[
            api_pb2.Device(ID=d, health=HEALTHY) for d in self._resource.device_ids()])
        await self._stopped.wait()  # the list never changes; keep the stream open

    async def GetPreferredAllocation(
        self, request: api_pb2.PreferredAllocationRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.PreferredAllocationResponse:
        return await _preferred(request, context, lambda available, must_include, size:
                                devices.preferred_socket_allocation(
                                    self._resource, available=available,
                                    must_include=must_include, size=size))

    async def Allocate(
        self, request: api_pb2.AllocateRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.AllocateResponse:
        return await _allocate(request, context, lambda device_ids: devices.socket_allocation(
            self._resource, device_ids, socket=self._socket,
        ), resource_name=self._resource.resource_name, log_level=logging.DEBUG)

    async def PreStartContainer(
        self, request: api_pb2.PreStartContainerRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.PreStartContainerResponse:
        return api_pb2.PreStartContainerResponse()


async def _preferred(
    request: api_pb2.PreferredAllocationRequest, context: grpc.aio.ServicerContext,
    choose: Callable[[Sequence[str], Sequence[str], int], list[str]],
) -> api_pb2.PreferredAllocationResponse:
    responses = []
    for i, req in enumerate(request.container_requests):
        try:
            chosen = choose(list(req.available_deviceIDs), list(req.must_include_deviceIDs),
                            req.allocation_size)
        except InvalidRequest as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"container_requests[{i}]: {e}")
        responses.append(api_pb2.ContainerPreferredAllocationResponse(deviceIDs=chosen))
    return api_pb2.PreferredAllocationResponse(container_responses=responses)


async def _allocate(
    request: api_pb2.AllocateRequest, context: grpc.aio.ServicerContext,
    allocate: Callable[[Sequence[str]], devices.ContainerAllocation], *,
    resource_name: str, log_level: int,
) -> api_pb2.AllocateResponse:
    """Both resources' Allocate: ``allocate`` per container request, each answered or aborted."""
    responses = []
    for i, req in enumerate(request.container_requests):
        try:
            alloc = allocate(req.devices_ids)
        except InvalidRequest as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"container_requests[{i}]: {e}")
        logger.log(log_level, "%s: allocated %s", resource_name, list(req.devices_ids))
        responses.append(_to_proto(alloc))
    return api_pb2.AllocateResponse(container_responses=responses)


def _to_proto(alloc: devices.ContainerAllocation) -> api_pb2.ContainerAllocateResponse:
    return api_pb2.ContainerAllocateResponse(
        envs=dict(alloc.envs),
        mounts=[
            api_pb2.Mount(container_path=m.container_path, host_path=m.host_path, read_only=m.read_only)
            for m in alloc.mounts
        ],
        devices=[
            api_pb2.DeviceSpec(container_path=d.container_path, host_path=d.host_path, permissions=d.permissions)
            for d in alloc.devices
        ],
        annotations=dict(alloc.annotations),
        cdi_devices=[api_pb2.CDIDevice(name=name) for name in alloc.cdi_devices],
    )
