"""The placement cost model: how long one byte takes between two places a function can run.

Placement compares candidate layouts by the expected time to pass every edge's bytes
once. That time depends only on *where* the producer and the consumer run, so the
model is a dense matrix over locations (every GPU of every node, plus each node's
host for CPU functions), built once per call and then read by the search in its inner
loops. Keeping it apart from the search lets the CLI explain each edge with the very
numbers the search minimised.

Paths, as the sidecar's transfer planner would use them (a lone transfer, no
contention; the planner's parallel paths can only do better than the single best
path scored here):

- same GPU: zero copy through CUDA IPC, 0 s;
- two GPUs of one node: the best of a direct NVLink, the best one-relay NVLink path
  (bottleneck of its two hops, less ``RELAY_EFFICIENCY``), a PCIe peer-to-peer link,
  and the PCIe path through the host (the declared bandwidth of a non-P2P PCIe pair
  entry, else the slower of the two GPUs' PCIe links);
- host and GPU of one node: that GPU's PCIe link;
- two CPU functions of one node: shared host memory, 0 s;
- across nodes: the PCIe hop out of the source GPU, the network, the PCIe hop into
  the target GPU, each taken in turn (store and forward), plus the link's latency.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from faastube_spec.topology import ClusterTopology, NodeTopology

logger = logging.getLogger(__name__)

# A relayed copy is forwarded chunk by chunk through the middle GPU's memory: the
# pipeline fill and the second copy engine make it a little slower than its narrowest
# hop. Scoring it 10% lower also makes a direct link win a tie, as the planner's
# shortest-path-first order would.
RELAY_EFFICIENCY = 0.9

PathKind = Literal[
    "same-gpu",      # producer and consumer share the GPU: zero copy
    "nvlink",        # direct NVLink between the two GPUs
    "nvlink-relay",  # NVLink through one intermediate GPU
    "pcie-p2p",      # PCIe peer-to-peer between the two GPUs
    "pcie-host",     # GPU -> host -> GPU over the two PCIe links
    "pcie",          # host <-> GPU of the same node
    "host",          # two CPU functions of one node: shared memory
    "network",       # across nodes (plus the PCIe hops at either end)
    "unreachable",   # no network between the two nodes
]


@dataclass(frozen=True)
class Location:
    """Where a function runs: a GPU of a node, or the node's host (``gpu`` None)."""

    node: str
    gpu: int | None


@dataclass(frozen=True)
class CostModel:
    """Seconds per byte, fixed latency and path kind between every two locations.

    Locations are ordered node by node (cluster order), the host first, then the GPUs
    in the node's order; the search relies on that order for its symmetry rules.
    """

    locations: tuple[Location, ...]
    seconds_per_byte: tuple[tuple[float, ...], ...]
    latency_s: tuple[tuple[float, ...], ...]
    paths: tuple[tuple[PathKind, ...], ...]
    node_of: tuple[int, ...]                 # location -> index of its node
    host_of_node: tuple[int, ...]            # node index -> location of its host
    gpus_of_node: tuple[tuple[int, ...], ...]  # node index -> locations of its GPUs

    index_of: Mapping[Location, int] = field(compare=False, hash=False)

    def edge_seconds(self, size_bytes: int, source: int, target: int) -> float:
        """Expected seconds to move ``size_bytes`` from location ``source`` to ``target``."""
        return edge_seconds(size_bytes, self.seconds_per_byte[source][target],
                            self.latency_s[source][target])


def edge_seconds(size_bytes: int, seconds_per_byte: float, latency_s: float) -> float:
    """Seconds for one edge; an unreachable pair costs ``inf`` even for an empty edge."""
    if math.isinf(seconds_per_byte):
        return math.inf
    return size_bytes * seconds_per_byte + latency_s


def _inverse(bandwidth_bytes_per_s: float) -> float:
    return 1.0 / bandwidth_bytes_per_s if bandwidth_bytes_per_s > 0 else math.inf


def _node_gpu_paths(node: NodeTopology) -> dict[tuple[int, int], tuple[float, PathKind]]:
    """Best single-path bandwidth and its kind for every ordered pair of distinct GPUs."""
    pcie = {g.index: g.pcie_bandwidth_bytes_per_s for g in node.gpus}
    nvlink: dict[tuple[int, int], float] = {}
    for link in node.links:
        if link.kind == "nvlink" and link.bandwidth_bytes_per_s > 0:
            nvlink[(link.a, link.b)] = nvlink[(link.b, link.a)] = link.bandwidth_bytes_per_s
    indices = [g.index for g in node.gpus]
    best: dict[tuple[int, int], tuple[float, PathKind]] = {}
    for a in indices:
        for b in indices:
            if a == b:
                continue
            pair = node.link(a, b)
            # A declared PCIe pair (e.g. cross-socket, ~8 GB/s on a DGX-1) is the measured
            # speed of that pair; without one, the slower of the two PCIe links.
            if pair is not None and pair.kind == "pcie" and not pair.p2p:
                through_host = pair.bandwidth_bytes_per_s
            else:
                through_host = min(pcie[a], pcie[b])
            options: list[tuple[float, PathKind]] = [(through_host, "pcie-host")]
            if pair is not None and pair.kind == "pcie" and pair.p2p:
                options.append((pair.bandwidth_bytes_per_s, "pcie-p2p"))
            relay = RELAY_EFFICIENCY * max(
                (min(nvlink[(a, r)], nvlink[(r, b)]) for r in indices
                 if (a, r) in nvlink and (r, b) in nvlink), default=0.0)
            options.append((relay, "nvlink-relay"))
            options.append((nvlink.get((a, b), 0.0), "nvlink"))
            # Ties go to the later, more direct option: fewer hops for the same speed.
            bandwidth, kind = options[0]
            for option in options[1:]:
                if option[0] >= bandwidth:
                    bandwidth, kind = option
            best[(a, b)] = (bandwidth, kind)
    return best


def _network_latency_s(cluster: ClusterTopology, a: str, b: str) -> float:
    link = cluster.network_link(a, b)
    return 0.0 if link is None else link.latency_s


def build_cost_model(cluster: ClusterTopology) -> CostModel:
    """The cost model of a cluster topology (pure; O(locations^2))."""
    locations: list[Location] = []
    node_of: list[int] = []
    host_of_node: list[int] = []
    gpus_of_node: list[tuple[int, ...]] = []
    pcie_spb: list[float] = []  # per location: seconds per byte over its PCIe link (0 for hosts)
    for n, node in enumerate(cluster.nodes):
        host_of_node.append(len(locations))
        locations.append(Location(node.name, None))
        node_of.append(n)
        pcie_spb.append(0.0)
        first = len(locations)
        for gpu in node.gpus:
            locations.append(Location(node.name, gpu.index))
            node_of.append(n)
            pcie_spb.append(_inverse(gpu.pcie_bandwidth_bytes_per_s))
        gpus_of_node.append(tuple(range(first, len(locations))))

    node_paths = [_node_gpu_paths(node) for node in cluster.nodes]
    names = [node.name for node in cluster.nodes]
    net_spb = [[0.0] * len(names) for _ in names]
    net_latency = [[0.0] * len(names) for _ in names]
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            if i != j:
                net_spb[i][j] = _inverse(cluster.network_bandwidth_bytes_per_s(a, b))
                net_latency[i][j] = _network_latency_s(cluster, a, b)

    spb: list[tuple[float, ...]] = []
    latency: list[tuple[float, ...]] = []
    paths: list[tuple[PathKind, ...]] = []
    for s, src in enumerate(locations):
        row_spb: list[float] = []
        row_latency: list[float] = []
        row_path: list[PathKind] = []
        for t, dst in enumerate(locations):
            ns, nt = node_of[s], node_of[t]
            kind: PathKind
            if s == t:
                value, lat, kind = 0.0, 0.0, ("host" if src.gpu is None else "same-gpu")
            elif ns != nt:
                value = pcie_spb[s] + net_spb[ns][nt] + pcie_spb[t]
                lat = net_latency[ns][nt]
                kind = "network" if math.isfinite(value) else "unreachable"
            elif src.gpu is None or dst.gpu is None:
                value, lat, kind = pcie_spb[s] + pcie_spb[t], 0.0, "pcie"
            else:
                bandwidth, kind = node_paths[ns][(src.gpu, dst.gpu)]
                value, lat = _inverse(bandwidth), 0.0
            row_spb.append(value)
            row_latency.append(lat)
            row_path.append(kind)
        spb.append(tuple(row_spb))
        latency.append(tuple(row_latency))
        paths.append(tuple(row_path))
    logger.debug("cost model: %d nodes, %d locations", len(names), len(locations))
    return CostModel(
        locations=tuple(locations),
        seconds_per_byte=tuple(spb),
        latency_s=tuple(latency),
        paths=tuple(paths),
        node_of=tuple(node_of),
        host_of_node=tuple(host_of_node),
        gpus_of_node=tuple(gpus_of_node),
        index_of={loc: i for i, loc in enumerate(locations)},
    )
