"""The GpuNode document: written by each node's sidecar, read by the operator.

``spec.topology`` is the node's part of a Topology document (``topology.dump_node``);
``status`` is what the sidecar reports every heartbeat. ``GpuNodeStatus`` is the
writer's typed view of ``status``; ``node_state`` is the reader's, tolerant of anything
a hand-edited or older object may hold, since a bad GpuNode must not fail placement
for the whole cluster.

Two parts of ``status`` say how the node reaches other nodes: ``nics``, the network
interfaces its sidecar found usable for passing (``Nic``), and ``network``, present only
when the sidecar serves reads from other nodes' sidecars (``PeerNetwork``: where to
reach it and its NIXL agent). Placement spreads a workflow over several nodes only when
every one of them has ``network`` (docs/placement.md). Their readers (``parse_nics``,
``parse_network``) are strict and raise ``GpuNodeFieldInvalid`` naming the field, so the
operator can leave out exactly the part that is bad and say why.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import re
from collections.abc import Mapping
from typing import Any, Final, Literal

from faastube.errors import InvalidRequest

from faastube_spec import api

ConditionStatus = Literal["True", "False", "Unknown"]
MANAGED_BY_LABEL = {"app.kubernetes.io/managed-by": "faastube-sidecar"}


@dataclasses.dataclass(frozen=True)
class GpuReport:
    """One GPU as the sidecar sees it at a heartbeat."""

    index: int
    uuid: str
    healthy: bool
    pool_reserved_bytes: int
    pool_used_bytes: int
    free_memory_bytes: int

    def to_body(self) -> dict[str, Any]:
        return {"index": self.index, "uuid": self.uuid, "healthy": self.healthy,
                "poolReservedBytes": self.pool_reserved_bytes, "poolUsedBytes": self.pool_used_bytes,
                "freeMemoryBytes": self.free_memory_bytes}


@dataclasses.dataclass(frozen=True)
class Condition:
    type: str
    status: ConditionStatus
    reason: str
    message: str
    last_transition_time: str  # RFC 3339

    def to_body(self) -> dict[str, Any]:
        return {"type": self.type, "status": self.status, "reason": self.reason,
                "message": self.message, "lastTransitionTime": self.last_transition_time}


# Linux interface names: at most IFNAMSIZ - 1 = 15 bytes, no '/', no whitespace, not '.'/'..'.
_IFNAME = re.compile(r"^(?!\.{1,2}$)[^/\s:]{1,15}$")
# A DNS-1123 name or label (what a NIXL agent is named after: the node), or any
# printable name without spaces up to 253 characters.
_AGENT = re.compile(r"^[!-~]{1,253}$")
_HOSTNAME = re.compile(r"^(?=.{1,253}$)[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
# How many NICs one transfer may use at once when the sidecar does not say: UCX stripes
# a large (rendezvous) transfer over up to UCX_MAX_RNDV_RAILS NICs, 2 by default.
DEFAULT_NICS_PER_TRANSFER: Final = 2


class GpuNodeFieldInvalid(InvalidRequest):
    """A GpuNode field does not hold what its writer promises; the message starts with its path."""

    def __init__(self, path: str, message: str) -> None:
        self.path, self.detail = path, message
        super().__init__(f"{path}: {message}")


@dataclasses.dataclass(frozen=True)
class Nic:
    """A network interface the sidecar could pass data over.

    ``speed_bytes_per_s`` is the link speed the kernel reports (None when it reports
    none, as virtio NICs do); ``rdma_device`` the RDMA device on top of it (``mlx5_0``;
    InfiniBand or RoCE), None for a NIC reached only through TCP.
    """

    name: str
    speed_bytes_per_s: int | None
    rdma_device: str | None = None

    def __post_init__(self) -> None:
        _check_nic(self, "nic")

    @property
    def rdma(self) -> bool:
        return self.rdma_device is not None

    def to_body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"name": self.name, "rdma": self.rdma}
        if self.speed_bytes_per_s is not None:
            body["speedBytesPerSecond"] = self.speed_bytes_per_s
        if self.rdma_device is not None:
            body["rdmaDevice"] = self.rdma_device
        return body


def _check_nic(nic: Nic, path: str) -> None:
    if not isinstance(nic.name, str) or not _IFNAME.match(nic.name):
        raise GpuNodeFieldInvalid(f"{path}.name", f"not an interface name: {nic.name!r}")
    speed = nic.speed_bytes_per_s
    if speed is not None and (isinstance(speed, bool) or not isinstance(speed, int) or speed <= 0):
        raise GpuNodeFieldInvalid(f"{path}.speedBytesPerSecond",
                                  f"must be a whole number of bytes/s > 0, got {speed!r}")
    device = nic.rdma_device
    if device is not None and (not isinstance(device, str) or not _IFNAME.match(device)):
        raise GpuNodeFieldInvalid(f"{path}.rdmaDevice", f"not an RDMA device name: {device!r}")


@dataclasses.dataclass(frozen=True)
class PeerNetwork:
    """How other nodes' sidecars reach this one for cross-node reads.

    ``address`` (an IP address or DNS name) and ``peer_port`` are where it listens,
    ``agent`` its NIXL agent's name. ``nics_per_transfer`` says how many NICs one
    transfer may use at once (the sidecar stripes large transfers over several NICs,
    UCX "rails"): placement prices the link to this node as its fastest that many
    NICs together.
    """

    address: str
    peer_port: int
    agent: str
    nics_per_transfer: int = DEFAULT_NICS_PER_TRANSFER

    def __post_init__(self) -> None:
        _check_network(self, "network")

    def to_body(self) -> dict[str, Any]:
        return {"address": self.address, "peerPort": self.peer_port, "agent": self.agent,
                "nicsPerTransfer": self.nics_per_transfer}


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return bool(_HOSTNAME.match(text))
    return True


def _check_network(network: PeerNetwork, path: str) -> None:
    if not isinstance(network.address, str) or not _is_address(network.address):
        raise GpuNodeFieldInvalid(f"{path}.address",
                                  f"must be an IP address or a DNS name, got {network.address!r}")
    port = network.peer_port
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise GpuNodeFieldInvalid(f"{path}.peerPort", f"must be a port number 1-65535, got {port!r}")
    if not isinstance(network.agent, str) or not _AGENT.match(network.agent):
        raise GpuNodeFieldInvalid(f"{path}.agent",
                                  f"must be a NIXL agent name (1-253 printable characters, no spaces), "
                                  f"got {network.agent!r}")
    count = network.nics_per_transfer
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise GpuNodeFieldInvalid(f"{path}.nicsPerTransfer", f"must be an integer >= 1, got {count!r}")


def _field(doc: Mapping[str, Any], key: str, path: str, kinds: tuple[type, ...], *,
           required: bool) -> Any:
    if key not in doc or doc[key] is None:
        if required:
            raise GpuNodeFieldInvalid(f"{path}.{key}", "is required")
        return None
    value = doc[key]
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise GpuNodeFieldInvalid(f"{path}.{key}", f"must be {' or '.join(k.__name__ for k in kinds)}, "
                                                   f"got {value!r}")
    return value


def _only(doc: Mapping[str, Any], allowed: set[str], path: str) -> None:
    for key in doc:
        if key not in allowed:
            raise GpuNodeFieldInvalid(f"{path}.{key}", f"unknown field (allowed: {', '.join(sorted(allowed))})")


def parse_nics(value: Any, path: str = "status.nics") -> tuple[Nic, ...]:
    """``status.nics`` as published (``Nic.to_body`` of each); () when absent."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise GpuNodeFieldInvalid(path, f"must be a list, got {type(value).__name__}")
    nics: list[Nic] = []
    for i, doc in enumerate(value):
        item = f"{path}[{i}]"
        if not isinstance(doc, Mapping):
            raise GpuNodeFieldInvalid(item, f"must be a mapping, got {type(doc).__name__}")
        _only(doc, {"name", "rdma", "speedBytesPerSecond", "rdmaDevice"}, item)
        name = _field(doc, "name", item, (str,), required=True)
        rdma = _field(doc, "rdma", item, (bool,), required=True)
        speed = _field(doc, "speedBytesPerSecond", item, (int,), required=False)
        device = _field(doc, "rdmaDevice", item, (str,), required=False)
        if rdma != (device is not None):
            raise GpuNodeFieldInvalid(f"{item}.rdmaDevice",
                                      "must be given exactly when rdma is true" if rdma else
                                      "given, but rdma is false")
        try:
            nic = Nic(name, speed, device)
        except GpuNodeFieldInvalid as e:
            raise GpuNodeFieldInvalid(e.path.replace("nic", item, 1), e.detail) from None
        if any(n.name == nic.name for n in nics):
            raise GpuNodeFieldInvalid(f"{item}.name", f"duplicate interface {nic.name!r}")
        nics.append(nic)
    return tuple(nics)


def parse_network(value: Any, path: str = "status.network") -> PeerNetwork | None:
    """``status.network`` as published (``PeerNetwork.to_body``); None when absent."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise GpuNodeFieldInvalid(path, f"must be a mapping, got {type(value).__name__}")
    _only(value, {"address", "peerPort", "agent", "nicsPerTransfer"}, path)
    address = _field(value, "address", path, (str,), required=True)
    port = _field(value, "peerPort", path, (int,), required=True)
    agent = _field(value, "agent", path, (str,), required=True)
    count = _field(value, "nicsPerTransfer", path, (int,), required=False)
    try:
        return PeerNetwork(address=address, peer_port=port, agent=agent,
                           nics_per_transfer=DEFAULT_NICS_PER_TRANSFER if count is None else count)
    except GpuNodeFieldInvalid as e:
        raise GpuNodeFieldInvalid(e.path.replace("network", path, 1), e.detail) from None


def passing_bandwidth_bytes_per_s(nics: tuple[Nic, ...], *,
                                  nics_per_transfer: int = DEFAULT_NICS_PER_TRANSFER) -> float | None:
    """How fast this node's sidecar can move one transfer to another node, from its NICs.

    The NICs a transfer would use: the RDMA ones when there are any (UCX prefers them
    and does not stripe RDMA with TCP), else all; of those, the fastest
    ``nics_per_transfer`` together. None when no such NIC reports a speed.
    """
    if nics_per_transfer < 1:
        raise ValueError(f"nics_per_transfer must be >= 1, got {nics_per_transfer}")
    rdma = [n for n in nics if n.rdma and n.speed_bytes_per_s is not None]
    usable = rdma or [n for n in nics if n.speed_bytes_per_s is not None]
    speeds = sorted((float(n.speed_bytes_per_s or 0) for n in usable), reverse=True)
    total = math.fsum(speeds[:nics_per_transfer])
    return total if total > 0 else None


@dataclasses.dataclass(frozen=True)
class GpuNodeStatus:
    gpus: tuple[GpuReport, ...]
    free_pool_bytes: int
    last_heartbeat_time: str  # RFC 3339; the operator only compares it with itself
    ready: Condition
    nics: tuple[Nic, ...] = ()
    network: PeerNetwork | None = None  # None: serves no reads from other nodes

    def to_body(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "gpus": [g.to_body() for g in self.gpus], "freePoolBytes": self.free_pool_bytes,
            "lastHeartbeatTime": self.last_heartbeat_time, "conditions": [self.ready.to_body()],
            "nics": [n.to_body() for n in self.nics]}
        if self.network is not None:
            body["network"] = self.network.to_body()
        return body


def new_body(name: str, topology_doc: Mapping[str, Any], *,
             owner: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The GpuNode a sidecar creates for its node (status follows with the first heartbeat)."""
    metadata: dict[str, Any] = {"name": name, "labels": dict(MANAGED_BY_LABEL)}
    if owner is not None:
        metadata["ownerReferences"] = [dict(owner)]
    return {"apiVersion": api.API_VERSION, "kind": api.GPUNODE_KIND, "metadata": metadata,
            "spec": {"topology": dict(topology_doc)}}


@dataclasses.dataclass(frozen=True)
class NodeState:
    """What placement and re-placement read from a GpuNode: is it usable, which GPUs."""

    name: str
    ready: bool
    healthy_gpus: frozenset[int]
    # Its sidecar serves reads from other nodes (a valid ``status.network``): placement
    # may spread a workflow over it and other such nodes.
    cross_node: bool = False


def ready_condition(body: Mapping[str, Any]) -> Mapping[str, Any] | None:
    for cond in (body.get("status") or {}).get("conditions") or []:
        if isinstance(cond, Mapping) and cond.get("type") == "Ready":
            return cond
    return None


def node_state(body: Mapping[str, Any]) -> NodeState:
    """A GpuNode object as the API server returns it, read leniently: a GPU counts unless
    the status says it is unhealthy, the node unless Ready is False."""
    name = str((body.get("metadata") or {}).get("name", ""))
    spec_gpus = ((body.get("spec") or {}).get("topology") or {}).get("gpus") or []
    status = body.get("status") or {}
    unhealthy = {g.get("index") for g in status.get("gpus") or []
                 if isinstance(g, Mapping) and g.get("healthy") is False}
    indices = frozenset(int(g["index"]) for g in spec_gpus
                        if isinstance(g, Mapping) and isinstance(g.get("index"), int)
                        and g["index"] not in unhealthy)
    ready = ready_condition(body)
    try:
        cross_node = parse_network(status.get("network")) is not None
    except GpuNodeFieldInvalid:
        cross_node = False  # the operator's cluster reader says why, once per placement
    return NodeState(name=name, ready=not (ready is not None and ready.get("status") == "False"),
                     healthy_gpus=indices, cross_node=cross_node)


def heartbeat_of(body: Mapping[str, Any]) -> str | None:
    value = (body.get("status") or {}).get("lastHeartbeatTime")
    return str(value) if value is not None else None
