"""The device plugin against a kubelet stand-in over real gRPC unix sockets.

The stand-in serves Registration.Register on kubelet.sock and then calls the plugin's
socket exactly as the kubelet's device manager does.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest
import yaml
from faastube_sidecar.deviceplugin import api_pb2, api_pb2_grpc
from faastube_sidecar.deviceplugin.cdi import CdiCheckedHealth
from faastube_sidecar.deviceplugin.devices import (
    GpuDevice,
    GpuExposure,
    SocketMount,
    SocketResource,
)
from faastube_sidecar.deviceplugin.service import DevicePluginService, DevicePluginSettings
from faastube_sidecar.gpuhealth import FixedHealthSource, HealthMonitor

UUID0 = "GPU-00000000-1111-2222-3333-444444444444"
UUID1 = "GPU-aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"


class Kubelet(api_pb2_grpc.RegistrationServicer):
    """Plays the kubelet: accepts registrations and dials the plugins back."""

    def __init__(self, plugin_dir: str) -> None:
        self.plugin_dir = plugin_dir
        self.requests: asyncio.Queue[api_pb2.RegisterRequest] = asyncio.Queue()
        self._server: grpc.aio.Server | None = None

    async def Register(self, request, context):
        if request.version != "v1beta1":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "unsupported version")
        await self.requests.put(request)
        return api_pb2.Empty()

    async def start(self) -> None:
        self._server = grpc.aio.server()
        api_pb2_grpc.add_RegistrationServicer_to_server(self, self._server)
        self._server.add_insecure_port(f"unix://{os.path.join(self.plugin_dir, 'kubelet.sock')}")
        await self._server.start()

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(0)
            self._server = None

    async def restart(self) -> None:
        """What a real kubelet restart looks like on disk: every socket is removed and
        kubelet.sock comes back as a new file."""
        await self.stop()
        for name in os.listdir(self.plugin_dir):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.plugin_dir, name))
        await self.start()

    async def next_registration(self, timeout_s: float = 5.0) -> api_pb2.RegisterRequest:
        return await asyncio.wait_for(self.requests.get(), timeout_s)

    @contextlib.asynccontextmanager
    async def dial(self, request: api_pb2.RegisterRequest) -> AsyncIterator[api_pb2_grpc.DevicePluginStub]:
        target = f"unix://{os.path.join(self.plugin_dir, request.endpoint)}"
        async with grpc.aio.insecure_channel(target) as channel:
            yield api_pb2_grpc.DevicePluginStub(channel)


@pytest.fixture
def plugin_dir() -> Iterator[str]:
    # Short path: unix socket paths are limited to 107 bytes.
    path = tempfile.mkdtemp(prefix="ftdp", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def kubelet(plugin_dir: str) -> AsyncIterator[Kubelet]:
    k = Kubelet(plugin_dir)
    await k.start()
    yield k
    await k.stop()


@pytest.fixture
def health_source() -> FixedHealthSource:
    return FixedHealthSource()


@pytest.fixture
async def service(plugin_dir: str, kubelet: Kubelet, health_source: FixedHealthSource) -> AsyncIterator[DevicePluginService]:
    gpus = [GpuDevice(0, UUID0, sharing_slots=3, numa_node=0), GpuDevice(1, UUID1, sharing_slots=2)]
    monitor = HealthMonitor(health_source, [g.uuid for g in gpus], interval_s=5.0)
    await monitor.start()
    svc = DevicePluginService(
        gpus, health=monitor, socket=SocketMount(host_dir="/run/faastube-host"),
        settings=DevicePluginSettings(plugin_dir=plugin_dir, kubelet_poll_interval_s=0.05),
    )
    await svc.start()
    yield svc
    await svc.stop()
    await monitor.stop()


async def registrations_by_resource(kubelet: Kubelet, count: int) -> dict[str, api_pb2.RegisterRequest]:
    regs = [await kubelet.next_registration() for _ in range(count)]
    return {r.resource_name: r for r in regs}


async def test_each_gpu_registers_as_its_own_resource_with_preferred_allocation(kubelet, service):
    regs = await registrations_by_resource(kubelet, 2)
    assert sorted(regs) == ["faastube.io/gpu-0", "faastube.io/gpu-1"]
    reg = regs["faastube.io/gpu-0"]
    assert reg.version == "v1beta1"
    assert reg.endpoint == "faastube-gpu0.sock"
    assert reg.options.get_preferred_allocation_available
    assert not reg.options.pre_start_required
    async with kubelet.dial(reg) as plugin:
        options = await plugin.GetDevicePluginOptions(api_pb2.Empty())
    assert options.get_preferred_allocation_available


async def test_list_and_watch_lists_one_device_per_sharing_slot(kubelet, service):
    regs = await registrations_by_resource(kubelet, 2)
    async with kubelet.dial(regs["faastube.io/gpu-0"]) as plugin:
        stream = plugin.ListAndWatch(api_pb2.Empty())
        first = await asyncio.wait_for(stream.read(), 5)
        stream.cancel()
    assert [d.ID for d in first.devices] == ["gpu0-slot0", "gpu0-slot1", "gpu0-slot2"]
    assert {d.health for d in first.devices} == {"Healthy"}
    assert [n.ID for n in first.devices[0].topology.nodes] == [0]


async def test_health_flip_is_streamed_and_recovery_too(kubelet, service, health_source):
    regs = await registrations_by_resource(kubelet, 2)
    async with kubelet.dial(regs["faastube.io/gpu-1"]) as plugin:
        stream = plugin.ListAndWatch(api_pb2.Empty())
        first = await asyncio.wait_for(stream.read(), 5)
        assert {d.health for d in first.devices} == {"Healthy"}

        health_source.set_health(UUID1, False, "critical XID 79")
        update = await asyncio.wait_for(stream.read(), 5)
        assert [(d.ID, d.health) for d in update.devices] == [
            ("gpu1-slot0", "Unhealthy"), ("gpu1-slot1", "Unhealthy")]

        health_source.set_health(UUID1, True)
        recovered = await asyncio.wait_for(stream.read(), 5)
        assert {d.health for d in recovered.devices} == {"Healthy"}
        stream.cancel()


async def test_another_gpus_health_change_is_not_sent_to_this_resource(kubelet, service, health_source):
    regs = await registrations_by_resource(kubelet, 2)
    async with kubelet.dial(regs["faastube.io/gpu-0"]) as plugin:
        stream = plugin.ListAndWatch(api_pb2.Empty())
        await asyncio.wait_for(stream.read(), 5)
        health_source.set_health(UUID1, False, "gone")
        health_source.set_health(UUID0, False, "gone too")
        update = await asyncio.wait_for(stream.read(), 5)
        stream.cancel()
    # The first update this stream sees is its own GPU's change, not GPU 1's.
    assert {d.health for d in update.devices} == {"Unhealthy"}


async def test_preferred_allocation_is_the_required_then_lowest_slots(kubelet, service):
    regs = await registrations_by_resource(kubelet, 2)
    async with kubelet.dial(regs["faastube.io/gpu-0"]) as plugin:
        response = await plugin.GetPreferredAllocation(api_pb2.PreferredAllocationRequest(container_requests=[
            api_pb2.ContainerPreferredAllocationRequest(
                available_deviceIDs=["gpu0-slot2", "gpu0-slot1", "gpu0-slot0"],
                must_include_deviceIDs=["gpu0-slot2"], allocation_size=2),
        ]))
    assert list(response.container_responses[0].deviceIDs) == ["gpu0-slot2", "gpu0-slot0"]


async def test_allocate_hands_over_the_gpu_and_the_socket_directory(kubelet, service):
    regs = await registrations_by_resource(kubelet, 2)
    async with kubelet.dial(regs["faastube.io/gpu-1"]) as plugin:
        response = await plugin.Allocate(api_pb2.AllocateRequest(container_requests=[
            api_pb2.ContainerAllocateRequest(devices_ids=["gpu1-slot1"]),
            api_pb2.ContainerAllocateRequest(devices_ids=["gpu1-slot0"]),
        ]))
    assert len(response.container_responses) == 2
    container = response.container_responses[0]
    assert container.envs["NVIDIA_VISIBLE_DEVICES"] == UUID1
    assert container.envs["FAASTUBE_SOCKET"] == "/var/run/faastube/faastube.sock"
    assert [(m.host_path, m.container_path, m.read_only) for m in container.mounts] == [
        ("/run/faastube-host", "/var/run/faastube", True)]


@pytest.mark.parametrize("bad_id", ["gpu0-slot0", "gpu1-slot7", "nvidia0", ""])
async def test_allocate_rejects_unknown_device_ids_by_name(kubelet, service, bad_id):
    regs = await registrations_by_resource(kubelet, 2)
    async with kubelet.dial(regs["faastube.io/gpu-1"]) as plugin:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await plugin.Allocate(api_pb2.AllocateRequest(container_requests=[
                api_pb2.ContainerAllocateRequest(devices_ids=["gpu1-slot0"]),
                api_pb2.ContainerAllocateRequest(devices_ids=[bad_id]),
            ]))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "container_requests[1]" in info.value.details()
    assert repr(bad_id) in info.value.details()


async def test_preferred_allocation_rejects_impossible_sizes(kubelet, service):
    regs = await registrations_by_resource(kubelet, 2)
    async with kubelet.dial(regs["faastube.io/gpu-0"]) as plugin:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await plugin.GetPreferredAllocation(api_pb2.PreferredAllocationRequest(container_requests=[
                api_pb2.ContainerPreferredAllocationRequest(
                    available_deviceIDs=["gpu0-slot0"], allocation_size=2),
            ]))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "allocation_size 2" in info.value.details()


async def test_allocate_refuses_an_unhealthy_gpu(kubelet, service, health_source):
    regs = await registrations_by_resource(kubelet, 2)
    async with kubelet.dial(regs["faastube.io/gpu-0"]) as plugin:
        stream = plugin.ListAndWatch(api_pb2.Empty())
        await asyncio.wait_for(stream.read(), 5)
        health_source.set_health(UUID0, False, "NVML cannot reach the GPU")
        await asyncio.wait_for(stream.read(), 5)  # the monitor has seen the change
        stream.cancel()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await plugin.Allocate(api_pb2.AllocateRequest(container_requests=[
                api_pb2.ContainerAllocateRequest(devices_ids=["gpu0-slot0"])]))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "unhealthy: NVML cannot reach the GPU" in info.value.details()


async def test_plugin_registers_again_when_the_kubelet_restarts(kubelet, service):
    await registrations_by_resource(kubelet, 2)
    assert service.registrations == 1
    await kubelet.restart()
    regs = await registrations_by_resource(kubelet, 2)
    assert sorted(regs) == ["faastube.io/gpu-0", "faastube.io/gpu-1"]
    # The restarted plugin answers on its recreated socket.
    async with kubelet.dial(regs["faastube.io/gpu-0"]) as plugin:
        stream = plugin.ListAndWatch(api_pb2.Empty())
        first = await asyncio.wait_for(stream.read(), 5)
        stream.cancel()
    assert len(first.devices) == 3


async def test_plugin_waits_for_a_kubelet_that_is_not_there_yet(plugin_dir, health_source):
    monitor = HealthMonitor(health_source, [UUID0], interval_s=5.0)
    await monitor.start()
    svc = DevicePluginService(
        [GpuDevice(0, UUID0)], health=monitor, socket=SocketMount(host_dir="/run/ft"),
        settings=DevicePluginSettings(plugin_dir=plugin_dir, kubelet_poll_interval_s=0.05),
    )
    await svc.start()
    try:
        assert svc.registrations == 0
        assert os.path.exists(svc.socket_paths[0])
        late = Kubelet(plugin_dir)
        await late.start()
        try:
            reg = await late.next_registration()
            assert reg.resource_name == "faastube.io/gpu-0"
        finally:
            await late.stop()
    finally:
        await svc.stop()
        await monitor.stop()
    assert not os.path.exists(svc.socket_paths[0])


# --- CDI exposure and the socket resource --------------------------------------------------


def write_cdi_spec(directory: str, *names: str) -> None:
    """A spec as ``nvidia-ctk cdi generate`` lays it out: kind nvidia.com/gpu, named devices."""
    spec = {"cdiVersion": "0.5.0", "kind": "nvidia.com/gpu",
            "devices": [{"name": n, "containerEdits": {"deviceNodes": [{"path": f"/dev/nvidia{i}"}]}}
                        for i, n in enumerate(names)]}
    with open(os.path.join(directory, "nvidia.yaml"), "w") as f:
        yaml.safe_dump(spec, f)


@pytest.fixture
def cdi_dir() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="ftcdi", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def cdi_service(plugin_dir: str, kubelet: Kubelet, health_source: FixedHealthSource,
                      cdi_dir: str) -> AsyncIterator[DevicePluginService]:
    """Both GPUs exposed through CDI; only GPU 0 has a CDI device at first; 4 socket devices."""
    write_cdi_spec(cdi_dir, UUID0, "all")
    gpus = [GpuDevice(0, UUID0, sharing_slots=2), GpuDevice(1, UUID1, sharing_slots=2)]
    exposure = GpuExposure("cdi")
    checked = CdiCheckedHealth(health_source, devices={g.uuid: exposure.cdi_device(g) for g in gpus},
                               spec_dirs=[cdi_dir])
    monitor = HealthMonitor(checked, [g.uuid for g in gpus], interval_s=0.05)
    await monitor.start()
    svc = DevicePluginService(
        gpus, health=monitor, socket=SocketMount(host_dir="/run/faastube-host"),
        settings=DevicePluginSettings(plugin_dir=plugin_dir, kubelet_poll_interval_s=0.05),
        exposure=exposure, socket_resource=SocketResource(4),
    )
    await svc.start()
    yield svc
    await svc.stop()
    await monitor.stop()


async def test_cdi_allocate_carries_the_cdi_device_and_the_socket_mount(kubelet, cdi_service):
    regs = await registrations_by_resource(kubelet, 3)
    assert sorted(regs) == ["faastube.io/gpu-0", "faastube.io/gpu-1", "faastube.io/socket"]
    async with kubelet.dial(regs["faastube.io/gpu-0"]) as plugin:
        response = await plugin.Allocate(api_pb2.AllocateRequest(container_requests=[
            api_pb2.ContainerAllocateRequest(devices_ids=["gpu0-slot1"])]))
    (container,) = response.container_responses
    assert [d.name for d in container.cdi_devices] == [f"nvidia.com/gpu={UUID0}"]
    assert container.envs["NVIDIA_VISIBLE_DEVICES"] == "void"
    assert container.envs["FAASTUBE_GPU_UUID"] == UUID0
    assert [(m.host_path, m.container_path, m.read_only) for m in container.mounts] == [
        ("/run/faastube-host", "/var/run/faastube", True)]
    assert list(container.devices) == [] and dict(container.annotations) == {}


async def test_a_gpu_whose_cdi_device_is_undefined_is_unhealthy_until_the_spec_appears(
        kubelet, cdi_service, cdi_dir):
    regs = await registrations_by_resource(kubelet, 3)
    async with kubelet.dial(regs["faastube.io/gpu-1"]) as plugin:
        stream = plugin.ListAndWatch(api_pb2.Empty())
        first = await asyncio.wait_for(stream.read(), 5)
        assert {d.health for d in first.devices} == {"Unhealthy"}
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await plugin.Allocate(api_pb2.AllocateRequest(container_requests=[
                api_pb2.ContainerAllocateRequest(devices_ids=["gpu1-slot0"])]))
        assert f"CDI device nvidia.com/gpu={UUID1} is defined by no spec" in info.value.details()

        write_cdi_spec(cdi_dir, UUID0, UUID1, "all")  # e.g. nvidia-cdi-refresh ran after boot
        recovered = await asyncio.wait_for(stream.read(), 5)
        stream.cancel()
        assert {d.health for d in recovered.devices} == {"Healthy"}
        response = await plugin.Allocate(api_pb2.AllocateRequest(container_requests=[
            api_pb2.ContainerAllocateRequest(devices_ids=["gpu1-slot0"])]))
    assert [d.name for d in response.container_responses[0].cdi_devices] == [f"nvidia.com/gpu={UUID1}"]


async def test_the_socket_resource_gives_pods_without_a_gpu_the_socket_directory(kubelet, cdi_service):
    regs = await registrations_by_resource(kubelet, 3)
    reg = regs["faastube.io/socket"]
    assert reg.endpoint == "faastube-socket.sock" and reg.options.get_preferred_allocation_available
    async with kubelet.dial(reg) as plugin:
        stream = plugin.ListAndWatch(api_pb2.Empty())
        listed = await asyncio.wait_for(stream.read(), 5)
        stream.cancel()
        preferred = await plugin.GetPreferredAllocation(api_pb2.PreferredAllocationRequest(
            container_requests=[api_pb2.ContainerPreferredAllocationRequest(
                available_deviceIDs=["socket-3", "socket-2"], allocation_size=1)]))
        response = await plugin.Allocate(api_pb2.AllocateRequest(container_requests=[
            api_pb2.ContainerAllocateRequest(devices_ids=["socket-2"]),
            api_pb2.ContainerAllocateRequest(devices_ids=["socket-3"])]))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await plugin.Allocate(api_pb2.AllocateRequest(container_requests=[
                api_pb2.ContainerAllocateRequest(devices_ids=["socket-4"])]))
    assert [(d.ID, d.health) for d in listed.devices] == [(f"socket-{k}", "Healthy") for k in range(4)]
    assert list(preferred.container_responses[0].deviceIDs) == ["socket-2"]
    assert len(response.container_responses) == 2
    container = response.container_responses[0]
    assert dict(container.envs) == {"FAASTUBE_SOCKET": "/var/run/faastube/faastube.sock",
                                    "NVIDIA_VISIBLE_DEVICES": "void"}
    assert [(m.host_path, m.container_path, m.read_only) for m in container.mounts] == [
        ("/run/faastube-host", "/var/run/faastube", True)]
    assert list(container.cdi_devices) == []
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "'socket-4'" in info.value.details()


async def test_the_socket_resource_registers_again_after_a_kubelet_restart(kubelet, cdi_service):
    await registrations_by_resource(kubelet, 3)
    await kubelet.restart()
    regs = await registrations_by_resource(kubelet, 3)
    async with kubelet.dial(regs["faastube.io/socket"]) as plugin:
        stream = plugin.ListAndWatch(api_pb2.Empty())
        listed = await asyncio.wait_for(stream.read(), 5)
        stream.cancel()
    assert len(listed.devices) == 4
