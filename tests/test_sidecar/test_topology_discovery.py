"""NVML discovery, translated from recorded fake machines (and the real NVML on a GPU host)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from faastube_sidecar import discovery
from faastube_spec import topology
from faastube_spec.topology import GBPS


class FakeNvmlError(Exception):
    pass


@dataclass
class FakeGpu:
    uuid: str
    bus_id: str  # as NVML reports it: 8-digit domain, upper case
    pcie: tuple[int, int] = (5, 16)
    numa: int | None = 0
    nvlinks: list[tuple[str, int]] = field(default_factory=list)  # (remote bus id, remote type)
    nvlink_version: int = 6   # what NVML reports for NVLink 4.0 (H100): NVML_NVLINK_VERSION_4_0


class FakeNvml:
    """A recorded machine behind the ``discovery.Nvml`` seam: hardware, not our code, is faked."""

    NVMLError = FakeNvmlError

    def __init__(self, gpus: list[FakeGpu], ancestors: dict[tuple[int, int], int],
                 p2p_ok: set[tuple[int, int]], *, numa_supported: bool = True) -> None:
        self.gpus = gpus
        self.ancestors = ancestors
        self.p2p_ok = p2p_ok
        self.numa_supported = numa_supported
        self.initialised = False
        self.shut_down = False

    def nvmlInit(self) -> None:
        self.initialised = True

    def nvmlShutdown(self) -> None:
        self.shut_down = True

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetUUID(self, handle: int) -> str:
        return self.gpus[handle].uuid

    def nvmlDeviceGetName(self, handle: int) -> bytes:
        return b"NVIDIA H100 80GB HBM3"  # older bindings return bytes

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> Any:
        return SimpleNamespace(total=85520809984, free=85000000000, used=520809984)

    def nvmlDeviceGetPciInfo(self, handle: int) -> Any:
        return SimpleNamespace(busId=self.gpus[handle].bus_id.encode())

    def nvmlDeviceGetMaxPcieLinkGeneration(self, handle: int) -> int:
        return self.gpus[handle].pcie[0]

    def nvmlDeviceGetMaxPcieLinkWidth(self, handle: int) -> int:
        return self.gpus[handle].pcie[1]

    def nvmlDeviceGetNumaNodeId(self, handle: int) -> int:
        numa = self.gpus[handle].numa
        if not self.numa_supported or numa is None:
            raise FakeNvmlError("Not Supported")
        return numa

    def _link(self, handle: int, link: int) -> tuple[str, int]:
        links = self.gpus[handle].nvlinks
        if link >= len(links):
            raise FakeNvmlError("Invalid Argument")
        return links[link]

    def nvmlDeviceGetNvLinkState(self, handle: int, link: int) -> int:
        self._link(handle, link)
        return 1

    def nvmlDeviceGetNvLinkVersion(self, handle: int, link: int) -> int:
        self._link(handle, link)
        return self.gpus[handle].nvlink_version

    def nvmlDeviceGetNvLinkRemotePciInfo(self, handle: int, link: int) -> Any:
        return SimpleNamespace(busId=self._link(handle, link)[0])

    def nvmlDeviceGetNvLinkRemoteDeviceType(self, handle: int, link: int) -> int:
        return self._link(handle, link)[1]

    def nvmlDeviceGetP2PStatus(self, h1: int, h2: int, index: int) -> int:
        assert index == 0  # NVML_P2P_CAPS_INDEX_READ
        return 0 if (min(h1, h2), max(h1, h2)) in self.p2p_ok else 4

    def nvmlDeviceGetTopologyCommonAncestor(self, h1: int, h2: int) -> int:
        return self.ancestors[(min(h1, h2), max(h1, h2))]


SWITCH, GPU = 2, 0


def lent_machine() -> FakeNvml:
    """4x H100 on an NVSwitch: every GPU has 18 links into the switch, own PCIe Gen5 x16."""
    buses = [f"00000000:{0x19 + 0x20 * i:02X}:00.0" for i in range(4)]
    gpus = [FakeGpu(f"GPU-{i}", buses[i], nvlinks=[("00000000:C0:00.0", SWITCH)] * 18)
            for i in range(4)]
    pairs = [(a, b) for a in range(4) for b in range(a + 1, 4)]
    return FakeNvml(gpus, {p: 30 for p in pairs}, set(pairs))


def mixed_machine() -> FakeNvml:
    """Three V100s: 0-1 NVLink2 x2 and behind one PCIe switch; 2 on the other socket."""
    buses = ["00000000:06:00.0", "00000000:07:00.0", "00000000:85:00.0"]
    gpus = [
        FakeGpu("GPU-a", buses[0], pcie=(3, 16), nvlinks=[(buses[1], GPU)] * 2, nvlink_version=2),
        FakeGpu("GPU-b", buses[1], pcie=(3, 16), nvlinks=[(buses[0], GPU)] * 2, nvlink_version=2),
        FakeGpu("GPU-c", buses[2], pcie=(3, 16), numa=None),
    ]
    ancestors = {(0, 1): 10, (0, 2): 50, (1, 2): 50}
    return FakeNvml(gpus, ancestors, {(0, 1)}, numa_supported=False)


def test_an_nvswitch_machine_links_every_pair_with_the_whole_port() -> None:
    node = discovery.discover_node(lent_machine(), node_name="gpu-node-1")
    assert node.name == "gpu-node-1"
    assert [g.uuid for g in node.gpus] == ["GPU-0", "GPU-1", "GPU-2", "GPU-3"]
    gpu = node.gpu(0)
    assert gpu.name == "NVIDIA H100 80GB HBM3" and gpu.memory_bytes == 85520809984
    assert gpu.pcie_bus_id == "0000:19:00.0"
    assert (gpu.pcie_generation, gpu.pcie_width, gpu.numa_node) == (5, 16, 0)
    assert 52 * GBPS < gpu.pcie_bandwidth_bytes_per_s < 55 * GBPS
    assert gpu.pcie_switch is None
    assert gpu.nvlink_bandwidth_bytes_per_s == 18 * 25 * GBPS
    assert len(node.links) == 6
    for link in node.links:
        assert (link.kind, link.nvlink_count, link.p2p) == ("nvlink", 18, True)
        assert link.bandwidth_bytes_per_s == 450 * GBPS
        assert link.pcie_relation == "same-host-bridge"


def test_a_direct_wired_machine_counts_links_per_pair_and_finds_switches_and_sockets(
        tmp_path: Path) -> None:
    sysfs = tmp_path / "devices"
    (sysfs / "0000:85:00.0").mkdir(parents=True)
    (sysfs / "0000:85:00.0" / "numa_node").write_text("1\n")
    (sysfs / "0000:06:00.0").mkdir()
    (sysfs / "0000:06:00.0" / "numa_node").write_text("-1\n")  # unknown
    node = discovery.discover_node(
        mixed_machine(), node_name="v100",
        numa_lookup=lambda bus: discovery.numa_node_from_sysfs(bus, root=sysfs))
    nv = node.link(0, 1)
    assert nv is not None and (nv.kind, nv.nvlink_count, nv.p2p) == ("nvlink", 2, True)
    assert nv.bandwidth_bytes_per_s == 50 * GBPS
    assert nv.pcie_relation == "same-switch"
    cross = node.link(1, 2)
    assert cross is not None and (cross.kind, cross.p2p) == ("pcie", False)
    assert cross.pcie_relation == "cross-socket"
    assert cross.bandwidth_bytes_per_s == pytest.approx(
        node.gpu(2).pcie_bandwidth_bytes_per_s * discovery.PCIE_RELATION_FACTOR["cross-socket"])
    assert [g.pcie_switch for g in node.gpus] == ["sw0", "sw0", None]
    assert [g.numa_node for g in node.gpus] == [None, None, 1]  # NVML unsupported: sysfs
    assert all(g.nvlink_bandwidth_bytes_per_s is None for g in node.gpus)
    # What discovery builds is a valid document.
    assert topology.parse_node(topology.dump_node(node)) == node


def test_discovered_topologies_plan_like_the_simulated_ones() -> None:
    from faastube_sidecar.transfers import planner

    discovered = discovery.discover_node(lent_machine(), node_name="n")
    plan = planner.plan_paths(discovered, "host", 0)
    assert {p.hops[1] for p in plan.paths} == {0, 1, 2, 3}


def test_no_gpu_and_failing_nvml_are_reported_clearly() -> None:
    empty = FakeNvml([], {}, set())
    with pytest.raises(discovery.NoGpuVisible, match="sees no GPU"):
        discovery.discover_local_node(nvml=empty)
    assert empty.initialised and empty.shut_down

    class Broken(FakeNvml):
        def nvmlInit(self) -> None:
            raise FakeNvmlError("Driver Not Loaded")

    with pytest.raises(discovery.NoGpuVisible, match="Driver Not Loaded"):
        discovery.discover_local_node(nvml=Broken([], {}, set()))

    class Flaky(FakeNvml):
        def nvmlDeviceGetMemoryInfo(self, handle: int) -> Any:
            raise FakeNvmlError("GPU is lost")

    with pytest.raises(discovery.DiscoveryError, match="GPU is lost"):
        discovery.discover_local_node(nvml=Flaky(lent_machine().gpus, lent_machine().ancestors,
                                                 set()))


@pytest.mark.parametrize(("bus", "expected"), [("00000000:19:00.0", "0000:19:00.0"),
                                               (b"00000001:C1:00.0", "0001:c1:00.0"),
                                               ("0000:19:00.0", "0000:19:00.0")])
def test_bus_ids_are_normalised_to_sysfs_form(bus: str | bytes, expected: str) -> None:
    assert discovery.normalize_bus_id(bus) == expected


def test_pcie_bandwidth_and_relations_follow_the_documented_tables() -> None:
    assert discovery.pcie_bandwidth_bytes_per_s(5, 16) == pytest.approx(3.938 * 16 * 0.85 * GBPS)
    assert discovery.pcie_bandwidth_bytes_per_s(3, 8) == pytest.approx(0.985 * 8 * 0.85 * GBPS)
    assert [discovery.pcie_relation(level) for level in (0, 10, 20, 30, 40, 50)] == [
        "same-switch", "same-switch", "same-switch", "same-host-bridge", "same-host-bridge",
        "cross-socket"]


@pytest.mark.gpu
def test_the_real_nvml_describes_this_machine() -> None:
    pynvml = pytest.importorskip("pynvml")
    try:
        pynvml.nvmlInit()
        count = pynvml.nvmlDeviceGetCount()
        pynvml.nvmlShutdown()
    except pynvml.NVMLError:
        pytest.skip("no NVIDIA driver or GPU visible")
    if count == 0:
        pytest.skip("no GPU visible")
    node = discovery.discover_local_node(node_name="real")
    assert len(node.gpus) == count
    assert len({g.uuid for g in node.gpus}) == count
    assert all(g.uuid.startswith(("GPU-", "MIG-")) and g.memory_bytes > 0 for g in node.gpus)
    assert all(g.pcie_bandwidth_bytes_per_s > 0 for g in node.gpus)
    assert len(node.links) == count * (count - 1) // 2
    assert topology.parse_node(topology.dump_node(node)) == node


@pytest.mark.parametrize("nvml_version, per_link_gbps", [(2, 25.0), (4, 25.0), (6, 25.0), (7, 50.0)])
def test_nvlink_rates_follow_nvmls_version_enum_not_the_generation(nvml_version, per_link_gbps) -> None:
    # NVML numbers versions 1.0, 2.0, 2.2, 3.0, 3.1, 4.0, 5.0 as 1..7: an H100 (NVLink 4.0)
    # reports 6; reading that as a generation doubled its bandwidth (900 instead of 450 GB/s).
    nvml = lent_machine()
    for gpu in nvml.gpus:
        gpu.nvlink_version = nvml_version
    node = discovery.discover_node(nvml, node_name="n")
    assert node.gpu(0).nvlink_bandwidth_bytes_per_s == 18 * per_link_gbps * GBPS
