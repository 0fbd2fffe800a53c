"""Workflows across nodes: only over nodes whose sidecars serve cross-node reads, priced by
the network between them (the smaller end's NIC bandwidth), on simulated topologies."""

from __future__ import annotations

import copy
import dataclasses
import datetime
import logging
import math
from collections.abc import Mapping
from typing import Any

import pytest

pytest.importorskip("prometheus_client")
from faastube_operator import cluster, k8s, reconcile
from faastube_operator.conditions import Phase
from faastube_operator.metrics import OperatorMetrics
from faastube_operator.settings import OperatorSettings
from faastube_placement import (
    Where,
    core,
    follow_consumers,
    nodes_of,
    place_on_nodes,
    where_each_runs,
)
from faastube_spec import gpunode, topology
from faastube_spec import workflow as wf
from faastube_spec.topology import ClusterTopology, Gpu, GpuLink, NetworkLink, NodeTopology
from memory_kube import MemoryObjects, key_of
from prometheus_client import CollectorRegistry

GB = 10**9
A10 = topology.builtin_node("4x-a10")  # 4 GPUs of 24 GB, PCIe only


def _nodes(*names: str, links: tuple[NetworkLink, ...] = ()) -> ClusterTopology:
    return ClusterTopology(nodes=tuple(dataclasses.replace(A10, name=n) for n in names), network_links=links)


def _doc(functions: list[dict[str, Any]], edges: list[dict[str, Any]], name: str = "w") -> wf.Workflow:
    return wf.parse_workflow({"apiVersion": "faastube.io/v1alpha1", "kind": "Workflow",
                              "metadata": {"name": name},
                              "spec": {"slo": "1s", "functions": functions, "edges": edges}})


def _chain(count: int, memory: str = "20Gi", size: str = "10MB") -> wf.Workflow:
    return _doc([{"name": f"f{i}", "handler": "m:f", "gpu": {"memory": memory}} for i in range(count)],
                [{"from": f"f{i}", "to": f"f{i + 1}", "size": size} for i in range(count - 1)], "chain")


# --- too large for one node --------------------------------------------------------------------


def test_a_workflow_too_large_for_one_node_is_split_and_pays_for_the_network() -> None:
    link = NetworkLink("node-a", "node-b", bandwidth_bytes_per_s=50 * GB, latency_s=20e-6)
    topo = _nodes("node-a", "node-b", links=(link,))
    workflow = _chain(5)  # five 20 GiB functions, four GPUs a node
    decided = place_on_nodes(workflow, topo, cross_node={"node-a", "node-b"})
    assert nodes_of(decided) == {"node-a", "node-b"}
    edges = core.edge_costs(workflow, topo, decided.assignments)
    crossing = [e for e in edges if e.path == "network"]
    # Cut twice, proven optimal: two network hops beat one plus a 9 GB/s cross-socket pair.
    assert len(crossing) == 2 and decided.proven_optimal
    pcie = A10.gpus[0].pcie_bandwidth_bytes_per_s
    for edge in crossing:  # PCIe out, the network, PCIe in, and the link's latency
        assert edge.seconds == pytest.approx(10e6 * (2 / pcie + 1 / (50 * GB)) + 20e-6)
    assert decided.cost_s == pytest.approx(math.fsum(e.seconds for e in edges))


def test_without_cross_node_sidecars_the_same_workflow_is_refused_naming_each_node() -> None:
    with pytest.raises(core.PlacementError, match="fits only across nodes, but its data stays"):
        place_on_nodes(_chain(5), _nodes("node-a", "node-b"), cross_node=())


def test_a_workflow_that_fits_one_node_stays_on_it_even_when_nodes_may_share() -> None:
    decided = place_on_nodes(_chain(3), _nodes("node-a", "node-b"), cross_node={"node-a", "node-b"})
    assert len(nodes_of(decided)) == 1


# --- cheaper to split ---------------------------------------------------------------------------


def _gpu(index: int, node: str) -> Gpu:
    return Gpu(index=index, uuid=f"GPU-{node}-{index}", name="PCIe Gen5 GPU", memory_bytes=24 * 2**30,
               pcie_bus_id=f"0000:{index + 1:02x}:00.0", pcie_generation=5, pcie_width=16,
               pcie_bandwidth_bytes_per_s=53 * GB)


# A two-socket node whose two GPUs reach each other only through the sockets' link
# (5 GB/s), and a one-GPU neighbour: both with fast PCIe.
TWO_SOCKETS = NodeTopology(name="two-sockets", gpus=(_gpu(0, "a"), _gpu(1, "a")), links=(
    GpuLink(0, 1, "pcie", 0, 5 * GB, p2p=False, pcie_relation="cross-socket"),))
ONE_GPU = NodeTopology(name="one-gpu", gpus=(_gpu(0, "b"),))
PAIR = _doc([{"name": "x", "handler": "m:f", "gpu": {"memory": "20Gi"}},
             {"name": "y", "handler": "m:f", "gpu": {"memory": "20Gi"}}],
            [{"from": "x", "to": "y", "size": "1GB"}], "pair")


def _sockets_and_neighbour(network_gbps: float) -> ClusterTopology:
    return ClusterTopology(nodes=(TWO_SOCKETS, ONE_GPU), network_links=(
        NetworkLink("two-sockets", "one-gpu", network_gbps * GB),))


def test_a_workflow_is_split_when_the_network_beats_the_paths_inside_one_node() -> None:
    topo = _sockets_and_neighbour(network_gbps=50)  # two 200 Gbit/s NICs together
    alone = place_on_nodes(PAIR, topo, cross_node=())
    assert nodes_of(alone) == {"two-sockets"}
    assert alone.cost_s == pytest.approx(1e9 / (5 * GB))  # 0.2 s through the sockets
    split = place_on_nodes(PAIR, topo, cross_node={"two-sockets", "one-gpu"})
    assert nodes_of(split) == {"two-sockets", "one-gpu"}
    assert split.cost_s == pytest.approx(1e9 * (2 / (53 * GB) + 1 / (50 * GB)))  # ~0.058 s
    assert split.cost_s < alone.cost_s


def test_a_slow_network_keeps_the_workflow_on_one_node_though_it_may_split() -> None:
    topo = _sockets_and_neighbour(network_gbps=0.125)  # 1 Gbit/s
    decided = place_on_nodes(PAIR, topo, cross_node={"two-sockets", "one-gpu"})
    assert nodes_of(decided) == {"two-sockets"}


# --- mixed clusters -----------------------------------------------------------------------------


def test_a_node_without_cross_node_reads_is_never_part_of_a_split() -> None:
    topo = _nodes("node-a", "node-b", "node-c")
    # node-a is nearly full: the five functions fit only on node-b plus one other node.
    full = core.GpuUsage(memory_used_bytes=A10.gpus[0].memory_bytes, slots_used=4)
    usage = {("node-a", i): full for i in range(3)}
    decided = place_on_nodes(_chain(5), topo, usage=usage, cross_node={"node-a", "node-b"})
    assert nodes_of(decided) == {"node-a", "node-b"}  # node-c had room, but may not share
    usage = {("node-a", i): full for i in range(4)}
    with pytest.raises(core.PlacementError, match=r"only nodes whose sidecars serve reads from other nodes") as caught:
        place_on_nodes(_chain(5), topo, usage=usage, cross_node={"node-a", "node-b"})
    assert "across node-a, node-b:" in str(caught.value) and "node-c:" in str(caught.value)


def test_a_node_without_cross_node_reads_still_takes_whole_workflows() -> None:
    topo = _nodes("node-a", "node-b", "node-c")
    full = core.GpuUsage(memory_used_bytes=A10.gpus[0].memory_bytes, slots_used=4)
    usage = {(n, i): full for n in ("node-a", "node-b") for i in range(4)}
    decided = place_on_nodes(_chain(3), topo, usage=usage, cross_node={"node-a", "node-b"})
    assert nodes_of(decided) == {"node-c"}


def test_cross_node_names_outside_the_topology_are_refused() -> None:
    with pytest.raises(core.PlacementError, match="'node-z' are not in the topology"):
        place_on_nodes(_chain(2), _nodes("node-a"), cross_node={"node-z"})


# --- CPU functions --------------------------------------------------------------------------------


def test_a_cpu_function_goes_where_its_edges_cost_least_not_where_it_sends_most() -> None:
    # detect (node-b) sends 500 MB to post (CPU), which sends 100 MB to classify (node-a).
    workflow = _doc([{"name": "detect", "handler": "m:f", "gpu": {"memory": "1Gi"}},
                     {"name": "post", "handler": "m:f"},
                     {"name": "classify", "handler": "m:f", "gpu": {"memory": "1Gi"}}],
                    [{"from": "detect", "to": "post", "size": "500MB"},
                     {"from": "post", "to": "classify", "size": "100MB"}])
    assigned = {"detect": Where("node-b", 0), "post": Where("node-a"), "classify": Where("node-a", 0)}
    assert follow_consumers(workflow, assigned)["post"] == Where("node-a")  # the bytes-fed rule
    topo = _nodes("node-a", "node-b")
    assert follow_consumers(workflow, assigned, cluster=topo)["post"] == Where("node-b")


def test_where_each_runs_spreads_and_keeps_cpu_functions_on_a_node_the_workflow_uses() -> None:
    workflow = _doc([{"name": "decode", "handler": "m:f"}]
                    + [{"name": f"f{i}", "handler": "m:f", "gpu": {"memory": "20Gi"}} for i in range(5)],
                    [{"from": "decode", "to": "f0", "size": "100MB"}]
                    + [{"from": f"f{i}", "to": f"f{i + 1}", "size": "10MB"} for i in range(4)])
    topo = _nodes("node-a", "node-b", "node-c")
    placed, decided = where_each_runs(workflow, topo, cross_node={"node-a", "node-b", "node-c"})
    used = {w.node for w in placed.values()}
    assert len(used) == 2
    assert placed["decode"] == Where(placed["f0"].node)  # next to the GPU it feeds
    assert decided.cost_s == pytest.approx(core.placement_cost(workflow, topo, decided.assignments))


# --- the cluster from GpuNodes: links from NICs -----------------------------------------------------


def _gpunode(name: str, *, nics: tuple[Any, ...] = (), network: Any = None) -> dict[str, Any]:
    node = topology.dump_node(dataclasses.replace(A10, name=name))
    status: dict[str, Any] = {"conditions": [{"type": "Ready", "status": "True"}],
                              "nics": [n.to_body() if isinstance(n, gpunode.Nic) else n for n in nics]}
    if network is not None:
        status["network"] = network.to_body() if isinstance(network, gpunode.PeerNetwork) else network
    return {"kind": "GpuNode", "metadata": {"name": name}, "spec": {"topology": node}, "status": status}


def _peer(name: str, **kw: Any) -> gpunode.PeerNetwork:
    return gpunode.PeerNetwork(address=f"{name}.nodes.example", peer_port=7400, agent=name, **kw)


IB = 50 * GB  # a 400 Gbit/s NIC


def test_the_link_between_two_nodes_is_the_smaller_ends_nics_together() -> None:
    usable = cluster.usable_cluster([
        _gpunode("node-a", nics=(gpunode.Nic("ib0", IB, "mlx5_0"), gpunode.Nic("ib1", IB, "mlx5_1"),
                                 gpunode.Nic("eno1", 3 * GB)), network=_peer("node-a")),
        _gpunode("node-b", nics=(gpunode.Nic("ib0", IB, "mlx5_0"),), network=_peer("node-b")),
        _gpunode("node-c", nics=(gpunode.Nic("ib0", IB, "mlx5_0"), gpunode.Nic("ib1", IB, "mlx5_1")),
                 network=_peer("node-c", nics_per_transfer=1)),
        _gpunode("node-d", nics=(gpunode.Nic("ens5", None),)),
    ], default_network_bandwidth_bytes_per_s=12.5 * GB)
    assert usable is not None
    assert usable.cross_node == {"node-a", "node-b", "node-c"}
    topo = usable.topology
    assert topo.network_bandwidth_bytes_per_s("node-a", "node-b") == IB  # node-b has one NIC
    assert topo.network_bandwidth_bytes_per_s("node-a", "node-c") == IB  # node-c uses one at a time
    assert topo.network_bandwidth_bytes_per_s("node-c", "node-b") == IB
    assert topo.network_bandwidth_bytes_per_s("node-a", "node-d") == 12.5 * GB  # no speed: the default


def test_rdma_nics_are_summed_up_to_nics_per_transfer_and_tcp_ones_do_not_join_them() -> None:
    nics = (gpunode.Nic("ib0", IB, "mlx5_0"), gpunode.Nic("ib1", IB, "mlx5_1"),
            gpunode.Nic("ib2", IB, "mlx5_2"), gpunode.Nic("eno1", 100 * GB))
    assert gpunode.passing_bandwidth_bytes_per_s(nics, nics_per_transfer=2) == 2 * IB
    assert gpunode.passing_bandwidth_bytes_per_s(nics, nics_per_transfer=4) == 3 * IB
    assert gpunode.passing_bandwidth_bytes_per_s(nics[3:], nics_per_transfer=2) == 100 * GB
    assert gpunode.passing_bandwidth_bytes_per_s((gpunode.Nic("ens5", None),)) is None


def test_a_bad_network_block_keeps_the_node_whole_and_the_log_names_the_field(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="faastube_operator.cluster")
    usable = cluster.usable_cluster([
        _gpunode("node-a", network=_peer("node-a")),
        _gpunode("node-b", network={"address": "10.0.0.2", "peerPort": 99999, "agent": "node-b"}),
        _gpunode("node-c", nics=({"name": "ib0", "rdma": "yes"},), network=_peer("node-c")),
    ], default_network_bandwidth_bytes_per_s=12.5 * GB)
    assert usable is not None and usable.cross_node == {"node-a", "node-c"}
    assert "GpuNode node-b: status.network.peerPort: must be a port number 1-65535, got 99999" in caplog.text
    assert "GpuNode node-c: status.nics[0].rdma: must be bool" in caplog.text


# --- the operator's reconcile ---------------------------------------------------------------------


class MemoryApi(MemoryObjects):
    """An in-memory ``KubeApi``: what reconcile lists, applies and deletes."""

    def create(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        return dict(obj)

    def apply(self, obj: Mapping[str, Any], *, initial: Mapping[str, Any] | None = None) -> k8s.ApplyResult:
        key = key_of(obj)
        existed = key in self.objects
        self.objects[key] = copy.deepcopy(dict(obj))
        return "patched" if existed else "created"

    def apply_replicas(self, ref: k8s.ObjectRef, replicas: int, *, field_manager: str) -> dict[str, Any]:
        return {}

    def merge_patch(self, ref: k8s.ObjectRef, patch: Mapping[str, Any], *,
                    subresource: str | None = None) -> dict[str, Any]:
        raise AssertionError("reconcile returns its status patch; it writes none itself")

    def delete(self, ref: k8s.ObjectRef) -> bool:
        return self.objects.pop((ref.kind, ref.namespace, ref.name), None) is not None


def _reconcile(gpunodes: list[dict[str, Any]], spec: dict[str, Any]) -> tuple[reconcile.Outcome, MemoryApi]:
    api = MemoryApi(gpunodes)
    obj = reconcile.WorkflowObject(name="big", namespace="team-a", generation=1, spec=spec, status={})
    outcome = reconcile.reconcile(api, obj, settings=OperatorSettings(image="x"),
                                  metrics=OperatorMetrics.build(CollectorRegistry()),
                                  adopt=lambda child: None,
                                  now=datetime.datetime(2026, 11, 27, 18, tzinfo=datetime.UTC))
    return outcome, api


BIG = {"slo": "1s",
       "functions": [{"name": "decode", "handler": "m:f"}]
       + [{"name": f"f{i}", "handler": "m:f", "gpu": {"memory": "20Gi"}} for i in range(5)],
       "edges": [{"from": "decode", "to": "f0", "size": "100MB"}]
       + [{"from": f"f{i}", "to": f"f{i + 1}", "size": "10MB"} for i in range(4)]}
NIC = (gpunode.Nic("ib0", IB, "mlx5_0"),)


def test_reconcile_spreads_a_workflow_over_nodes_that_serve_cross_node_reads() -> None:
    outcome, api = _reconcile([_gpunode("node-a", nics=NIC, network=_peer("node-a")),
                               _gpunode("node-b", nics=NIC, network=_peer("node-b"))], BIG)
    assert outcome.phase is not Phase.UNSCHEDULABLE, outcome.message
    placed = outcome.status["placement"]
    assert {p["node"] for p in placed.values()} == {"node-a", "node-b"}
    assert placed["decode"]["node"] == placed["f0"]["node"]
    # Each function's Deployment is pinned to its own node.
    for name, where in placed.items():
        deployment = api.get(k8s.ObjectRef("Deployment", f"big-{name}", "team-a"))
        assert deployment is not None
        terms = deployment["spec"]["template"]["spec"]["affinity"]["nodeAffinity"][
            "requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
        assert terms[0]["matchExpressions"][0]["values"] == [where["node"]]
    placed_event = next(e for e in outcome.events if e.reason == "Placed")
    assert "node-a/gpu-" in placed_event.message and "node-b/gpu-" in placed_event.message


def test_reconcile_in_a_mixed_cluster_never_splits_over_a_node_without_the_network_block() -> None:
    outcome, _ = _reconcile([_gpunode("node-a", nics=NIC, network=_peer("node-a")),
                             _gpunode("node-b", nics=NIC)], BIG)
    assert outcome.phase is Phase.UNSCHEDULABLE
    assert "only nodes whose sidecars serve reads from other nodes" in outcome.message
    fits = dict(BIG, functions=BIG["functions"][:4], edges=BIG["edges"][:3])
    outcome, _ = _reconcile([_gpunode("node-a", nics=NIC, network=_peer("node-a")),
                             _gpunode("node-b", nics=NIC)], fits)
    assert len({p["node"] for p in outcome.status["placement"].values()}) == 1


# --- GpuNode changes: which workflows are placed again --------------------------------------------


def _placed(name: str, phase: str, placement: dict[str, Any]) -> dict[str, Any]:
    return {"kind": "Workflow", "metadata": {"name": name, "namespace": "team-a"},
            "spec": {}, "status": {"phase": phase, "placement": placement}}


SPREAD = _placed("spread", "Running", {"f": {"node": "node-a", "gpu": 0}, "g": {"node": "node-b", "gpu": 0}})
WHOLE = _placed("whole", "Running", {"f": {"node": "node-a", "gpu": 1}, "c": {"node": "node-a"}})
WAITING = _placed("waiting", "Unschedulable", {})


def test_a_node_that_stops_serving_cross_node_reads_re_places_only_the_workflows_it_shares() -> None:
    before = gpunode.node_state(_gpunode("node-a", network=_peer("node-a")))
    after = gpunode.node_state(_gpunode("node-a"))
    assert before.cross_node and not after.cross_node
    refs = reconcile.workflows_to_replace([SPREAD, WHOLE, WAITING], before, after)
    assert [r.name for r in refs] == ["spread"]


def test_a_node_that_starts_serving_cross_node_reads_retries_the_unschedulable_ones() -> None:
    before = gpunode.node_state(_gpunode("node-a"))
    after = gpunode.node_state(_gpunode("node-a", network=_peer("node-a")))
    refs = reconcile.workflows_to_replace([SPREAD, WHOLE, WAITING], before, after)
    assert [r.name for r in refs] == ["waiting"]
