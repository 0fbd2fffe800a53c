"""A workflow runs on one node (refs are node-local); a function may not take the gateway's name."""

from __future__ import annotations

import dataclasses

import pytest
from faastube_operator import reconcile
from faastube_placement import core as placement
from faastube_placement import place_on_one_node
from faastube_spec import topology
from faastube_spec import workflow as wf

NODE = topology.builtin_node("4x-a10")  # 4 GPUs of 24 GB
CLUSTER = topology.ClusterTopology(nodes=(dataclasses.replace(NODE, name="node-a"),
                                          dataclasses.replace(NODE, name="node-b")))


def _chain(count: int, memory: str) -> wf.Workflow:
    functions = [{"name": f"f{i}", "handler": "m:f", "gpu": {"memory": memory}} for i in range(count)]
    edges = [{"from": f"f{i}", "to": f"f{i + 1}", "size": "10MB"} for i in range(count - 1)]
    return wf.parse_workflow({"apiVersion": "faastube.io/v1alpha1", "kind": "Workflow",
                              "metadata": {"name": "chain"},
                              "spec": {"slo": "1s", "functions": functions, "edges": edges}})


def test_a_workflow_that_fits_on_a_node_is_placed_on_one_node() -> None:
    decided = place_on_one_node(_chain(3, "20Gi"), CLUSTER, usage={})
    assert len({a.node for a in decided.assignments.values()}) == 1


def test_a_workflow_that_fits_only_across_nodes_is_refused_with_each_nodes_reason() -> None:
    workflow = _chain(5, "20Gi")  # five 20 GiB functions: one per GPU, four GPUs a node
    spread = placement.place(workflow, CLUSTER)
    assert {a.node for a in spread.assignments.values()} == {"node-a", "node-b"}
    with pytest.raises(placement.PlacementError, match="fits only across nodes") as caught:
        place_on_one_node(workflow, CLUSTER, usage={})
    assert "node-a:" in str(caught.value) and "node-b:" in str(caught.value)


def test_the_cheapest_single_node_wins_when_usage_pushes_a_workflow_apart() -> None:
    # node-a has three GPUs full: a four-function chain fits whole only on node-b.
    full = placement.GpuUsage(memory_used_bytes=NODE.gpus[0].memory_bytes, slots_used=4)
    usage = {("node-a", i): full for i in range(3)}
    decided = place_on_one_node(_chain(4, "20Gi"), CLUSTER, usage=usage)
    assert {a.node for a in decided.assignments.values()} == {"node-b"}


def test_a_function_named_gateway_is_an_invalid_spec_naming_the_field() -> None:
    obj = reconcile.WorkflowObject(
        name="w", namespace="ns", generation=1, status={},
        spec={"slo": "1s", "functions": [{"name": "decode", "handler": "m:d"},
                                         {"name": "gateway", "handler": "m:g"}],
              "edges": [{"from": "decode", "to": "gateway", "size": 1}]})
    with pytest.raises(wf.WorkflowInvalid, match=r"spec.functions\[1\].name: 'gateway' is reserved"):
        reconcile.parse(obj)
