"""The GPU topology document: what GPUs a node has and how they are wired.

Every placement and transfer decision in FaaSTube depends on the wiring: which GPU
pairs share NVLink and how many links, which GPUs sit behind one PCIe switch, how fast
each GPU's own PCIe link is. The sidecar discovers it once per node (NVML), publishes it
as the GpuNode resource's ``spec.topology``, and the operator and the transfer planner
read it back. Simulated topologies ship as package data so that planning can be tested
without the hardware.

This module is pure (stdlib + PyYAML): the light client, the operator and the sidecar
all import it. The document format is described in ``docs/topology.md``; bandwidths are
``GBps`` (10**9 bytes/s) in documents and bytes/s in the model.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from faastube.errors import InvalidRequest

from faastube_spec import api, documents

logger = logging.getLogger(__name__)

API_VERSION = api.API_VERSION
KIND = api.TOPOLOGY_KIND
GBPS = 1e9  # the document's bandwidth unit, in bytes/s
DEFAULT_SHARING_SLOTS = 4
DEFAULT_NETWORK_BANDWIDTH_BYTES_PER_S = 12.5 * GBPS  # 100 Gbit/s Ethernet

LinkKind = Literal["nvlink", "pcie"]
PcieRelation = Literal["same-switch", "same-host-bridge", "cross-socket"]
LINK_KINDS: tuple[str, ...] = ("nvlink", "pcie")
PCIE_RELATIONS: tuple[str, ...] = ("same-switch", "same-host-bridge", "cross-socket")


class TopologyError(InvalidRequest):
    """A topology document is malformed; the message starts with the field path."""

    def __init__(self, path: str, message: str) -> None:
        self.path = path
        self.detail = message
        super().__init__(f"{path}: {message}" if path else message)


@dataclass(frozen=True)
class Gpu:
    index: int
    uuid: str
    name: str
    memory_bytes: int
    pcie_bus_id: str
    pcie_generation: int
    pcie_width: int
    pcie_bandwidth_bytes_per_s: float
    pcie_switch: str | None = None
    numa_node: int | None = None
    sharing_slots: int = DEFAULT_SHARING_SLOTS
    # Total NVLink bandwidth of this GPU per direction, over all its links together.
    # None: the sum of its NVLink entries (direct-wired meshes). Set on NVSwitch systems,
    # where every pair entry reports the whole port and pairs share it.
    nvlink_bandwidth_bytes_per_s: float | None = None


@dataclass(frozen=True)
class GpuLink:
    a: int
    b: int
    kind: LinkKind
    nvlink_count: int
    bandwidth_bytes_per_s: float
    p2p: bool
    pcie_relation: PcieRelation | None = None

    def other(self, index: int) -> int:
        return self.b if index == self.a else self.a


@dataclass(frozen=True)
class NodeTopology:
    name: str
    gpus: tuple[Gpu, ...]
    links: tuple[GpuLink, ...] = ()
    host_memory_bytes: int | None = None
    _gpu_by_index: dict[int, Gpu] = field(
        init=False, repr=False, compare=False, hash=False, default_factory=dict)
    _link_by_pair: dict[tuple[int, int], GpuLink] = field(
        init=False, repr=False, compare=False, hash=False, default_factory=dict)

    def __post_init__(self) -> None:
        # Lookup tables built once; they are private and never mutated afterwards.
        self._gpu_by_index.update((g.index, g) for g in self.gpus)
        self._link_by_pair.update(((min(l.a, l.b), max(l.a, l.b)), l) for l in self.links)

    @property
    def gpu_indices(self) -> tuple[int, ...]:
        return tuple(g.index for g in self.gpus)

    def gpu(self, index: int) -> Gpu:
        try:
            return self._gpu_by_index[index]
        except KeyError:
            raise KeyError(f"node {self.name!r} has no GPU with index {index}") from None

    def has_gpu(self, index: int) -> bool:
        return index in self._gpu_by_index

    def link(self, a: int, b: int) -> GpuLink | None:
        return self._link_by_pair.get((min(a, b), max(a, b)))

    def nvlink_peers(self, index: int) -> tuple[int, ...]:
        return tuple(sorted(l.other(index) for l in self.links
                            if l.kind == "nvlink" and index in (l.a, l.b)))

    def nvlink_port_bandwidth_bytes_per_s(self, index: int) -> float:
        """All NVLink bandwidth of one GPU per direction (0.0 without NVLink)."""
        gpu = self.gpu(index)
        if gpu.nvlink_bandwidth_bytes_per_s is not None:
            return gpu.nvlink_bandwidth_bytes_per_s
        return sum(l.bandwidth_bytes_per_s for l in self.links
                   if l.kind == "nvlink" and index in (l.a, l.b))

    def gpu_bandwidth_bytes_per_s(self, a: int, b: int) -> float:
        """Bandwidth of the best single path a -> b (inf for the same GPU).

        Without a link entry the copy goes through host memory over both GPUs' PCIe links.
        """
        if a == b:
            return math.inf
        link = self.link(a, b)
        if link is not None:
            return link.bandwidth_bytes_per_s
        return min(self.gpu(a).pcie_bandwidth_bytes_per_s, self.gpu(b).pcie_bandwidth_bytes_per_s)


@dataclass(frozen=True)
class NetworkLink:
    a: str
    b: str
    bandwidth_bytes_per_s: float
    latency_s: float = 0.0


@dataclass(frozen=True)
class ClusterTopology:
    nodes: tuple[NodeTopology, ...]
    network_links: tuple[NetworkLink, ...] = ()
    default_network_bandwidth_bytes_per_s: float = DEFAULT_NETWORK_BANDWIDTH_BYTES_PER_S

    def node(self, name: str) -> NodeTopology:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(f"no node named {name!r} in the topology")

    def network_link(self, a: str, b: str) -> NetworkLink | None:
        for link in self.network_links:
            if (link.a, link.b) in ((a, b), (b, a)):
                return link
        return None

    def network_bandwidth_bytes_per_s(self, a: str, b: str) -> float:
        if a == b:
            return math.inf
        link = self.network_link(a, b)
        return link.bandwidth_bytes_per_s if link else self.default_network_bandwidth_bytes_per_s


# ---------------------------------------------------------------------------------------
# Parsing: every error names the field path.


def _mapping(value: Any, path: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise TopologyError(path, f"must be a mapping, got {type(value).__name__}")
    return value


def _sequence(value: Any, path: str) -> Sequence[Any]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TopologyError(path, f"must be a list, got {type(value).__name__}")
    return value


def _unknown_keys(doc: Mapping[str, Any], allowed: set[str], path: str) -> None:
    for key in doc:
        if key not in allowed:
            raise TopologyError(f"{path}.{key}" if path else str(key),
                                f"unknown field (allowed: {', '.join(sorted(allowed))})")


def _required(doc: Mapping[str, Any], key: str, path: str) -> Any:
    if key not in doc or doc[key] is None:
        raise TopologyError(f"{path}.{key}" if path else key, "is required")
    return doc[key]


def _int(value: Any, path: str, *, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TopologyError(path, f"must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise TopologyError(path, f"must be >= {minimum}, got {value}")
    return value


def _str(value: Any, path: str) -> str:
    if not isinstance(value, str) or not value:
        raise TopologyError(path, f"must be a non-empty string, got {value!r}")
    return value


def _bool(value: Any, path: str) -> bool:
    if not isinstance(value, bool):
        raise TopologyError(path, f"must be true or false, got {value!r}")
    return value


def _positive_gbps(value: Any, path: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TopologyError(path, f"must be a number (GB/s), got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise TopologyError(path, f"must be a positive finite number (GB/s), got {value!r}")
    return float(round(value * GBPS))  # whole bytes/s: dump and parse round-trip exactly


def _parse_gpu(doc: Any, path: str) -> Gpu:
    d = _mapping(doc, path)
    _unknown_keys(d, {"index", "uuid", "name", "memoryBytes", "pcie", "numaNode", "sharingSlots",
                      "nvlinkBandwidthGBps"}, path)
    pcie = _mapping(_required(d, "pcie", path), f"{path}.pcie")
    ppath = f"{path}.pcie"
    _unknown_keys(pcie, {"busId", "generation", "width", "bandwidthGBps", "switch"}, ppath)
    switch = pcie.get("switch")
    numa = d.get("numaNode")
    nvlink_bw = d.get("nvlinkBandwidthGBps")
    return Gpu(
        index=_int(_required(d, "index", path), f"{path}.index", minimum=0),
        uuid=_str(_required(d, "uuid", path), f"{path}.uuid"),
        name=_str(_required(d, "name", path), f"{path}.name"),
        memory_bytes=_int(_required(d, "memoryBytes", path), f"{path}.memoryBytes", minimum=1),
        pcie_bus_id=_str(_required(pcie, "busId", ppath), f"{ppath}.busId"),
        pcie_generation=_int(_required(pcie, "generation", ppath), f"{ppath}.generation",
                             minimum=1),
        pcie_width=_int(_required(pcie, "width", ppath), f"{ppath}.width", minimum=1),
        pcie_bandwidth_bytes_per_s=_positive_gbps(_required(pcie, "bandwidthGBps", ppath),
                                                  f"{ppath}.bandwidthGBps"),
        pcie_switch=None if switch is None else _str(switch, f"{ppath}.switch"),
        numa_node=None if numa is None else _int(numa, f"{path}.numaNode", minimum=0),
        sharing_slots=_int(d.get("sharingSlots", DEFAULT_SHARING_SLOTS), f"{path}.sharingSlots",
                           minimum=1),
        nvlink_bandwidth_bytes_per_s=(None if nvlink_bw is None else
                                      _positive_gbps(nvlink_bw, f"{path}.nvlinkBandwidthGBps")),
    )


def _parse_link(doc: Any, path: str, gpus: Mapping[int, Gpu]) -> GpuLink:
    d = _mapping(doc, path)
    _unknown_keys(d, {"a", "b", "kind", "nvlinks", "bandwidthGBps", "p2p", "pcieRelation"}, path)
    a = _int(_required(d, "a", path), f"{path}.a", minimum=0)
    b = _int(_required(d, "b", path), f"{path}.b", minimum=0)
    for key, idx in (("a", a), ("b", b)):
        if idx not in gpus:
            raise TopologyError(f"{path}.{key}", f"unknown GPU index {idx}")
    if a >= b:
        raise TopologyError(f"{path}.b", f"must be greater than a ({a}); list each pair once")
    kind = _required(d, "kind", path)
    if kind not in LINK_KINDS:
        raise TopologyError(f"{path}.kind", f"must be one of {', '.join(LINK_KINDS)}, got {kind!r}")
    relation = d.get("pcieRelation")
    if relation is not None and relation not in PCIE_RELATIONS:
        raise TopologyError(f"{path}.pcieRelation",
                            f"must be one of {', '.join(PCIE_RELATIONS)}, got {relation!r}")
    if kind == "nvlink":
        nvlinks = _int(_required(d, "nvlinks", path), f"{path}.nvlinks", minimum=1)
    else:
        nvlinks = _int(d.get("nvlinks", 0), f"{path}.nvlinks", minimum=0)
        if nvlinks != 0:
            raise TopologyError(f"{path}.nvlinks", "must be 0 (or absent) for a pcie link")
        if relation is None:
            raise TopologyError(f"{path}.pcieRelation", "is required for a pcie link")
    return GpuLink(
        a=a, b=b, kind=kind, nvlink_count=nvlinks,
        bandwidth_bytes_per_s=_positive_gbps(_required(d, "bandwidthGBps", path),
                                             f"{path}.bandwidthGBps"),
        p2p=_bool(d.get("p2p", True), f"{path}.p2p"),
        pcie_relation=relation,
    )


def parse_node(doc: Mapping[str, Any], path: str = "nodes[0]") -> NodeTopology:
    """Parse one node entry (also the GpuNode resource's ``spec.topology``)."""
    d = _mapping(doc, path)
    _unknown_keys(d, {"name", "hostMemoryBytes", "gpus", "links"}, path)
    name = _str(_required(d, "name", path), f"{path}.name")
    gpus: dict[int, Gpu] = {}
    uuids: set[str] = set()
    for i, gdoc in enumerate(_sequence(d.get("gpus", []), f"{path}.gpus")):
        gpath = f"{path}.gpus[{i}]"
        gpu = _parse_gpu(gdoc, gpath)
        if gpu.index in gpus:
            raise TopologyError(f"{gpath}.index", f"duplicate GPU index {gpu.index}")
        if gpu.uuid in uuids:
            raise TopologyError(f"{gpath}.uuid", f"duplicate GPU uuid {gpu.uuid!r}")
        gpus[gpu.index] = gpu
        uuids.add(gpu.uuid)
    links: list[GpuLink] = []
    pairs: set[tuple[int, int]] = set()
    for i, ldoc in enumerate(_sequence(d.get("links", []), f"{path}.links")):
        lpath = f"{path}.links[{i}]"
        link = _parse_link(ldoc, lpath, gpus)
        if (link.a, link.b) in pairs:
            raise TopologyError(lpath, f"duplicate link for GPU pair ({link.a}, {link.b})")
        pairs.add((link.a, link.b))
        links.append(link)
    host_memory = d.get("hostMemoryBytes")
    return NodeTopology(
        name=name,
        gpus=tuple(sorted(gpus.values(), key=lambda g: g.index)),
        links=tuple(links),
        host_memory_bytes=(None if host_memory is None else
                           _int(host_memory, f"{path}.hostMemoryBytes", minimum=1)),
    )


def _parse_network(doc: Any, node_names: set[str]) -> tuple[tuple[NetworkLink, ...], float]:
    if doc is None:
        return (), DEFAULT_NETWORK_BANDWIDTH_BYTES_PER_S
    d = _mapping(doc, "network")
    _unknown_keys(d, {"defaultBandwidthGBps", "links"}, "network")
    default = (DEFAULT_NETWORK_BANDWIDTH_BYTES_PER_S if d.get("defaultBandwidthGBps") is None else
               _positive_gbps(d["defaultBandwidthGBps"], "network.defaultBandwidthGBps"))
    links: list[NetworkLink] = []
    seen: set[frozenset[str]] = set()
    for i, ldoc in enumerate(_sequence(d.get("links", []), "network.links")):
        path = f"network.links[{i}]"
        ld = _mapping(ldoc, path)
        _unknown_keys(ld, {"a", "b", "bandwidthGBps", "latencySeconds"}, path)
        a = _str(_required(ld, "a", path), f"{path}.a")
        b = _str(_required(ld, "b", path), f"{path}.b")
        for key, name in (("a", a), ("b", b)):
            if name not in node_names:
                raise TopologyError(f"{path}.{key}", f"unknown node {name!r}")
        if a == b:
            raise TopologyError(f"{path}.b", "must name a different node than a")
        if frozenset((a, b)) in seen:
            raise TopologyError(path, f"duplicate network link between {a!r} and {b!r}")
        seen.add(frozenset((a, b)))
        latency = ld.get("latencySeconds", 0.0)
        if isinstance(latency, bool) or not isinstance(latency, (int, float)) \
                or not math.isfinite(latency) or latency < 0:
            raise TopologyError(f"{path}.latencySeconds",
                                f"must be a number of seconds >= 0, got {latency!r}")
        links.append(NetworkLink(
            a=a, b=b,
            bandwidth_bytes_per_s=_positive_gbps(_required(ld, "bandwidthGBps", path),
                                                 f"{path}.bandwidthGBps"),
            latency_s=float(latency)))
    return tuple(links), default


def parse_topology(doc: Mapping[str, Any]) -> ClusterTopology:
    """Parse and validate a whole ``kind: Topology`` document."""
    d = _mapping(doc, "")
    _unknown_keys(d, {"apiVersion", "kind", "metadata", "nodes", "network"}, "")
    api = d.get("apiVersion")
    if api != API_VERSION:
        raise TopologyError("apiVersion", f"must be {API_VERSION!r}, got {api!r}")
    if d.get("kind") != KIND:
        raise TopologyError("kind", f"must be {KIND!r}, got {d.get('kind')!r}")
    nodes: list[NodeTopology] = []
    names: set[str] = set()
    for i, ndoc in enumerate(_sequence(_required(d, "nodes", ""), "nodes")):
        node = parse_node(ndoc, f"nodes[{i}]")
        if node.name in names:
            raise TopologyError(f"nodes[{i}].name", f"duplicate node name {node.name!r}")
        names.add(node.name)
        nodes.append(node)
    if not nodes:
        raise TopologyError("nodes", "must list at least one node")
    links, default = _parse_network(d.get("network"), names)
    return ClusterTopology(nodes=tuple(nodes), network_links=links,
                           default_network_bandwidth_bytes_per_s=default)


def load_topology(path: str | Path) -> ClusterTopology:
    """Read a topology file: JSON if it ends in ``.json``, else YAML."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise TopologyError("", f"cannot read topology file {str(p)!r}: {e}") from e
    try:
        # JSON through json: PyYAML (YAML 1.1) reads JSON's 2e-05 as a string.
        doc = json.loads(text) if p.suffix == ".json" else documents.load_yaml(text)
    except (yaml.YAMLError, ValueError, documents.DocumentInvalid) as e:
        raise TopologyError("", f"{p}: not valid YAML/JSON: {e}") from e
    try:
        return parse_topology(doc)
    except TopologyError as e:
        raise TopologyError(e.path, f"{e.detail} (in {p})") from e


# ---------------------------------------------------------------------------------------
# Dumping: the exact inverse of parsing (parse(dump(t)) == t).


def _gbps(bandwidth_bytes_per_s: float) -> float:
    return bandwidth_bytes_per_s / GBPS


def dump_node(n: NodeTopology) -> dict[str, Any]:
    gpus: list[dict[str, Any]] = []
    for g in n.gpus:
        pcie: dict[str, Any] = {"busId": g.pcie_bus_id, "generation": g.pcie_generation,
                                "width": g.pcie_width,
                                "bandwidthGBps": _gbps(g.pcie_bandwidth_bytes_per_s)}
        if g.pcie_switch is not None:
            pcie["switch"] = g.pcie_switch
        gd: dict[str, Any] = {"index": g.index, "uuid": g.uuid, "name": g.name,
                              "memoryBytes": g.memory_bytes, "pcie": pcie}
        if g.numa_node is not None:
            gd["numaNode"] = g.numa_node
        gd["sharingSlots"] = g.sharing_slots
        if g.nvlink_bandwidth_bytes_per_s is not None:
            gd["nvlinkBandwidthGBps"] = _gbps(g.nvlink_bandwidth_bytes_per_s)
        gpus.append(gd)
    links: list[dict[str, Any]] = []
    for link in n.links:
        ld: dict[str, Any] = {"a": link.a, "b": link.b, "kind": link.kind}
        if link.kind == "nvlink":
            ld["nvlinks"] = link.nvlink_count
        if link.pcie_relation is not None:
            ld["pcieRelation"] = link.pcie_relation
        ld["bandwidthGBps"] = _gbps(link.bandwidth_bytes_per_s)
        ld["p2p"] = link.p2p
        links.append(ld)
    out: dict[str, Any] = {"name": n.name}
    if n.host_memory_bytes is not None:
        out["hostMemoryBytes"] = n.host_memory_bytes
    out["gpus"] = gpus
    out["links"] = links
    return out


def dump_topology(t: ClusterTopology) -> dict[str, Any]:
    out: dict[str, Any] = {"apiVersion": API_VERSION, "kind": KIND,
                           "nodes": [dump_node(n) for n in t.nodes]}
    if t.network_links or t.default_network_bandwidth_bytes_per_s \
            != DEFAULT_NETWORK_BANDWIDTH_BYTES_PER_S:
        out["network"] = {
            "defaultBandwidthGBps": _gbps(t.default_network_bandwidth_bytes_per_s),
            "links": [{"a": l.a, "b": l.b, "bandwidthGBps": _gbps(l.bandwidth_bytes_per_s),
                       "latencySeconds": l.latency_s} for l in t.network_links],
        }
    return out


def node_document(n: NodeTopology) -> dict[str, Any]:
    """A one-node ``kind: Topology`` document (what ``faastube topology`` prints)."""
    return {"apiVersion": API_VERSION, "kind": KIND, "nodes": [dump_node(n)]}


# ---------------------------------------------------------------------------------------
# Built-in simulated topologies (package data in faastube_spec/topologies/).


def builtin_names() -> tuple[str, ...]:
    """Names accepted by :func:`builtin`, sorted."""
    folder = resources.files("faastube_spec") / "topologies"
    return tuple(sorted(p.name.removesuffix(".yaml") for p in folder.iterdir()
                        if p.name.endswith(".yaml")))


def builtin(name: str) -> ClusterTopology:
    """Load a simulated topology shipped with faastube, e.g. ``builtin("dgx1-v100")``."""
    names = builtin_names()
    if name not in names:
        raise TopologyError("", f"no built-in topology named {name!r} (known: {', '.join(names)})")
    text = (resources.files("faastube_spec") / "topologies" / f"{name}.yaml").read_text()
    return parse_topology(documents.load_yaml(text))


def builtin_node(name: str) -> NodeTopology:
    """The first (for single-node files: the only) node of a built-in topology."""
    return builtin(name).nodes[0]
