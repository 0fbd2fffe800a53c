"""The kubelet device plugin (API v1beta1): one extended resource per GPU, and one for the
sidecar's socket.

``devices`` holds the pure policy, ``cdi`` the CDI names and spec checks, ``plugin`` the
gRPC servicers, ``service`` the lifecycle (servers, registration, kubelet restarts).
``api_pb2*`` are generated from ``api.proto`` by ``regen.sh``.
"""

from faastube_sidecar.deviceplugin.cdi import CdiCheckedHealth
from faastube_sidecar.deviceplugin.devices import (
    GpuDevice,
    GpuExposure,
    SocketMount,
    SocketResource,
    gpu_devices_from_topology,
)
from faastube_sidecar.deviceplugin.service import DevicePluginService, DevicePluginSettings

__all__ = [
    "CdiCheckedHealth",
    "DevicePluginService",
    "DevicePluginSettings",
    "GpuDevice",
    "GpuExposure",
    "SocketMount",
    "SocketResource",
    "gpu_devices_from_topology",
]
