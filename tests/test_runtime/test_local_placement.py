"""Local mode places GPU functions as the operator places them on a node, not round-robin."""

from __future__ import annotations

from pathlib import Path

from faastube_runtime.local import assign_devices
from faastube_spec import topology
from faastube_spec.workflow import load_workflow, parse_workflow

REPO = Path(__file__).resolve().parents[2]
PIPELINE = {
    "apiVersion": "faastube.io/v1alpha1", "kind": "Workflow", "metadata": {"name": "pipe"},
    "spec": {"slo": "1s", "functions": [
        {"name": "a", "handler": "m:a", "gpu": {"memory": "1Gi"}},
        {"name": "b", "handler": "m:b", "gpu": {"memory": "1Gi"}},
        {"name": "c", "handler": "m:c", "gpu": {"memory": "1Gi"}, "replicas": 2},
        {"name": "cpu", "handler": "m:d", "gpu": False},
    ], "edges": [{"from": "a", "to": "b", "size": 500_000_000}, {"from": "b", "to": "c", "size": 500_000_000},
                 {"from": "c", "to": "cpu", "size": 1000}]},
}


def _node() -> topology.NodeTopology:
    return topology.builtin("lent-4xh100").nodes[0]


def test_gpu_functions_that_pass_much_data_share_a_gpu() -> None:
    from faastube_spec.workflow import parse_workflow

    devices = assign_devices(parse_workflow(PIPELINE), gpus=4, node=_node())
    assert devices[("a", 0)] == devices[("b", 0)] == devices[("c", 0)] == devices[("c", 1)]
    assert devices[("cpu", 0)] is None


def test_topology_indices_are_mapped_to_cuda_ordinals() -> None:
    from faastube_spec.workflow import parse_workflow

    devices = assign_devices(parse_workflow(PIPELINE), gpus=4, node=_node(), cuda_of={0: 3, 1: 2, 2: 1, 3: 0})
    placed = {d for d in devices.values() if d is not None}
    plain = {d for d in assign_devices(parse_workflow(PIPELINE), gpus=4, node=_node()).values() if d is not None}
    assert placed == {3 - g for g in plain}


def test_without_a_topology_gpu_functions_go_round_robin() -> None:
    workflow = load_workflow(REPO / "examples" / "traffic" / "workflow.yaml")
    devices = assign_devices(workflow, gpus=2)
    gpu = [d for d in devices.values() if d is not None]
    # one device per replica number up to each GPU function's maxReplicas, spread evenly
    assert len(gpu) == sum(f.reserved_replicas for f in workflow.functions if f.gpu)
    assert set(gpu) == {0, 1} and abs(gpu.count(0) - gpu.count(1)) <= 1


def test_the_traffic_example_keeps_its_gpu_functions_together_on_a_four_gpu_node() -> None:
    workflow = load_workflow(REPO / "examples" / "traffic" / "workflow.yaml")
    devices = assign_devices(workflow, gpus=4, node=_node())
    gpus = {d for (name, _), d in devices.items() if d is not None}
    assert len(gpus) <= 2, devices


def test_every_replica_an_autoscaled_function_may_run_has_a_device_on_its_gpu() -> None:
    workflow = parse_workflow({
        "apiVersion": "faastube.io/v1alpha1", "kind": "Workflow", "metadata": {"name": "w"},
        "spec": {"slo": "1s", "functions": [
            {"name": "a", "handler": "m:a", "gpu": {"memory": "1Gi"}, "minReplicas": 0, "replicas": 0,
             "maxReplicas": 3},
            {"name": "b", "handler": "m:b", "gpu": {"memory": "1Gi"}, "maxReplicas": 2}],
            "edges": [{"from": "a", "to": "b", "size": "1GB"}]}})
    devices = assign_devices(workflow, gpus=4, node=_node())
    assert {key for key in devices} == {("a", 0), ("a", 1), ("a", 2), ("b", 0), ("b", 1)}
    # every replica on its function's GPU; 3 + 2 reserved slots do not fit one GPU's 4
    assert devices[("a", 0)] == devices[("a", 1)] == devices[("a", 2)]
    assert devices[("b", 0)] == devices[("b", 1)] != devices[("a", 0)]
