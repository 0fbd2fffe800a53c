"""Discover this node's GPU topology from NVML, without creating a CUDA context.

Why NVML: the daemon must not pay a CUDA context (hundreds of MB) on GPUs it does not
serve, and NVML answers everything the planner needs: PCIe generation and width, NUMA
node, which NVLinks are up and where they lead, P2P support and the PCIe relation
between GPUs. The NVML module is a seam (:class:`Nvml`): production passes ``pynvml``
(nvidia-ml-py, imported lazily), tests pass a recorded fake machine.

Estimates, not measurements: PCIe bandwidth is the lane rate times the width times
``PCIE_EFFICIENCY`` (Gen5 x16 gives ~53 GB/s, as measured with pinned memory); NVLink
bandwidth is links times the per-link rate of its NVLink version; a PCIe pair's
bandwidth is the narrower GPU link scaled by its relation (``PCIE_RELATION_FACTOR``).
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final, Protocol

from faastube.errors import FaastubeError
from faastube_spec.topology import (
    GBPS,
    Gpu,
    GpuLink,
    NodeTopology,
    PcieRelation,
)

logger = logging.getLogger(__name__)

# Lane payload rate in GB/s after line encoding, by PCIe generation.
PCIE_LANE_GBPS: Final[dict[int, float]] = {1: 0.25, 2: 0.5, 3: 0.985, 4: 1.969, 5: 3.938,
                                           6: 7.563}
PCIE_EFFICIENCY: Final = 0.85  # TLP/DLLP overhead: pinned copies reach ~85% of the lane rate
# Per-link, per-direction NVLink rate in GB/s, keyed by NVML's nvmlNvlinkVersion_t
# (1: 1.0 P100, 2: 2.0 V100, 3: 2.2, 4: 3.0 A100, 5: 3.1, 6: 4.0 H100, 7: 5.0 B200, 8: 6.0),
# not by NVLink generation: an H100 reports 6 (18 links x 25 GB/s = 450 GB/s a direction).
NVLINK_LINK_GBPS: Final[dict[int, float]] = {1: 20.0, 2: 25.0, 3: 25.0, 4: 25.0, 5: 25.0, 6: 25.0,
                                             7: 50.0, 8: 50.0}
PCIE_RELATION_FACTOR: Final[dict[str, float]] = {
    "same-switch": 1.0, "same-host-bridge": 0.8, "cross-socket": 0.6}

# NVML ABI constants (stable across driver versions).
_P2P_CAPS_INDEX_READ: Final = 0
_P2P_STATUS_OK: Final = 0
_NVLINK_DEVICE_TYPE_SWITCH: Final = 2
_FEATURE_ENABLED: Final = 1
_TOPOLOGY_MULTIPLE: Final = 20  # INTERNAL (0), SINGLE (10), MULTIPLE (20): behind one switch
_TOPOLOGY_NODE: Final = 40  # HOSTBRIDGE (30), NODE (40): same socket
_MAX_NVLINKS: Final = 36
SYSFS_PCI_DEVICES: Final = Path("/sys/bus/pci/devices")


class DiscoveryError(FaastubeError):
    """Topology discovery failed in a way retrying will not fix."""


class NoGpuVisible(DiscoveryError):
    """NVML is missing or sees no GPU on this machine."""


class Nvml(Protocol):
    """The part of the ``pynvml`` module discovery uses (the seam for recorded fakes)."""

    @property
    def NVMLError(self) -> type[Exception]: ...  # read-only: a fake may use a subclass

    def nvmlInit(self) -> None: ...
    def nvmlShutdown(self) -> None: ...
    def nvmlDeviceGetCount(self) -> int: ...
    def nvmlDeviceGetHandleByIndex(self, index: int) -> Any: ...
    def nvmlDeviceGetUUID(self, handle: Any) -> str | bytes: ...
    def nvmlDeviceGetName(self, handle: Any) -> str | bytes: ...
    def nvmlDeviceGetMemoryInfo(self, handle: Any) -> Any: ...
    def nvmlDeviceGetPciInfo(self, handle: Any) -> Any: ...
    def nvmlDeviceGetMaxPcieLinkGeneration(self, handle: Any) -> int: ...
    def nvmlDeviceGetMaxPcieLinkWidth(self, handle: Any) -> int: ...
    def nvmlDeviceGetNumaNodeId(self, handle: Any) -> int: ...
    def nvmlDeviceGetNvLinkState(self, handle: Any, link: int) -> int: ...
    def nvmlDeviceGetNvLinkVersion(self, handle: Any, link: int) -> int: ...
    def nvmlDeviceGetNvLinkRemotePciInfo(self, handle: Any, link: int) -> Any: ...
    def nvmlDeviceGetNvLinkRemoteDeviceType(self, handle: Any, link: int) -> int: ...
    def nvmlDeviceGetP2PStatus(self, handle1: Any, handle2: Any, index: int) -> int: ...
    def nvmlDeviceGetTopologyCommonAncestor(self, handle1: Any, handle2: Any) -> int: ...


def load_nvml(module: Nvml | None = None) -> Nvml:
    """Initialise ``module`` (default: import ``pynvml``); :class:`NoGpuVisible` if impossible."""
    if module is None:
        try:
            import pynvml
        except ImportError as e:
            raise NoGpuVisible("NVML bindings are not installed (pip install nvidia-ml-py)") from e
        module = pynvml
    try:
        module.nvmlInit()
    except module.NVMLError as e:
        raise NoGpuVisible(f"NVML cannot initialise (no NVIDIA driver or GPU visible): {e}") from e
    return module


def pcie_bandwidth_bytes_per_s(generation: int, width: int) -> float:
    lane = PCIE_LANE_GBPS.get(generation)
    if lane is None:
        lane = PCIE_LANE_GBPS[max(PCIE_LANE_GBPS)]
        logger.warning("unknown PCIe generation %s; assuming Gen%s lane rate",
                       generation, max(PCIE_LANE_GBPS))
    return float(round(lane * width * PCIE_EFFICIENCY * GBPS))


def pcie_relation(common_ancestor: int) -> PcieRelation:
    if common_ancestor <= _TOPOLOGY_MULTIPLE:
        return "same-switch"
    if common_ancestor <= _TOPOLOGY_NODE:
        return "same-host-bridge"
    return "cross-socket"


def normalize_bus_id(bus_id: str | bytes) -> str:
    """NVML's ``00000000:19:00.0`` -> sysfs's ``0000:19:00.0`` (lower case)."""
    text = bus_id.decode() if isinstance(bus_id, bytes) else bus_id
    text = text.strip().lower()
    domain, sep, rest = text.partition(":")
    if sep and len(domain) > 4:
        domain = domain[-4:]
    return f"{domain}{sep}{rest}"


def _bytes_per_s(gbps: float) -> float:
    return float(round(gbps * GBPS))


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def numa_node_from_sysfs(bus_id: str, *, root: Path = SYSFS_PCI_DEVICES) -> int | None:
    try:
        value = int((root / bus_id / "numa_node").read_text().strip())
    except (OSError, ValueError):
        return None
    return value if value >= 0 else None


class _Switches:
    """Union-find of GPUs behind one PCIe switch, named sw0, sw1, ... by lowest index."""

    def __init__(self, indices: list[int]) -> None:
        self._parent = {i: i for i in indices}

    def find(self, i: int) -> int:
        while self._parent[i] != i:
            i = self._parent[i]
        return i

    def join(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        self._parent[max(ra, rb)] = min(ra, rb)

    def names(self) -> dict[int, str | None]:
        groups: dict[int, list[int]] = {}
        for i in self._parent:
            groups.setdefault(self.find(i), []).append(i)
        out: dict[int, str | None] = {}
        for n, root in enumerate(sorted(r for r, members in groups.items() if len(members) > 1)):
            for i in groups[root]:
                out[i] = f"sw{n}"
        return {i: out.get(i) for i in self._parent}


def discover_node(nvml: Nvml, *, node_name: str | None = None,
                  numa_lookup: Callable[[str], int | None] = numa_node_from_sysfs,
                  host_memory_bytes: int | None = None) -> NodeTopology:
    """Build this node's topology through an initialised NVML module."""
    err = nvml.NVMLError
    count = nvml.nvmlDeviceGetCount()
    if count == 0:
        raise NoGpuVisible("NVML sees no GPU on this machine")
    handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
    bus_ids = [normalize_bus_id(nvml.nvmlDeviceGetPciInfo(h).busId) for h in handles]
    index_by_bus = {b: i for i, b in enumerate(bus_ids)}

    # NVLinks: count links per GPU pair, and links into an NVSwitch per GPU.
    pair_links: dict[tuple[int, int], int] = {}
    pair_gbps: dict[tuple[int, int], float] = {}
    switch_links: dict[int, int] = {}
    switch_gbps: dict[int, float] = {}
    for i, h in enumerate(handles):
        for link in range(_MAX_NVLINKS):
            try:
                if nvml.nvmlDeviceGetNvLinkState(h, link) != _FEATURE_ENABLED:
                    continue
                remote_bus = normalize_bus_id(nvml.nvmlDeviceGetNvLinkRemotePciInfo(h, link).busId)
            except err:
                continue  # link absent or NVLink unsupported on this GPU
            try:
                version = nvml.nvmlDeviceGetNvLinkVersion(h, link)
            except err:
                version = 2
            gbps = NVLINK_LINK_GBPS.get(version, NVLINK_LINK_GBPS[max(NVLINK_LINK_GBPS)])
            try:
                remote_type = nvml.nvmlDeviceGetNvLinkRemoteDeviceType(h, link)
            except err:  # older drivers: an unknown bus id is not a GPU
                remote_type = -1
            peer = index_by_bus.get(remote_bus)
            if remote_type == _NVLINK_DEVICE_TYPE_SWITCH or peer is None:
                switch_links[i] = switch_links.get(i, 0) + 1
                switch_gbps[i] = switch_gbps.get(i, 0.0) + gbps
            elif peer > i:  # each side reports the link; count it from the lower index
                pair_links[(i, peer)] = pair_links.get((i, peer), 0) + 1
                pair_gbps[(i, peer)] = pair_gbps.get((i, peer), 0.0) + gbps

    gpu_pcie_bw: list[float] = []
    relations: dict[tuple[int, int], PcieRelation] = {}
    switches = _Switches(list(range(count)))
    for a in range(count):
        for b in range(a + 1, count):
            rel = pcie_relation(nvml.nvmlDeviceGetTopologyCommonAncestor(handles[a], handles[b]))
            relations[(a, b)] = rel
            if rel == "same-switch":
                switches.join(a, b)
    switch_names = switches.names()

    gpus: list[Gpu] = []
    for i, h in enumerate(handles):
        generation = nvml.nvmlDeviceGetMaxPcieLinkGeneration(h)
        width = nvml.nvmlDeviceGetMaxPcieLinkWidth(h)
        bandwidth = pcie_bandwidth_bytes_per_s(generation, width)
        gpu_pcie_bw.append(bandwidth)
        try:
            numa: int | None = nvml.nvmlDeviceGetNumaNodeId(h)
            if numa is not None and numa < 0:
                numa = None
        except (err, AttributeError):
            numa = None
        if numa is None:
            numa = numa_lookup(bus_ids[i])
        gpus.append(Gpu(
            index=i, uuid=_text(nvml.nvmlDeviceGetUUID(h)), name=_text(nvml.nvmlDeviceGetName(h)),
            memory_bytes=int(nvml.nvmlDeviceGetMemoryInfo(h).total), pcie_bus_id=bus_ids[i],
            pcie_generation=generation, pcie_width=width, pcie_bandwidth_bytes_per_s=bandwidth,
            pcie_switch=switch_names[i], numa_node=numa,
            nvlink_bandwidth_bytes_per_s=_bytes_per_s(switch_gbps[i]) if i in switch_gbps else None))

    links: list[GpuLink] = []
    for a in range(count):
        for b in range(a + 1, count):
            rel = relations[(a, b)]
            try:
                p2p = nvml.nvmlDeviceGetP2PStatus(handles[a], handles[b],
                                                  _P2P_CAPS_INDEX_READ) == _P2P_STATUS_OK
            except err:
                p2p = False
            if (a, b) in pair_links:
                links.append(GpuLink(a, b, "nvlink", pair_links[(a, b)], _bytes_per_s(pair_gbps[(a, b)]),
                                     p2p, rel))
            elif a in switch_links and b in switch_links:
                # Through the NVSwitch fabric: nvidia-smi's NV<n> is the smaller port.
                n = min(switch_links[a], switch_links[b])
                bw = _bytes_per_s(min(switch_gbps[a], switch_gbps[b]))
                links.append(GpuLink(a, b, "nvlink", n, bw, p2p, rel))
            else:
                bw = float(round(min(gpu_pcie_bw[a], gpu_pcie_bw[b]) * PCIE_RELATION_FACTOR[rel]))
                links.append(GpuLink(a, b, "pcie", 0, bw, p2p, rel))
    name = node_name or os.environ.get("NODE_NAME") or socket.gethostname()
    return NodeTopology(name=name, gpus=tuple(gpus), links=tuple(links),
                        host_memory_bytes=host_memory_bytes)


def host_memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return None


def discover_local_node(*, node_name: str | None = None, nvml: Nvml | None = None) -> NodeTopology:
    """Discover this machine's GPUs; :class:`NoGpuVisible` when there are none."""
    module = load_nvml(nvml)
    try:
        return discover_node(module, node_name=node_name, host_memory_bytes=host_memory_bytes())
    except module.NVMLError as e:
        raise DiscoveryError(f"NVML query failed during topology discovery: {e}") from e
    finally:
        try:
            module.nvmlShutdown()
        except module.NVMLError:
            logger.debug("nvmlShutdown failed", exc_info=True)
