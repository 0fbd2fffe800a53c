"""NIC discovery on recorded sysfs trees: which interfaces count, their speed, RDMA."""

from __future__ import annotations

from pathlib import Path

import pytest
from faastube_sidecar import nics
from faastube_spec.gpunode import Nic

GBIT = 125_000_000  # bytes/s in one Gbit/s


def _interface(root: Path, name: str, *, speed: str | None = None, operstate: str = "up",
               kind: str = "1", pci: str | None = "0000:17:00.0") -> None:
    """An interface as the kernel lays it out: the class entry links into /sys/devices,
    and a physical one has a ``device`` link to its PCI function."""
    if pci is None:
        real = root / "devices" / "virtual" / "net" / name
    else:
        pci_dir = root / "devices" / "pci0000:00" / pci
        pci_dir.mkdir(parents=True, exist_ok=True)
        real = pci_dir / "net" / name
    real.mkdir(parents=True)
    if pci is not None:
        (real / "device").symlink_to(pci_dir)
    (real / "operstate").write_text(operstate + "\n")
    (real / "type").write_text(kind + "\n")
    if speed is not None:
        (real / "speed").write_text(speed + "\n")
    link = root / "class" / "net" / name
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(real)


def _rdma(root: Path, device: str, interface: str, *, rate: str | None = None) -> None:
    (root / "class" / "infiniband" / device / "device" / "net" / interface).mkdir(parents=True)
    if rate is not None:
        port = root / "class" / "infiniband" / device / "ports" / "1"
        port.mkdir(parents=True)
        (port / "rate").write_text(rate + "\n")


@pytest.fixture
def gpu_server(tmp_path: Path) -> Path:
    """A GPU server as recorded: two InfiniBand ports, a RoCE port, management Ethernet,
    and what the host's container runtime and CNI add."""
    _interface(tmp_path, "lo", kind="772", operstate="unknown", pci=None, speed=None)
    _interface(tmp_path, "eno1", speed="25000", pci="0000:01:00.0")
    _interface(tmp_path, "ibp24s0", speed="400000", kind="32", pci="0000:18:00.0")
    _interface(tmp_path, "ibp41s0", speed="400000", kind="32", pci="0000:29:00.0")
    _interface(tmp_path, "enp3s0", speed="-1", operstate="down", pci="0000:03:00.0")
    _interface(tmp_path, "docker0", speed="10000", pci=None)
    _interface(tmp_path, "cni0", speed=None, pci=None)
    _interface(tmp_path, "veth1a2b3c", speed="10000", pci=None)
    _rdma(tmp_path, "mlx5_0", "ibp24s0")
    _rdma(tmp_path, "mlx5_1", "ibp41s0")
    return tmp_path


def test_physical_nics_that_are_up_count_with_speed_and_rdma_device(gpu_server: Path) -> None:
    scan = nics.discover_nics(gpu_server)
    assert scan.nics == (
        Nic("eno1", 25 * GBIT),
        Nic("ibp24s0", 400 * GBIT, "mlx5_0"),
        Nic("ibp41s0", 400 * GBIT, "mlx5_1"),
    )
    assert dict(scan.skipped) == {
        "lo": "loopback", "docker0": "virtual (no device)", "cni0": "virtual (no device)",
        "veth1a2b3c": "virtual (no device)", "enp3s0": "not up (operstate down)"}
    assert scan.notes == ()


def test_a_speed_the_kernel_does_not_know_is_unknown_not_guessed(tmp_path: Path) -> None:
    _interface(tmp_path, "ens5", speed="-1")  # a virtio NIC in a VM
    _interface(tmp_path, "ens6", speed="4294967295", pci="0000:00:06.0")  # an unsigned -1
    _interface(tmp_path, "ens7", speed=None, pci="0000:00:07.0")  # reading it fails (EINVAL)
    scan = nics.discover_nics(tmp_path)
    assert [(n.name, n.speed_bytes_per_s) for n in scan.nics] == [("ens5", None), ("ens6", None), ("ens7", None)]
    assert scan.notes == ()


def test_garbage_in_a_speed_file_is_named_in_a_note(tmp_path: Path) -> None:
    _interface(tmp_path, "eth0", speed="fast")
    _interface(tmp_path, "eth1", speed="99999999999", pci="0000:17:00.1")
    scan = nics.discover_nics(tmp_path)
    assert [n.speed_bytes_per_s for n in scan.nics] == [None, None]
    assert len(scan.notes) == 2
    assert "class/net/eth0/speed: 'fast' is not a whole number of Mbit/s" in scan.notes[0]
    assert "99999999999 Mbit/s is out of range" in scan.notes[1]


def test_roce_on_ethernet_is_rdma_and_an_ib_port_rate_fills_an_unknown_speed(tmp_path: Path) -> None:
    _interface(tmp_path, "enp1s0f0np0", speed="100000")
    _rdma(tmp_path, "mlx5_2", "enp1s0f0np0")
    _interface(tmp_path, "ib0", speed="-1", kind="32", pci="0000:18:00.0")
    _rdma(tmp_path, "mlx5_0", "ib0", rate="200 Gb/sec (4X HDR)")
    scan = nics.discover_nics(tmp_path)
    assert scan.nics == (Nic("enp1s0f0np0", 100 * GBIT, "mlx5_2"), Nic("ib0", 200 * GBIT, "mlx5_0"))
    assert all(n.rdma for n in scan.nics)


def test_an_interface_name_that_cannot_be_published_is_left_out_with_the_reason(tmp_path: Path) -> None:
    _interface(tmp_path, "a-name-longer-than-ifnamsiz", speed="1000")
    scan = nics.discover_nics(tmp_path)
    assert scan.nics == ()
    assert scan.skipped[0][0] == "a-name-longer-than-ifnamsiz"
    assert "cannot be published: not an interface name" in scan.skipped[0][1]


def test_a_root_that_is_not_sysfs_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(nics.NicDiscoveryError, match=r"class/net: no such directory; is sysfs mounted"):
        nics.discover_nics(tmp_path / "nowhere")


def test_a_pod_without_host_network_sees_only_its_veth_and_finds_no_nic(tmp_path: Path) -> None:
    _interface(tmp_path, "lo", kind="772", operstate="unknown", pci=None)
    _interface(tmp_path, "eth0", speed="10000", pci=None)  # the pod's end of a veth pair
    assert nics.discover_nics(tmp_path).nics == ()
