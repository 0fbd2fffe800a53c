"""Placement under FaaSTube's rule about data: a ref lives on the node that made it, and
only a sidecar that serves reads from other nodes lets a workflow span nodes.

A node's sidecar holds the objects its functions make. When it serves cross-node reads
(its GpuNode publishes ``status.network``), a consumer on another such node pulls the
object from it over the network; otherwise nothing outside the node can read them. So
``place_on_nodes`` spreads a workflow only over nodes that all serve cross-node reads
(``cross_node``), and any other node holds a workflow whole or not at all: a cluster
where some nodes serve them and some don't still places everything it did before.
Across nodes the cost model prices the ``network`` path (bytes over the link's
bandwidth, plus its latency), so a workflow spans nodes when one node cannot hold it or
when that is cheaper than the paths one node offers.

``follow_consumers`` sends each CPU function to the node where its edges cost least
(given a cluster), else to the node of the GPU function it feeds the most bytes. The
operator (for a cluster of GpuNodes) and ``faastube run`` (for this machine) both go
through here.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Collection, Mapping

from faastube_spec.topology import ClusterTopology, NodeTopology
from faastube_spec.workflow import Workflow

from faastube_placement import costs
from faastube_placement.core import (
    Assignment,
    GpuUsage,
    Placement,
    PlacementError,
    place,
    placement_cost,
)


@dataclasses.dataclass(frozen=True)
class Where:
    """Where one function runs: a node (None: anywhere) and a GPU index (None: CPU only)."""

    node: str | None
    gpu: int | None = None


def nodes_of(placement: Placement) -> frozenset[str]:
    """The nodes a placement uses."""
    return frozenset(a.node for a in placement.assignments.values())


def _sub_cluster(cluster: ClusterTopology, nodes: tuple[NodeTopology, ...]) -> ClusterTopology:
    names = {n.name for n in nodes}
    return ClusterTopology(
        nodes=nodes,
        network_links=tuple(link for link in cluster.network_links if {link.a, link.b} <= names),
        default_network_bandwidth_bytes_per_s=cluster.default_network_bandwidth_bytes_per_s)


def _usage_on(usage: Mapping[tuple[str, int], GpuUsage], nodes: tuple[NodeTopology, ...]
              ) -> dict[tuple[str, int], GpuUsage]:
    names = {n.name for n in nodes}
    return {key: value for key, value in usage.items() if key[0] in names}


def place_on_nodes(workflow: Workflow, cluster: ClusterTopology, *,
                   usage: Mapping[tuple[str, int], GpuUsage] | None = None,
                   cross_node: Collection[str] = ()) -> Placement:
    """The best placement that spans nodes only among ``cross_node``.

    ``cross_node`` names the nodes whose sidecars serve reads from other nodes; a
    workflow may be spread over any of them, and sits whole on any other node. The
    cost model already prefers one node; when the best placement of the whole cluster
    breaks the rule, the cross-node nodes together and every other node alone are
    placed, and the cheapest (then the one on fewer nodes) wins. Raises
    ``PlacementError`` naming why each was refused.
    """
    usage = usage or {}
    cross = frozenset(cross_node)
    unknown = sorted(cross - {n.name for n in cluster.nodes})
    if unknown:
        raise PlacementError(f"cross-node nodes {', '.join(map(repr, unknown))} are not in the topology")
    decided = place(workflow, cluster, usage=usage)
    used = nodes_of(decided)
    if len(used) <= 1 or used <= cross:
        return decided
    spanning = tuple(n for n in cluster.nodes if n.name in cross)
    groups: list[tuple[str, tuple[NodeTopology, ...]]] = []
    if len(spanning) >= 2:
        groups.append((f"across {', '.join(n.name for n in spanning)}", spanning))
    groups.extend((node.name, (node,)) for node in cluster.nodes
                  if not (len(spanning) >= 2 and node.name in cross))
    best: Placement | None = None
    reasons = []
    for label, nodes in groups:
        try:
            candidate = place(workflow, _sub_cluster(cluster, nodes), usage=_usage_on(usage, nodes))
        except PlacementError as e:
            reasons.append(f"{label}: {e}")
            continue
        if best is None or (candidate.cost_s, len(nodes_of(candidate))) < (best.cost_s, len(nodes_of(best))):
            best = candidate
    if best is None:
        if cross:
            raise PlacementError(
                f"workflow {workflow.name!r} fits only across nodes, and only nodes whose sidecars "
                f"serve reads from other nodes (GpuNode status.network) may share a workflow: "
                f"{'; '.join(reasons)}")
        raise PlacementError(
            f"workflow {workflow.name!r} fits only across nodes, but its data stays on the node "
            f"where it was produced (one sidecar per node): {'; '.join(reasons)}")
    return best


def place_on_one_node(workflow: Workflow, cluster: ClusterTopology, *,
                      usage: Mapping[tuple[str, int], GpuUsage] | None = None) -> Placement:
    """The best placement that keeps every function on one node (no node serves
    cross-node reads)."""
    return place_on_nodes(workflow, cluster, usage=usage, cross_node=())


def _cheapest_node(workflow: Workflow, name: str, placed: Mapping[str, Where],
                   candidates: list[str], model: costs.CostModel) -> str | None:
    """The candidate node whose host passes ``name``'s edges fastest (None: no edge has
    a placed other end, or nothing is finite)."""
    best_node, best_s = None, math.inf
    for node in candidates:
        here = model.index_of[costs.Location(node, None)]
        total, known = 0.0, False
        for edge in workflow.edges:
            if name not in (edge.source, edge.target) or edge.source == edge.target:
                continue
            other = placed.get(edge.target if edge.source == name else edge.source)
            if other is None or other.node is None:
                continue
            there = model.index_of.get(costs.Location(other.node, other.gpu))
            if there is None:
                continue
            known = True
            source, target = (here, there) if edge.source == name else (there, here)
            total += model.edge_seconds(edge.size_bytes, source, target)
        if known and total < best_s:
            best_node, best_s = node, total
    return best_node


def follow_consumers(workflow: Workflow, assigned: Mapping[str, Where], *,
                     cluster: ClusterTopology | None = None) -> dict[str, Where]:
    """Complete a placement: CPU functions go where their data moves fastest.

    A CPU function (say, a decoder) hands its output to its consumers through its node's
    sidecar. With ``cluster``, each one goes to the node, among those the assignment
    uses, where its edges (in and out, against the functions placed so far) cost least,
    keeping its given node on a tie; on one node that is always the node of its GPU
    consumers, across nodes it may be the node of a producer that sends it more. Without
    ``cluster``, or where no edge decides, it goes to the node of the GPU function it
    feeds the most bytes, and with no GPU successor it keeps what it was given.
    """
    model = costs.build_cost_model(cluster) if cluster is not None else None
    candidates = sorted({w.node for w in assigned.values() if w.node is not None})
    result: dict[str, Where] = {}
    for fn in workflow.functions:
        given = assigned.get(fn.name, Where(node=None))
        if fn.gpu:
            result[fn.name] = given
    for fn in workflow.functions:
        if fn.gpu:
            continue
        given = assigned.get(fn.name, Where(node=None))
        if model is not None and candidates:
            placed = {**{k: v for k, v in assigned.items() if k not in result}, **result}
            placed.pop(fn.name, None)
            order = ([given.node] if given.node in candidates else []) + \
                [n for n in candidates if n != given.node]
            cheapest = _cheapest_node(workflow, fn.name, placed, order, model)
            if cheapest is not None:
                result[fn.name] = Where(node=cheapest, gpu=None)
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
    return {fn.name: result[fn.name] for fn in workflow.functions}


def where_each_runs(workflow: Workflow, cluster: ClusterTopology, *,
                    usage: Mapping[tuple[str, int], GpuUsage] | None = None,
                    cross_node: Collection[str] = ()) -> tuple[dict[str, Where], Placement]:
    """Every function's node and GPU (CPU functions where their edges cost least), and
    the placement it came from (its cost, whether proved optimal). ``cross_node``: the
    nodes whose sidecars serve reads from other nodes (see ``place_on_nodes``)."""
    decided = place_on_nodes(workflow, cluster, usage=usage, cross_node=cross_node)
    assigned = {name: Where(node=a.node, gpu=a.gpu) for name, a in decided.assignments.items()}
    placed = follow_consumers(workflow, assigned, cluster=cluster)
    if placed == assigned:
        return placed, decided
    # A CPU function moved to a strictly cheaper node (the search's answer was not
    # locally optimal for it): report the cost of what is deployed.
    moved = {name: Assignment(w.node, w.gpu) for name, w in placed.items() if w.node is not None}
    cost = placement_cost(workflow, cluster, moved)
    lower = None if decided.lower_bound_s is None else min(decided.lower_bound_s, cost)
    return placed, Placement(assignments=moved, cost_s=cost, lower_bound_s=lower)
