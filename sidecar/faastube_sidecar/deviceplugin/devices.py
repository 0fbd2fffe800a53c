"""Pure device-plugin policy: which devices exist, which to prefer, what a container gets.

Every GPU is its own extended resource, ``faastube.io/gpu-<index>``, so the operator's
placement decides *which* GPU a function lands on (the scheduler only checks the count).
Each resource offers ``sharing_slots`` devices, ``gpu<index>-slot<k>``: that many
functions may share the GPU in time. How the container then gets the GPU is a
:class:`GpuExposure`: a CDI device name (no NVIDIA runtime needed) or the NVIDIA runtime's
``NVIDIA_VISIBLE_DEVICES``.

One more resource, ``faastube.io/socket``, hands pods that get no GPU (CPU functions, the
gateway) the sidecar's socket directory, so that no workflow pod needs a hostPath volume.
Nothing here touches gRPC; the servicers translate.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from faastube.errors import InvalidRequest

from faastube_sidecar.deviceplugin import cdi

RESOURCE_PREFIX = "faastube.io/gpu-"
SOCKET_RESOURCE = "faastube.io/socket"
SOCKET_ENV = "FAASTUBE_SOCKET"
# Read by the NVIDIA container runtime (legacy mode); "void" asks it to inject no GPU.
VISIBLE_DEVICES_ENV = "NVIDIA_VISIBLE_DEVICES"
NO_GPU = "void"
CDI_ANNOTATION_PREFIX = "cdi.k8s.io/"
_SLOT_ID = re.compile(r"^gpu(0|[1-9][0-9]*)-slot(0|[1-9][0-9]*)$")
_SOCKET_ID = re.compile(r"^socket-(0|[1-9][0-9]*)$")

ExposureMode = Literal["envvar", "cdi", "cdi-annotations"]
CdiNaming = Literal["uuid", "index"]
EXPOSURE_MODES: tuple[str, ...] = get_args(ExposureMode)
CDI_NAMINGS: tuple[str, ...] = get_args(CdiNaming)


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
    return _lowest_first(lambda d: parse_slot_id(d, gpu=gpu), available=available,
                         must_include=must_include, size=size)


def _lowest_first(number: Callable[[str], int], *, available: Sequence[str],
                  must_include: Sequence[str], size: int) -> list[str]:
    avail = {d: number(d) for d in available}
    required = {d: number(d) for d in must_include}
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
class GpuExposure:
    """How a container that was allocated a GPU slot gets the GPU itself.

    - ``envvar``: ``NVIDIA_VISIBLE_DEVICES=<uuid>`` (plus ``GpuDevice.device_paths``), acted
      on by the NVIDIA container runtime in legacy mode: the pod must run under it (its
      ``runtimeClassName``, or the node's default runtime).
    - ``cdi``: the GPU's CDI device in ``ContainerAllocateResponse.cdi_devices``; the kubelet
      passes it in the CRI's ``CDIDevices`` (Kubernetes >= 1.29, DevicePluginCDIDevices) and
      containerd/CRI-O inject it from the node's CDI spec: no NVIDIA runtime involved.
    - ``cdi-annotations``: the same name as a ``cdi.k8s.io/`` annotation, which containerd
      >= 1.7 and CRI-O also resolve: for kubelets older than 1.29.

    The CDI modes also set ``NVIDIA_VISIBLE_DEVICES=void``: CUDA images set it to ``all``,
    and a node whose default runtime is NVIDIA's would otherwise inject every GPU on top.
    """

    mode: ExposureMode = "envvar"
    cdi_kind: str = "nvidia.com/gpu"
    # How the CDI spec names a GPU: by UUID (stable) or by NVML index.
    cdi_naming: CdiNaming = "uuid"

    def __post_init__(self) -> None:
        if self.mode not in EXPOSURE_MODES:
            raise InvalidRequest(f"GPU exposure {self.mode!r} is not one of {', '.join(EXPOSURE_MODES)}")
        if self.cdi_naming not in CDI_NAMINGS:
            raise InvalidRequest(f"CDI device naming {self.cdi_naming!r} is not one of {', '.join(CDI_NAMINGS)}")
        cdi.validate_kind(self.cdi_kind)

    @property
    def uses_cdi(self) -> bool:
        return self.mode != "envvar"

    def cdi_device(self, gpu: GpuDevice) -> str:
        """The GPU's qualified CDI name, e.g. ``nvidia.com/gpu=GPU-1234`` or ``nvidia.com/gpu=0``."""
        return cdi.qualified_name(self.cdi_kind, gpu.uuid if self.cdi_naming == "uuid" else str(gpu.index))


DEFAULT_EXPOSURE = GpuExposure()


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
    devices: tuple[DeviceNodeSpec, ...] = ()
    annotations: Mapping[str, str] = field(default_factory=dict)
    cdi_devices: tuple[str, ...] = ()


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


def _socket_mount(socket: SocketMount) -> MountSpec:
    # Read-only is enough: connect() on a socket is allowed on a read-only mount, and it
    # stops a pod from replacing the sidecar's socket with its own.
    return MountSpec(socket.container_dir, socket.host_dir, read_only=True)


def _check_ids(resource_name: str, ids: Sequence[str], parse: Callable[[str], int]) -> None:
    if not ids:
        raise InvalidRequest(f"{resource_name}: a container asked for no devices")
    for d in ids:
        parse(d)
    if len(set(ids)) != len(ids):
        raise InvalidRequest(f"{resource_name}: duplicate device ids in {list(ids)}")


def container_allocation(
    gpu: GpuDevice, device_ids: Iterable[str], *, socket: SocketMount,
    exposure: GpuExposure = DEFAULT_EXPOSURE, unhealthy: Mapping[str, str] | None = None,
) -> ContainerAllocation:
    """The response for one container that asked for ``device_ids`` (slots of ``gpu``)."""
    ids = list(device_ids)
    _check_ids(gpu.resource_name, ids, lambda d: parse_slot_id(d, gpu=gpu))
    reason = (unhealthy or {}).get(gpu.uuid)
    if reason is not None:
        raise InvalidRequest(f"{gpu.resource_name}: gpu{gpu.index} ({gpu.uuid}) is unhealthy: {reason}")
    envs = {
        SOCKET_ENV: socket.container_socket,
        "FAASTUBE_GPU_UUID": gpu.uuid,
        "FAASTUBE_GPU_INDEX": str(gpu.index),
    }
    mounts = (_socket_mount(socket),)
    if exposure.mode == "envvar":
        envs[VISIBLE_DEVICES_ENV] = gpu.uuid
        devices = tuple(DeviceNodeSpec(p, p) for p in gpu.device_paths)
        return ContainerAllocation(envs=envs, mounts=mounts, devices=devices)
    envs[VISIBLE_DEVICES_ENV] = NO_GPU
    name = exposure.cdi_device(gpu)
    if exposure.mode == "cdi":
        return ContainerAllocation(envs=envs, mounts=mounts, cdi_devices=(name,))
    # One annotation per container and resource; CDI keys are cdi.k8s.io/<plugin>_<device>.
    annotations = {f"{CDI_ANNOTATION_PREFIX}faastube_gpu{gpu.index}": name}
    return ContainerAllocation(envs=envs, mounts=mounts, annotations=annotations)


# --- faastube.io/socket -------------------------------------------------------------------


@dataclass(frozen=True)
class SocketResource:
    """``faastube.io/socket``: ``devices`` interchangeable devices ``socket-<k>``, each giving
    one container the sidecar's socket directory (and no GPU).

    It exists so that CPU functions and the gateway need no hostPath volume (forbidden by Pod
    Security "baseline"); requesting it also keeps them on nodes that run a sidecar. The count
    only caps how many such containers a node runs at once.
    """

    devices: int

    def __post_init__(self) -> None:
        if self.devices < 1:
            raise InvalidRequest(f"{SOCKET_RESOURCE}: devices must be >= 1, got {self.devices}")

    @property
    def resource_name(self) -> str:
        return SOCKET_RESOURCE

    @property
    def endpoint(self) -> str:
        return "faastube-socket.sock"

    def device_ids(self) -> list[str]:
        return [f"socket-{k}" for k in range(self.devices)]


def parse_socket_id(device_id: str, *, resource: SocketResource) -> int:
    m = _SOCKET_ID.match(device_id)
    if m is None:
        raise InvalidRequest(f"unknown device id {device_id!r}: expected socket-<k>")
    k = int(m.group(1))
    if k >= resource.devices:
        raise InvalidRequest(f"unknown device id {device_id!r}: {SOCKET_RESOURCE} has "
                             f"socket-0..socket-{resource.devices - 1}")
    return k


def preferred_socket_allocation(
    resource: SocketResource, *, available: Sequence[str], must_include: Sequence[str], size: int
) -> list[str]:
    return _lowest_first(lambda d: parse_socket_id(d, resource=resource), available=available,
                         must_include=must_include, size=size)


def socket_allocation(
    resource: SocketResource, device_ids: Iterable[str], *, socket: SocketMount
) -> ContainerAllocation:
    """The socket directory and its path; ``NVIDIA_VISIBLE_DEVICES=void`` so that a CPU
    function built on a CUDA image takes no GPU where NVIDIA's runtime is the default."""
    ids = list(device_ids)
    _check_ids(resource.resource_name, ids, lambda d: parse_socket_id(d, resource=resource))
    envs = {SOCKET_ENV: socket.container_socket, VISIBLE_DEVICES_ENV: NO_GPU}
    return ContainerAllocation(envs=envs, mounts=(_socket_mount(socket),))
