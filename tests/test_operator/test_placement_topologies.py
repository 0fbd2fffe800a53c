"""Placement on the simulated machines: data lands on the fastest links there are."""

from __future__ import annotations

import random

import pytest
from faastube_placement import instances as pi
from faastube_placement.core import (
    Assignment,
    GpuUsage,
    PlacementError,
    capacity_violations,
    edge_costs,
    place,
    placement_cost,
)
from faastube_placement.costs import build_cost_model
from faastube_spec import topology
from faastube_spec.topology import ClusterTopology
from faastube_spec.workflow import EdgeSpec, FunctionSpec, Workflow

GIB = 2**30
MB = 10**6


def chain(memory_gib: list[int], sizes_mb: list[int], *, cpu_head: bool = False,
          replicas: int = 1) -> Workflow:
    """A pipeline of GPU stages (optionally fed by a CPU decode stage)."""
    functions = [FunctionSpec(f"g{i}", f"m:g{i}", gpu=True, gpu_memory_bytes=m * GIB, replicas=replicas)
                 for i, m in enumerate(memory_gib)]
    names = [f.name for f in functions]
    if cpu_head:
        functions.insert(0, FunctionSpec("decode", "m:decode"))
        names.insert(0, "decode")
    assert len(sizes_mb) == len(names) - 1, "one size per edge"
    edges = tuple(EdgeSpec(a, b, s * MB) for a, b, s in zip(names, names[1:], sizes_mb))
    return Workflow(name="chain", slo_s=1.0, entry=names[0], exit=names[-1],
                    functions=tuple(functions), edges=edges)


def paths(workflow: Workflow, cluster: ClusterTopology, assignments) -> list[str]:
    return [e.path for e in edge_costs(workflow, cluster, assignments)]


def test_dgx1_pipeline_stages_that_cannot_share_a_gpu_land_on_48_gbps_nvlink_pairs() -> None:
    cluster = topology.builtin("dgx1-v100")
    node = cluster.nodes[0]
    # 20 GiB each: two never fit one 32 GB V100, so every edge crosses GPUs.
    workflow = chain([20, 20, 20, 20], [180, 150, 140])
    result = place(workflow, cluster)
    a = result.assignments
    for left, right in (("g0", "g1"), ("g1", "g2"), ("g2", "g3")):
        link = node.link(a[left].gpu, a[right].gpu)
        assert link is not None and link.kind == "nvlink" and link.bandwidth_bytes_per_s == 48e9
    assert result.proven_optimal


def test_dgx1_relays_over_nvlink_rather_than_crossing_pcie_between_sockets() -> None:
    model = build_cost_model(topology.builtin("dgx1-v100"))
    host, g0, g5, g3 = (model.index_of[loc] for loc in (
        pi_location("dgx1-v100", None), pi_location("dgx1-v100", 0),
        pi_location("dgx1-v100", 5), pi_location("dgx1-v100", 3)))
    assert model.paths[g0][g3] == "nvlink"
    assert model.seconds_per_byte[g0][g3] == pytest.approx(1 / 48e9)
    # 0 and 5 share no NVLink: 0 -> 4 (48) -> 5 (24), or 0 -> 1 (24) -> 5 (48): 24 GB/s beats 8.
    assert model.paths[g0][g5] == "nvlink-relay"
    assert model.seconds_per_byte[g0][g5] < 1 / 8e9
    assert model.paths[host][g0] == "pcie" and model.paths[g0][g0] == "same-gpu"


def pi_location(node: str, gpu: int | None):
    from faastube_placement.costs import Location
    return Location(node, gpu)


def test_stages_that_fit_together_share_one_gpu_for_zero_copy() -> None:
    cluster = topology.builtin("dgx-a100")
    workflow = chain([10, 10, 10], [130, 150, 180], cpu_head=True)
    result = place(workflow, cluster)
    gpus = {result.assignments[f"g{i}"] for i in range(3)}
    assert len(gpus) == 1
    assert result.assignments["decode"] == Assignment("dgx-a100", None)
    assert paths(workflow, cluster, result.assignments) == ["pcie", "same-gpu", "same-gpu"]


def test_sharing_slots_limit_how_many_functions_share_a_gpu() -> None:
    cluster = topology.builtin("dgx-h100")
    workflow = chain([1] * 6, [100] * 5)  # default 4 slots per GPU
    result = place(workflow, cluster)
    per_gpu: dict[Assignment, int] = {}
    for a in result.assignments.values():
        per_gpu[a] = per_gpu.get(a, 0) + 1
    assert max(per_gpu.values()) <= 4
    # NVSwitch: the one edge between the two GPUs goes over NVLink.
    assert sorted(paths(workflow, cluster, result.assignments)).count("nvlink") == 1


def test_pcie_only_a10_uses_the_peer_to_peer_pair_behind_one_switch() -> None:
    cluster = topology.builtin("4x-a10")
    node = cluster.nodes[0]
    workflow = chain([20, 20], [300])  # two 24 GB A10s needed
    result = place(workflow, cluster)
    a, b = result.assignments["g0"].gpu, result.assignments["g1"].gpu
    best = max(node.gpu_bandwidth_bytes_per_s(x, y) for x in node.gpu_indices for y in node.gpu_indices
               if x != y)
    assert node.gpu_bandwidth_bytes_per_s(a, b) == best
    assert paths(workflow, cluster, result.assignments)[0].startswith("pcie")


def test_l40s_nvlink_pairs_carry_the_heaviest_edges() -> None:
    cluster = topology.builtin("8x-l40s")
    node = cluster.nodes[0]
    # Four 40 GiB stages: one per 48 GB L40S; the two heavy edges get the NVLink pairs.
    workflow = chain([40, 40, 40, 40], [500, 10, 500])
    result = place(workflow, cluster)
    a = result.assignments
    for left, right in (("g0", "g1"), ("g2", "g3")):
        link = node.link(a[left].gpu, a[right].gpu)
        assert link is not None and link.kind == "nvlink"


def test_mixed_cluster_keeps_a_workflow_on_one_node_and_uses_the_best_one() -> None:
    cluster = pi.cluster_of(["4x-a10", "dgx1-v100", "dgx-h100"])
    workflow = chain([20, 20, 20], [130, 200, 200], cpu_head=True)
    result = place(workflow, cluster)
    assert {a.node for a in result.assignments.values()} == {"n2"}  # the H100 box: fastest PCIe and NVLink


def test_a_full_node_pushes_the_workflow_to_the_next_best_node() -> None:
    cluster = pi.cluster_of(["4x-a10", "dgx1-v100", "dgx-h100"])
    workflow = chain([20, 20, 20], [130, 200, 200], cpu_head=True)
    usage = {("n2", g.index): GpuUsage(slots_used=4) for g in cluster.node("n2").gpus}
    result = place(workflow, cluster, usage=usage)
    assert {a.node for a in result.assignments.values()} == {"n1"}
    assert capacity_violations(workflow, cluster, result.assignments, usage=usage) == []


def test_workflow_larger_than_a_node_spans_nodes_over_the_network() -> None:
    cluster = pi.cluster_of(["4x-a10", "4x-a10"])
    workflow = chain([20] * 6, [100] * 5)
    result = place(workflow, cluster)
    used = paths(workflow, cluster, result.assignments)
    assert used.count("network") == 1  # one cut of the chain, not more
    assert capacity_violations(workflow, cluster, result.assignments) == []


def test_placement_cost_of_the_result_matches_its_reported_cost() -> None:
    cluster = topology.builtin("example-cluster")
    workflow = pi.random_workflow(random.Random(3), functions=8, max_memory_bytes=30 * GIB)
    result = place(workflow, cluster)
    assert placement_cost(workflow, cluster, result.assignments) == pytest.approx(result.cost_s)
    assert result.lower_bound_s is not None and result.lower_bound_s <= result.cost_s


@pytest.mark.parametrize("seed", range(3))
def test_same_input_gives_the_same_placement(seed: int) -> None:
    cluster = pi.cluster_of(["dgx1-v100", "dgx-a100", "8x-l40s", "dgx1-v100"])
    workflow = pi.random_workflow(random.Random(seed), functions=12, max_replicas=2,
                                  max_memory_bytes=12 * GIB)
    first = place(workflow, cluster)
    again = place(workflow, cluster)
    assert first == again
    rebuilt = pi.cluster_of(["dgx1-v100", "dgx-a100", "8x-l40s", "dgx1-v100"])
    assert place(workflow, rebuilt) == first


def test_nodes_with_no_network_between_them_are_never_bridged() -> None:
    from faastube_spec.topology import NetworkLink
    base = pi.cluster_of(["4x-a10", "4x-a10"])
    cluster = ClusterTopology(nodes=base.nodes, network_links=(NetworkLink("n0", "n1", 0.0),))
    small = chain([20, 20], [100])
    assert {a.node for a in place(small, cluster).assignments.values()} == {"n0"}
    with pytest.raises(PlacementError, match="no network path"):
        place(chain([20] * 6, [100] * 5), cluster)
