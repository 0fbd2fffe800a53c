"""The cluster as placement sees it, read from GpuNode objects (pure).

Only GPUs a node reports healthy, on nodes whose Ready condition is not False,
are offered to placement. A GpuNode whose topology does not parse is left out
(with a warning) rather than failing every workflow in the cluster.
"""

from __future__ import annotations

import copy
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


def cluster_from_gpunodes(
    gpunodes: Sequence[Mapping[str, Any]],
    *,
    default_network_bandwidth_bytes_per_s: float,
) -> topology.ClusterTopology | None:
    """The usable cluster, or None when no GpuNode is usable."""
    docs = []
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
    if not docs:
        return None
    return topology.parse_topology({
        "apiVersion": api.API_VERSION,
        "kind": api.TOPOLOGY_KIND,
        "nodes": docs,
        "network": {"defaultBandwidthGBps": default_network_bandwidth_bytes_per_s / 1e9},
    })
