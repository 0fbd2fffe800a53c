"""Infeasible inputs fail with a PlacementError that says why."""

from __future__ import annotations

import pytest
from faastube.errors import InvalidRequest
from faastube_placement import instances as pi
from faastube_placement.core import (
    Assignment,
    GpuUsage,
    PlacementError,
    brute_force,
    place,
    placement_cost,
)
from faastube_spec import topology
from faastube_spec.topology import ClusterTopology
from faastube_spec.workflow import EdgeSpec, FunctionSpec, Workflow

GIB = 2**30


def workflow(*functions: FunctionSpec, edges: tuple[EdgeSpec, ...] = ()) -> Workflow:
    return Workflow(name="wf", slo_s=1.0, entry=functions[0].name, exit=functions[-1].name,
                    functions=functions, edges=edges)


def gpu_fn(name: str, memory_gib: int, replicas: int = 1) -> FunctionSpec:
    return FunctionSpec(name, f"m:{name}", gpu=True, gpu_memory_bytes=memory_gib * GIB, replicas=replicas)


def test_a_function_larger_than_every_gpu_is_named_with_the_largest_free_gpu() -> None:
    with pytest.raises(PlacementError, match=r"function 'big' fits on no GPU.*most free memory"):
        place(workflow(gpu_fn("big", 100)), topology.builtin("4x-a10"))


def test_more_replicas_than_sharing_slots_is_rejected() -> None:
    with pytest.raises(PlacementError, match=r"'wide'.*5 sharing slot"):
        place(workflow(gpu_fn("wide", 1, replicas=5)), topology.builtin("dgx-h100"))


def test_functions_that_fit_alone_but_not_together_report_the_total_demand() -> None:
    wf = workflow(*(gpu_fn(f"f{i}", 20) for i in range(5)))
    with pytest.raises(PlacementError, match=r"do not fit together: they need 100GiB of GPU memory in all, "
                                             r"the cluster has [\d.]+GiB free"):
        place(wf, topology.builtin("4x-a10"))
    with pytest.raises(PlacementError, match="do not fit together"):
        brute_force(wf, topology.builtin("4x-a10"))


def test_usage_that_fills_the_gpus_leaves_no_room() -> None:
    cluster = topology.builtin("lent-4xh100")
    usage = {(cluster.nodes[0].name, g.index): GpuUsage(slots_used=4) for g in cluster.nodes[0].gpus}
    with pytest.raises(PlacementError, match="most free slots are 0"):
        place(workflow(gpu_fn("f", 1)), cluster, usage=usage)


def test_gpu_functions_on_a_cluster_without_gpus_are_rejected() -> None:
    node = pi.subset_node(topology.builtin_node("4x-a10"), [], name="cpu-only")
    with pytest.raises(PlacementError, match="no node of the topology has a GPU"):
        place(workflow(gpu_fn("f", 1)), ClusterTopology(nodes=(node,)))


def test_cpu_only_workflow_lands_on_a_host_at_no_cost() -> None:
    wf = workflow(FunctionSpec("a", "m:a"), FunctionSpec("b", "m:b"), edges=(EdgeSpec("a", "b", 10**6),))
    result = place(wf, topology.builtin("4x-a10"))
    assert result.cost_s == 0.0
    assert {a.gpu for a in result.assignments.values()} == {None}


@pytest.mark.parametrize("usage, message", [
    ({("nowhere", 0): GpuUsage()}, "no node 'nowhere'"),
    ({("4x-a10", 9): GpuUsage()}, "has no GPU 9"),
    ({("4x-a10", 0): GpuUsage(memory_used_bytes=-1)}, ">= 0"),
])
def test_usage_naming_unknown_gpus_is_rejected(usage: dict, message: str) -> None:
    with pytest.raises(PlacementError, match=message):
        place(workflow(gpu_fn("f", 1)), topology.builtin("4x-a10"), usage=usage)


@pytest.mark.parametrize("assignments, message", [
    ({}, r"assignments\['f'\]: function has no assignment"),
    ({"f": Assignment("4x-a10", None)}, "GPU function needs a GPU index"),
    ({"f": Assignment("4x-a10", 7)}, "no node '4x-a10' GPU 7"),
    ({"f": Assignment("4x-a10", 0), "g": Assignment("4x-a10", 0)}, "unknown function"),
])
def test_placement_cost_rejects_assignments_that_do_not_match(assignments: dict, message: str) -> None:
    with pytest.raises(PlacementError, match=message):
        placement_cost(workflow(gpu_fn("f", 1)), topology.builtin("4x-a10"), assignments)


def test_brute_force_refuses_instances_too_large_to_enumerate() -> None:
    wf = workflow(*(gpu_fn(f"f{i}", 1) for i in range(8)))
    with pytest.raises(InvalidRequest, match="too large to enumerate"):
        brute_force(wf, pi.cluster_of(["dgx-h100"] * 4), max_assignments=10_000)
