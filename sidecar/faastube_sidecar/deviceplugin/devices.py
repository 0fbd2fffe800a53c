"""Pure device-plugin policy: which devices exist, which to prefer, what a container gets.

Every GPU is its own extended resource, ``faastube.io/gpu-<index>``, so the operator's
placement decides *which* GPU a function lands on (the scheduler only checks the count).
Each resource offers ``sharing_slots`` devices, ``gpu<index>-slot<k>``: that many
functions may share the GPU in time. Nothing here touches gRPC; the servicer translates.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from faastube.errors import InvalidRequest

RESOURCE_PREFIX = "faastube.io/gpu-"
SOCKET_ENV = "FAASTUBE_SOCKET"
_SLOT_ID = re.compile(r"^gpu(0|[1-9][0-9]*)-slot(0|[1-9][0-9]*)$")


@dataclass(frozen=True)
class GpuDevice:
    """What the plugin needs to know about one GPU."""

    index: int
    uuid: str
    sharing_slots: int = 4
    numa_node: int | None = None
    # Host device nodes to hand to the container (e.g. /dev/nvidia0) when the node has no
    # NVIDIA container runtime to act on NVIDIA_VISIBLE_DEVICES; empty: rely on the env var.
    device_paths: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.index < 0:
            raise InvalidRequest(f"gpu index must be >= 0, got {self.index}")
        if self.sharing_slots < 1:
            raise InvalidRequest(f"gpu {self.index}: sharing_slots must be >= 1, got {self.sharing_slots}")
        if not self.uuid:
            raise InvalidRequest(f"gpu {self.index}: uuid is empty")

    @property
    def resource_name(self) -> str:
        return f"{RESOURCE_PREFIX}{self.index}"

    @property
    def endpoint(self) -> str:
        """Socket file name in the kubelet's device-plugin directory."""
        return f"faastube-gpu{self.index}.sock"

    def slot_ids(self) -> list[str]:
        return [slot_id(self.index, k) for k in range(self.sharing_slots)]


def gpu_devices_from_topology(node: Any) -> list[GpuDevice]:
    """Build the device list from a ``faastube.topology.NodeTopology``."""
    return [
        GpuDevice(index=g.index, uuid=g.uuid, sharing_slots=g.sharing_slots, numa_node=g.numa_node)
        for g in node.gpus
    ]


def slot_id(gpu_index: int, slot: int) -> str:
    return f"gpu{gpu_index}-slot{slot}"


def parse_slot_id(device_id: str, *, gpu: GpuDevice) -> int:
    """The slot number of ``device_id``, which must name a slot of ``gpu``."""
    m = _SLOT_ID.match(device_id)
    if m is None:
        raise InvalidRequest(f"unknown device id {device_id!r}: expected gpu<index>-slot<k>")
    index, slot = int(m.group(1)), int(m.group(2))
    if index != gpu.index:
        raise InvalidRequest(f"unknown device id {device_id!r}: {gpu.resource_name} serves gpu{gpu.index}")
    if slot >= gpu.sharing_slots:
        raise InvalidRequest(
            f"unknown device id {device_id!r}: gpu{gpu.index} has slots 0..{gpu.sharing_slots - 1}"
        )
    return slot


def preferred_allocation(
    gpu: GpuDevice, *, available: Sequence[str], must_include: Sequence[str], size: int
) -> list[str]:
    """A deterministic choice of ``size`` slots: the required ones, then the lowest free slots.

    All slots of one resource are the same GPU, so any choice is equally fast; a stable,
    lowest-first order keeps allocations reproducible and easy to read in kubelet logs.
    """
    avail = {d: parse_slot_id(d, gpu=gpu) for d in available}
    required = {d: parse_slot_id(d, gpu=gpu) for d in must_include}
    missing = [d for d in required if d not in avail]
    if missing:
        raise InvalidRequest(f"must_include_deviceIDs {missing} are not in available_deviceIDs")
    if size < len(required) or size > len(avail):
        raise InvalidRequest(
            f"allocation_size {size} must be between {len(required)} (must include) "
            f"and {len(avail)} (available)"
        )
    chosen = sorted(required, key=required.__getitem__)
    rest = sorted((d for d in avail if d not in required), key=avail.__getitem__)
    return chosen + rest[: size - len(chosen)]


@dataclass(frozen=True)
class MountSpec:
    container_path: str
    host_path: str
    read_only: bool


@dataclass(frozen=True)
class DeviceNodeSpec:
    container_path: str
    host_path: str
    permissions: str = "rw"


@dataclass(frozen=True)
class ContainerAllocation:
    """What the kubelet must add to one container (mirrors ContainerAllocateResponse)."""

    envs: Mapping[str, str]
    mounts: tuple[MountSpec, ...]
    devices: tuple[DeviceNodeSpec, ...]
    annotations: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class SocketMount:
    """Where the sidecar's socket lives on the host and where pods see it.

    The *directory* is mounted, never the socket file: a restarted sidecar makes a new
    socket file, which a file bind-mount would not follow.
    """

    host_dir: str
    # The same path the operator uses for pods that get no GPU (and so no Allocate):
    # every function finds the socket at one place, $FAASTUBE_SOCKET.
    container_dir: str = "/var/run/faastube"
    socket_name: str = "faastube.sock"

    @property
    def container_socket(self) -> str:
        return f"{self.container_dir.rstrip('/')}/{self.socket_name}"


def container_allocation(
    gpu: GpuDevice, device_ids: Iterable[str], *, socket: SocketMount,
    unhealthy: Mapping[str, str] | None = None,
) -> ContainerAllocation:
    """The response for one container that asked for ``device_ids`` (slots of ``gpu``)."""
    ids = list(device_ids)
    if not ids:
        raise InvalidRequest(f"{gpu.resource_name}: a container asked for no devices")
    for d in ids:
        parse_slot_id(d, gpu=gpu)
    if len(set(ids)) != len(ids):
        raise InvalidRequest(f"{gpu.resource_name}: duplicate device ids in {ids}")
    reason = (unhealthy or {}).get(gpu.uuid)
    if reason is not None:
        raise InvalidRequest(f"{gpu.resource_name}: gpu{gpu.index} ({gpu.uuid}) is unhealthy: {reason}")
    envs = {
        "NVIDIA_VISIBLE_DEVICES": gpu.uuid,
        SOCKET_ENV: socket.container_socket,
        "FAASTUBE_GPU_UUID": gpu.uuid,
        "FAASTUBE_GPU_INDEX": str(gpu.index),
    }
    # Read-only is enough: connect() on a socket is allowed on a read-only mount, and it
    # stops a pod from replacing the sidecar's socket with its own.
    mounts = (MountSpec(socket.container_dir, socket.host_dir, read_only=True),)
    devices = tuple(DeviceNodeSpec(p, p) for p in gpu.device_paths)
    return ContainerAllocation(envs=envs, mounts=mounts, devices=devices)
