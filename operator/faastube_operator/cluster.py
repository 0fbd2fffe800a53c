"""The cluster as placement sees it, read from GpuNode objects (pure).

Only GPUs a node reports healthy, on nodes whose Ready condition is not False,
are offered to placement. A GpuNode whose topology does not parse is left out
(with a warning) rather than failing every workflow in the cluster.

Across nodes: a node whose sidecar publishes ``status.network`` serves reads from
other nodes, so placement may spread a workflow over it and other such nodes. The
network between two nodes runs at the smaller of the two ends' passing bandwidths
(``gpunode.passing_bandwidth_bytes_per_s``: the fastest NICs one transfer can use
together), or at the operator's default when an end publishes no NIC speed. A bad
``status.network`` or ``status.nics`` is left out with a warning naming the field: the
node then keeps its workflows whole (or is priced at the default), as before.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from faastube_spec import api, gpunode, topology

logger = logging.getLogger(__name__)


def _usable_topology_doc(gpunode: Mapping[str, Any], state: gpunode.NodeState) -> dict[str, Any]:
    doc = copy.deepcopy(dict((gpunode.get("spec") or {}).get("topology") or {}))
    doc["name"] = state.name  # the Kubernetes node name is what pods are pinned to
    doc["gpus"] = [g for g in doc.get("gpus") or [] if g.get("index") in state.healthy_gpus]
    doc["links"] = [link for link in doc.get("links") or []
                    if link.get("a") in state.healthy_gpus and link.get("b") in state.healthy_gpus]
    return doc


@dataclasses.dataclass(frozen=True)
class UsableCluster:
    """The cluster placement may use, and which of its nodes may share a workflow."""

    topology: topology.ClusterTopology
    cross_node: frozenset[str]  # nodes whose sidecars serve reads from other nodes


def _passing(obj: Mapping[str, Any], name: str) -> tuple[bool, float | None]:
    """Whether the node serves cross-node reads, and its passing bandwidth (None: unknown)."""
    status = obj.get("status") or {}
    try:
        network = gpunode.parse_network(status.get("network"))
    except gpunode.GpuNodeFieldInvalid as e:
        logger.warning("GpuNode %s: %s; its workflows stay on it whole", name, e)
        network = None
    try:
        nics = gpunode.parse_nics(status.get("nics"))
    except gpunode.GpuNodeFieldInvalid as e:
        logger.warning("GpuNode %s: %s; its network is priced at the default bandwidth", name, e)
        nics = ()
    per_transfer = network.nics_per_transfer if network else gpunode.DEFAULT_NICS_PER_TRANSFER
    return network is not None, gpunode.passing_bandwidth_bytes_per_s(nics, nics_per_transfer=per_transfer)


def nic_links(bandwidths: Mapping[str, float | None]) -> list[dict[str, Any]]:
    """Topology ``network.links`` between every two nodes whose ends both know their
    passing bandwidth: the smaller of the two (the others get the default)."""
    known = sorted((name, bw) for name, bw in bandwidths.items() if bw is not None and bw > 0)
    return [{"a": a, "b": b, "bandwidthGBps": min(bw_a, bw_b) / topology.GBPS}
            for (a, bw_a), (b, bw_b) in itertools.combinations(known, 2)]


def usable_cluster(
    gpunodes: Sequence[Mapping[str, Any]],
    *,
    default_network_bandwidth_bytes_per_s: float,
) -> UsableCluster | None:
    """The usable cluster and its cross-node nodes, or None when no GpuNode is usable."""
    docs = []
    cross_node: set[str] = set()
    bandwidths: dict[str, float | None] = {}
    for obj in gpunodes:
        state = gpunode.node_state(obj)
        if not state.ready:
            continue
        doc = _usable_topology_doc(obj, state)
        try:
            topology.parse_node(doc, path=f"gpunodes/{state.name}.spec.topology")
        except topology.TopologyError as e:
            logger.warning("ignoring GpuNode %s: %s", state.name, e)
            continue
        docs.append(doc)
        serves, bandwidths[state.name] = _passing(obj, state.name)
        if serves:
            cross_node.add(state.name)
    if not docs:
        return None
    topo = topology.parse_topology({
        "apiVersion": api.API_VERSION,
        "kind": api.TOPOLOGY_KIND,
        "nodes": docs,
        "network": {"defaultBandwidthGBps": default_network_bandwidth_bytes_per_s / topology.GBPS,
                    "links": nic_links(bandwidths)},
    })
    return UsableCluster(topology=topo, cross_node=frozenset(cross_node))


def cluster_from_gpunodes(
    gpunodes: Sequence[Mapping[str, Any]],
    *,
    default_network_bandwidth_bytes_per_s: float,
) -> topology.ClusterTopology | None:
    """The usable cluster, or None when no GpuNode is usable."""
    usable = usable_cluster(gpunodes, default_network_bandwidth_bytes_per_s=default_network_bandwidth_bytes_per_s)
    return None if usable is None else usable.topology
