"""Placement reserves what an autoscaled function may scale to: maxReplicas sharing slots and memory."""

from __future__ import annotations

from typing import Any

import pytest
from faastube_operator import reconcile
from faastube_placement.core import Assignment, GpuUsage, PlacementError, capacity_violations, place
from faastube_spec import topology
from faastube_spec.workflow import EdgeSpec, FunctionSpec, Workflow

GIB = 2**30
MB = 10**6


def scaled(name: str, *, low: int, high: int, replicas: int = 1, memory_gib: int = 1) -> FunctionSpec:
    return FunctionSpec(name, f"m:{name}", gpu=True, gpu_memory_bytes=memory_gib * GIB, replicas=replicas,
                        min_replicas=low, max_replicas=high)


def pair(a: FunctionSpec, b: FunctionSpec) -> Workflow:
    # 1 GB between them: sharing a GPU (zero copy) is by far the cheapest layout
    return Workflow(name="wf", slo_s=1.0, entry=a.name, exit=b.name, functions=(a, b),
                    edges=(EdgeSpec(a.name, b.name, 1000 * MB),))


def one_node() -> topology.ClusterTopology:
    return topology.builtin("lent-4xh100")  # 4 sharing slots per GPU


def test_two_functions_whose_maxima_fill_the_slots_share_a_gpu() -> None:
    placed = place(pair(scaled("a", low=0, high=2), scaled("b", low=1, high=2)), one_node())
    assert placed.assignments["a"] == placed.assignments["b"]
    assert placed.cost_s == 0.0


def test_functions_that_start_small_but_may_outgrow_a_shared_gpu_are_kept_apart() -> None:
    # One replica each now would fit one GPU (2 of 4 slots); three each at most would not.
    placed = place(pair(scaled("a", low=1, high=3), scaled("b", low=1, high=3)), one_node())
    assert placed.assignments["a"].gpu != placed.assignments["b"].gpu
    fixed = place(pair(FunctionSpec("a", "m:a", gpu=True, gpu_memory_bytes=GIB),
                       FunctionSpec("b", "m:b", gpu=True, gpu_memory_bytes=GIB)), one_node())
    assert fixed.assignments["a"] == fixed.assignments["b"]


def test_gpu_memory_is_reserved_for_every_replica_up_to_the_maximum() -> None:
    node = topology.builtin("lent-4xh100").nodes[0]
    memory_gib = node.gpus[0].memory_bytes // GIB
    # Each replica takes 40% of a GPU: three fit no GPU, even though one would.
    per_replica = memory_gib * 2 // 5
    with pytest.raises(PlacementError, match=r"'big' fits on no GPU.*maxReplicas 3, reserved for autoscaling"):
        place(pair(scaled("big", low=1, high=3, memory_gib=per_replica), scaled("b", low=1, high=1)), one_node())


def test_a_maximum_above_the_sharing_slots_is_rejected_naming_maxreplicas() -> None:
    with pytest.raises(PlacementError, match=r"'wide'.*maxReplicas 5, reserved for autoscaling.*5 sharing slot"):
        place(pair(scaled("wide", low=0, high=5), scaled("b", low=1, high=1)), one_node())


def test_capacity_violations_count_the_reserved_replicas() -> None:
    cluster = one_node()
    node = cluster.nodes[0].name
    both_on_zero = {"a": Assignment(node, 0), "b": Assignment(node, 0)}
    workflow = pair(scaled("a", low=1, high=3), scaled("b", low=1, high=3))
    assert capacity_violations(workflow, cluster, both_on_zero) == [
        f"node {node!r} GPU 0: needs 6 sharing slots, 4 free"]


def _document(**scaling: Any) -> dict[str, Any]:
    return {"slo": "1s", "functions": [
        {"name": "f", "handler": "m:f", "gpu": {"memory": "1Gi"}, **scaling},
        {"name": "c", "handler": "m:c"}], "edges": [{"from": "c", "to": "f", "size": 1}]}


def test_the_operator_counts_other_workflows_at_their_reserved_replicas() -> None:
    others = [{"metadata": {"name": "scaled", "namespace": "ns"}, "spec": _document(minReplicas=0, maxReplicas=3),
               "status": {"phase": "Running", "placement": {"f": {"node": "n", "gpu": 1}, "c": {"node": "n"}}}}]
    got = reconcile.usage_by_others(others, exclude=("ns", "me"))
    assert got == {("n", 1): GpuUsage(memory_used_bytes=3 << 30, slots_used=3)}
