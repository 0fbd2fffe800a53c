"""Placement under FaaSTube's one rule about data: refs live on the node that made them.

One sidecar per node holds a workflow's objects, so a workflow split over nodes could
not pass data at all. ``place_on_one_node`` keeps every GPU function on one node, and
``follow_consumers`` sends each CPU function to the node of the GPU function it feeds
the most bytes. The operator (for a cluster of GpuNodes) and ``faastube run`` (for
this machine) both go through here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from faastube_spec.topology import ClusterTopology
from faastube_spec.workflow import Workflow

from faastube_placement.core import GpuUsage, Placement, PlacementError, place


@dataclasses.dataclass(frozen=True)
class Where:
    """Where one function runs: a node (None: anywhere) and a GPU index (None: CPU only)."""

    node: str | None
    gpu: int | None = None


def place_on_one_node(workflow: Workflow, cluster: ClusterTopology, *,
                      usage: Mapping[tuple[str, int], GpuUsage] | None = None) -> Placement:
    """The best placement that keeps every function on one node.

    The cost model already prefers one node; when capacity pushes the best placement
    across nodes, each node is tried alone and the cheapest fit wins, else
    ``PlacementError`` naming why each node was refused.
    """
    usage = usage or {}
    decided = place(workflow, cluster, usage=usage)
    if len({a.node for a in decided.assignments.values()}) <= 1:
        return decided
    best: Placement | None = None
    reasons = []
    for node in cluster.nodes:
        alone = ClusterTopology(
            nodes=(node,), default_network_bandwidth_bytes_per_s=cluster.default_network_bandwidth_bytes_per_s)
        try:
            candidate = place(workflow, alone, usage={k: v for k, v in usage.items() if k[0] == node.name})
        except PlacementError as e:
            reasons.append(f"{node.name}: {e}")
            continue
        if best is None or candidate.cost_s < best.cost_s:
            best = candidate
    if best is None:
        raise PlacementError(
            f"workflow {workflow.name!r} fits only across nodes, but its data stays on the node "
            f"where it was produced (one sidecar per node): {'; '.join(reasons)}")
    return best


def follow_consumers(workflow: Workflow, assigned: Mapping[str, Where]) -> dict[str, Where]:
    """Complete a placement: CPU functions follow the GPU functions they feed.

    A CPU function (say, a decoder) hands its output to its consumers through the
    node's sidecar, so it runs on the node of the GPU function it feeds the most
    bytes; with no GPU successor it keeps what the placement gave it.
    """
    result: dict[str, Where] = {}
    for fn in workflow.functions:
        given = assigned.get(fn.name, Where(node=None))
        if fn.gpu:
            result[fn.name] = given
            continue
        best_node, best_bytes = None, -1
        for edge in workflow.edges:
            if edge.source != fn.name:
                continue
            target = assigned.get(edge.target)
            if target is None or target.gpu is None or target.node is None:
                continue
            if edge.size_bytes > best_bytes:
                best_node, best_bytes = target.node, edge.size_bytes
        result[fn.name] = Where(node=best_node if best_node is not None else given.node, gpu=None)
    return result


def where_each_runs(workflow: Workflow, cluster: ClusterTopology, *,
                    usage: Mapping[tuple[str, int], GpuUsage] | None = None) -> tuple[dict[str, Where], Placement]:
    """Every function's node and GPU (CPU functions following their consumers), and the
    placement it came from (its cost, whether proved optimal)."""
    decided = place_on_one_node(workflow, cluster, usage=usage)
    assigned = {name: Where(node=a.node, gpu=a.gpu) for name, a in decided.assignments.items()}
    return follow_consumers(workflow, assigned), decided
