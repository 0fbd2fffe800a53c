"""The device plugin's pure policy: device ids, preferred allocation, container responses."""

from __future__ import annotations

import pytest
from faastube import topology
from faastube.errors import InvalidRequest
from faastube_sidecar.deviceplugin.devices import (
    GpuDevice,
    GpuExposure,
    SocketMount,
    SocketResource,
    container_allocation,
    gpu_devices_from_topology,
    parse_slot_id,
    parse_socket_id,
    preferred_allocation,
    preferred_socket_allocation,
    socket_allocation,
)

GPU = GpuDevice(2, "GPU-2", sharing_slots=4, numa_node=1)


def test_each_gpu_is_a_resource_with_one_device_per_sharing_slot():
    assert GPU.resource_name == "faastube.io/gpu-2"
    assert GPU.endpoint == "faastube-gpu2.sock"
    assert GPU.slot_ids() == ["gpu2-slot0", "gpu2-slot1", "gpu2-slot2", "gpu2-slot3"]


def test_devices_come_from_the_node_topology():
    node = topology.builtin_node("dgx1-v100")
    gpus = gpu_devices_from_topology(node)
    assert [g.index for g in gpus] == [g.index for g in node.gpus]
    assert [g.uuid for g in gpus] == [g.uuid for g in node.gpus]
    assert all(g.sharing_slots == n.sharing_slots for g, n in zip(gpus, node.gpus))


@pytest.mark.parametrize(("device_id", "why"), [
    ("gpu3-slot0", "serves gpu2"),
    ("gpu2-slot4", "slots 0..3"),
    ("gpu2-slot01", "expected gpu<index>-slot<k>"),
    ("GPU-2", "expected gpu<index>-slot<k>"),
])
def test_unknown_device_ids_are_named_in_the_error(device_id, why):
    with pytest.raises(InvalidRequest, match=why) as info:
        parse_slot_id(device_id, gpu=GPU)
    assert repr(device_id) in str(info.value)


def test_preferred_allocation_is_deterministic_whatever_the_order():
    available = ["gpu2-slot3", "gpu2-slot1", "gpu2-slot0", "gpu2-slot2"]
    first = preferred_allocation(GPU, available=available, must_include=[], size=2)
    again = preferred_allocation(GPU, available=list(reversed(available)), must_include=[], size=2)
    assert first == again == ["gpu2-slot0", "gpu2-slot1"]


def test_preferred_allocation_keeps_the_required_slots():
    chosen = preferred_allocation(GPU, available=["gpu2-slot0", "gpu2-slot3", "gpu2-slot1"],
                                  must_include=["gpu2-slot3"], size=2)
    assert chosen == ["gpu2-slot3", "gpu2-slot0"]


def test_preferred_allocation_refuses_required_slots_that_are_not_available():
    with pytest.raises(InvalidRequest, match="not in available_deviceIDs"):
        preferred_allocation(GPU, available=["gpu2-slot0"], must_include=["gpu2-slot1"], size=1)


def test_container_allocation_names_the_gpu_and_mounts_the_socket_directory():
    alloc = container_allocation(GPU, ["gpu2-slot1"], socket=SocketMount(host_dir="/var/run/faastube"))
    assert alloc.envs["NVIDIA_VISIBLE_DEVICES"] == "GPU-2"
    assert alloc.envs["FAASTUBE_SOCKET"] == "/var/run/faastube/faastube.sock"
    assert alloc.envs["FAASTUBE_GPU_INDEX"] == "2"
    assert [(m.host_path, m.container_path) for m in alloc.mounts] == [("/var/run/faastube", "/var/run/faastube")]
    assert alloc.devices == ()


def test_device_nodes_are_passed_when_configured():
    gpu = GpuDevice(0, "GPU-0", device_paths=("/dev/nvidia0", "/dev/nvidiactl"))
    alloc = container_allocation(gpu, ["gpu0-slot0"], socket=SocketMount(host_dir="/x"))
    assert [(d.host_path, d.permissions) for d in alloc.devices] == [("/dev/nvidia0", "rw"), ("/dev/nvidiactl", "rw")]


@pytest.mark.parametrize(("ids", "why"), [
    ([], "asked for no devices"),
    (["gpu2-slot0", "gpu2-slot0"], "duplicate device ids"),
])
def test_container_allocation_rejects_empty_and_duplicate_requests(ids, why):
    with pytest.raises(InvalidRequest, match=why):
        container_allocation(GPU, ids, socket=SocketMount(host_dir="/x"))


@pytest.mark.parametrize("kwargs", [{"index": -1}, {"sharing_slots": 0}, {"uuid": ""}])
def test_invalid_gpu_descriptions_are_rejected(kwargs):
    args = {"index": 0, "uuid": "GPU-0", "sharing_slots": 1} | kwargs
    with pytest.raises(InvalidRequest):
        GpuDevice(**args)


# --- how the GPU reaches the container ----------------------------------------------------


def test_cdi_exposure_names_the_gpus_cdi_device_and_keeps_the_nvidia_runtime_out():
    alloc = container_allocation(GPU, ["gpu2-slot0"], socket=SocketMount(host_dir="/run/ft"),
                                 exposure=GpuExposure("cdi"))
    assert alloc.cdi_devices == ("nvidia.com/gpu=GPU-2",)
    # An image's NVIDIA_VISIBLE_DEVICES=all must not make a default NVIDIA runtime add every GPU.
    assert alloc.envs["NVIDIA_VISIBLE_DEVICES"] == "void"
    assert alloc.annotations == {} and alloc.devices == ()
    assert alloc.envs["FAASTUBE_GPU_UUID"] == "GPU-2"
    assert [(m.host_path, m.container_path, m.read_only) for m in alloc.mounts] == [
        ("/run/ft", "/var/run/faastube", True)]


def test_cdi_devices_can_be_named_by_index_and_another_kind():
    exposure = GpuExposure("cdi", cdi_kind="k8s.device-plugin.nvidia.com/gpu", cdi_naming="index")
    alloc = container_allocation(GPU, ["gpu2-slot3"], socket=SocketMount(host_dir="/x"), exposure=exposure)
    assert alloc.cdi_devices == ("k8s.device-plugin.nvidia.com/gpu=2",)


def test_cdi_annotations_exposure_is_for_kubelets_without_the_cdi_field():
    gpu = GpuDevice(0, "GPU-0", device_paths=("/dev/nvidia0",))
    alloc = container_allocation(gpu, ["gpu0-slot0"], socket=SocketMount(host_dir="/x"),
                                 exposure=GpuExposure("cdi-annotations"))
    assert alloc.annotations == {"cdi.k8s.io/faastube_gpu0": "nvidia.com/gpu=GPU-0"}
    assert alloc.cdi_devices == () and alloc.devices == ()  # the CDI spec brings the nodes
    assert alloc.envs["NVIDIA_VISIBLE_DEVICES"] == "void"


@pytest.mark.parametrize(("kwargs", "why"), [
    ({"mode": "runtime"}, "is not one of envvar, cdi, cdi-annotations"),
    ({"mode": "cdi", "cdi_kind": "gpu"}, "not vendor/class"),
    ({"mode": "cdi", "cdi_kind": "nvidia.com/gpu/x"}, "not vendor/class"),
    ({"mode": "cdi", "cdi_naming": "serial"}, "is not one of uuid, index"),
])
def test_bad_exposures_are_refused_naming_the_value(kwargs, why):
    with pytest.raises(InvalidRequest, match=why):
        GpuExposure(**kwargs)


# --- faastube.io/socket --------------------------------------------------------------------


SOCKETS = SocketResource(8)


def test_the_socket_resource_hands_over_only_the_socket_directory_and_no_gpu():
    assert SOCKETS.resource_name == "faastube.io/socket"
    assert SOCKETS.device_ids()[:2] == ["socket-0", "socket-1"] and len(SOCKETS.device_ids()) == 8
    alloc = socket_allocation(SOCKETS, ["socket-5"], socket=SocketMount(host_dir="/run/ft", socket_name="s.sock"))
    assert alloc.envs == {"FAASTUBE_SOCKET": "/var/run/faastube/s.sock", "NVIDIA_VISIBLE_DEVICES": "void"}
    assert [(m.host_path, m.container_path, m.read_only) for m in alloc.mounts] == [
        ("/run/ft", "/var/run/faastube", True)]
    assert alloc.cdi_devices == () and alloc.devices == ()


@pytest.mark.parametrize(("device_id", "why"), [
    ("socket-8", "socket-0..socket-7"),
    ("socket-01", "expected socket-<k>"),
    ("gpu0-slot0", "expected socket-<k>"),
])
def test_unknown_socket_ids_are_named_in_the_error(device_id, why):
    with pytest.raises(InvalidRequest, match=why) as info:
        parse_socket_id(device_id, resource=SOCKETS)
    assert repr(device_id) in str(info.value)


def test_socket_preferred_allocation_is_the_required_then_lowest_devices():
    assert preferred_socket_allocation(SOCKETS, available=["socket-7", "socket-3", "socket-1"],
                                       must_include=["socket-7"], size=2) == ["socket-7", "socket-1"]


def test_a_socket_resource_needs_devices():
    with pytest.raises(InvalidRequest, match="devices must be >= 1"):
        SocketResource(0)
