"""The kubelet device plugin (API v1beta1): one extended resource per GPU.

``devices`` holds the pure policy, ``plugin`` the gRPC servicer, ``service`` the
lifecycle (servers, registration, kubelet restarts). ``api_pb2*`` are generated from
``api.proto`` by ``regen.sh``.
"""

from faastube_sidecar.deviceplugin.devices import GpuDevice, SocketMount, gpu_devices_from_topology
from faastube_sidecar.deviceplugin.service import DevicePluginService, DevicePluginSettings

__all__ = [
    "DevicePluginService",
    "DevicePluginSettings",
    "GpuDevice",
    "SocketMount",
    "gpu_devices_from_topology",
]
