"""Find the network interfaces this node could pass data to other nodes over (sysfs).

Placement prices an edge between two nodes by the network between them; the sidecar
knows its own NICs, so it reports them in its GpuNode (``status.nics``) and the
operator derives each link's bandwidth from both ends. Read from sysfs, not from a
library: ``/sys/class/net/<if>/`` has the link speed (Mbit/s), state and type, and
``/sys/class/infiniband/<dev>/device/net/<if>`` says which interfaces carry an RDMA
device (InfiniBand, or RoCE on Ethernet). The root is a parameter so that tests read
recorded trees.

Left out: the loopback, virtual interfaces (no ``device`` link: bridges, veth pairs,
tunnels, bonds and the CNI's interfaces) and interfaces that are not up. In a pod
without ``hostNetwork`` the sidecar sees only its own veth, so it finds no NIC and
placement uses the cluster's default network bandwidth. A speed the kernel does not know
(``-1``, an error reading it, as on a link without carrier or a virtio NIC) is published
as unknown, never guessed.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path
from typing import Final

from faastube.errors import FaastubeError
from faastube_spec.gpunode import GpuNodeFieldInvalid, Nic

logger = logging.getLogger(__name__)

SYSFS_ROOT: Final = Path("/sys")
BYTES_PER_S_PER_MBIT: Final = 125_000  # 10**6 bits / 8
# The fastest link speed believed (Mbit/s): 10 Tbit/s. Drivers print 65535 or
# 4294967295 (an unsigned -1) for "unknown"; anything above this is read so.
MAX_SPEED_MBIT: Final = 10_000_000
_ARPHRD_LOOPBACK: Final = 772
_UP_STATES: Final = frozenset({"up"})
_IB_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*Gb/sec")


class NicDiscoveryError(FaastubeError):
    """The sysfs tree cannot be read at all (not mounted, not a sysfs)."""


@dataclasses.dataclass(frozen=True)
class NicScan:
    """What a scan found: the usable NICs, the interfaces left out and why, and notes
    about values that could not be read (each naming the file and what it held)."""

    nics: tuple[Nic, ...]
    skipped: tuple[tuple[str, str], ...] = ()
    notes: tuple[str, ...] = ()


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="ascii", errors="replace").strip()
    except OSError:  # absent, or EINVAL (speed of a link that is down)
        return None


def _rdma_devices(root: Path) -> dict[str, str]:
    """Interface name -> the RDMA device on it, from /sys/class/infiniband/*/device/net/*."""
    found: dict[str, str] = {}
    folder = root / "class" / "infiniband"
    if not folder.is_dir():
        return found
    for device in sorted(folder.iterdir()):
        net = device / "device" / "net"
        if not net.is_dir():
            continue
        for interface in sorted(net.iterdir()):
            found.setdefault(interface.name, device.name)
    return found


def _ib_rate_mbit(root: Path, device: str) -> int | None:
    """The fastest active port rate of an RDMA device (``ports/N/rate``: "100 Gb/sec (4X EDR)")."""
    ports = root / "class" / "infiniband" / device / "ports"
    best = None
    if ports.is_dir():
        for port in sorted(ports.iterdir()):
            match = _IB_RATE.match(_read(port / "rate") or "")
            if match:
                mbit = int(float(match.group(1)) * 1000)
                best = mbit if best is None else max(best, mbit)
    return best


def _speed_mbit(text: str | None, where: Path, notes: list[str]) -> int | None:
    if text is None:
        return None
    try:
        value = int(text)
    except ValueError:
        notes.append(f"{where}: {text[:40]!r} is not a whole number of Mbit/s; speed unknown")
        return None
    if value <= 0 or value > MAX_SPEED_MBIT:
        if value not in (-1, 0, 65535, 4294967295):
            notes.append(f"{where}: {value} Mbit/s is out of range (1..{MAX_SPEED_MBIT}); speed unknown")
        return None
    return value


def discover_nics(root: Path | str = SYSFS_ROOT) -> NicScan:
    """This node's usable NICs, sorted by name. Raises ``NicDiscoveryError`` if
    ``root/class/net`` is not a directory."""
    root = Path(root)
    net = root / "class" / "net"
    if not net.is_dir():
        raise NicDiscoveryError(f"{net}: no such directory; is sysfs mounted at {root}?")
    rdma = _rdma_devices(root)
    nics: list[Nic] = []
    skipped: list[tuple[str, str]] = []
    notes: list[str] = []
    for folder in sorted(net.iterdir(), key=lambda p: p.name):
        name = folder.name
        kind = _read(folder / "type")
        if name == "lo" or kind == str(_ARPHRD_LOOPBACK):
            skipped.append((name, "loopback"))
            continue
        if not (folder / "device").exists():
            skipped.append((name, "virtual (no device)"))
            continue
        state = _read(folder / "operstate")
        if state not in _UP_STATES:
            skipped.append((name, f"not up (operstate {state or 'unreadable'})"))
            continue
        device = rdma.get(name)
        mbit = _speed_mbit(_read(folder / "speed"), folder / "speed", notes)
        if mbit is None and device is not None:
            mbit = _ib_rate_mbit(root, device)
        try:
            nics.append(Nic(name=name, speed_bytes_per_s=None if mbit is None else mbit * BYTES_PER_S_PER_MBIT,
                            rdma_device=device))
        except GpuNodeFieldInvalid as e:
            skipped.append((name, f"cannot be published: {e.detail}"))
    scan = NicScan(nics=tuple(nics), skipped=tuple(skipped), notes=tuple(notes))
    for note in scan.notes:
        logger.warning("NIC discovery: %s", note)
    logger.info("NICs usable for passing: %s (left out: %s)",
                ", ".join(_describe(n) for n in scan.nics) or "none",
                ", ".join(f"{n} ({why})" for n, why in scan.skipped) or "none")
    return scan


def _describe(nic: Nic) -> str:
    speed = "speed unknown" if nic.speed_bytes_per_s is None else f"{nic.speed_bytes_per_s * 8 / 1e9:g} Gbit/s"
    return f"{nic.name} ({speed}{', RDMA ' + nic.rdma_device if nic.rdma_device else ''})"
