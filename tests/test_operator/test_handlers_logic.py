"""The pure decisions behind the handlers: conditions, re-placement, cluster view, tables."""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from faastube_placement import GpuUsage

pytest.importorskip("prometheus_client")
from faastube_operator import cluster, conditions, k8s, printer, reconcile
from faastube_operator.conditions import Phase
from faastube_operator.metrics import OperatorMetrics
from faastube_spec import gpunode, topology
from prometheus_client import CollectorRegistry

ROOT = Path(__file__).resolve().parents[2]
T0 = datetime.datetime(2026, 11, 27, 18, 0, tzinfo=datetime.UTC)
T1 = T0 + datetime.timedelta(minutes=5)


def _by_type(conds: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in conds}


def test_each_phase_sets_ready_progressing_degraded_in_metav1_shape() -> None:
    status = conditions.status_patch(Phase.RUNNING, "all good", existing_conditions=None,
                                     now=T0, generation=4)
    conds = _by_type(status["conditions"])
    assert status["phase"] == "Running" and status["observedGeneration"] == 4
    assert conds["Ready"] == {"type": "Ready", "status": "True", "reason": "AllFunctionsAvailable",
                              "message": "all good", "lastTransitionTime": "2026-11-27T18:00:00Z",
                              "observedGeneration": 4}
    assert conds["Progressing"]["status"] == "False" and conds["Degraded"]["status"] == "False"
    invalid = _by_type(conditions.status_patch(Phase.INVALID, "bad", existing_conditions=None,
                                               now=T0, generation=1)["conditions"])
    assert invalid["Degraded"]["status"] == "True" and invalid["Degraded"]["reason"] == "InvalidSpec"
    assert invalid["Ready"]["status"] == "False"


def test_transition_time_changes_only_when_the_status_changes() -> None:
    first = conditions.status_patch(Phase.DEPLOYING, "waiting", existing_conditions=None,
                                    now=T0, generation=1)["conditions"]
    again = conditions.status_patch(Phase.DEPLOYING, "still waiting", existing_conditions=first,
                                    now=T1, generation=1)["conditions"]
    assert _by_type(again)["Ready"]["lastTransitionTime"] == "2026-11-27T18:00:00Z"
    assert _by_type(again)["Ready"]["message"] == "still waiting"
    ready = conditions.status_patch(Phase.RUNNING, "up", existing_conditions=again,
                                    now=T1, generation=1)["conditions"]
    assert _by_type(ready)["Ready"]["lastTransitionTime"] == "2026-11-27T18:05:00Z"
    assert _by_type(ready)["Degraded"]["lastTransitionTime"] == "2026-11-27T18:00:00Z"


def test_foreign_conditions_are_kept() -> None:
    existing = [{"type": "Audited", "status": "True", "reason": "Ok", "message": "",
                 "lastTransitionTime": "2026-01-01T00:00:00Z"}]
    merged = conditions.merge_conditions(existing, conditions.conditions_for(Phase.PENDING, "x"),
                                         now=T0, generation=None)
    assert [c["type"] for c in merged] == ["Ready", "Progressing", "Degraded", "Audited"]


def _dep(name: str, *, replicas: int = 1, available: int = 0, generation: int | None = None,
         observed: int | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if generation is not None:
        meta["generation"] = generation
    status: dict[str, Any] = {"updatedReplicas": available, "availableReplicas": available}
    if observed is not None:
        status["observedGeneration"] = observed
    return {"metadata": meta, "spec": {"replicas": replicas}, "status": status}


def test_rollout_is_running_only_when_every_deployment_is_available_at_its_generation() -> None:
    phase, msg = conditions.rollout_phase([_dep("a", available=1), _dep("b", replicas=2,
                                                                        available=1)],
                                          expected_names=["a", "b", "c"])
    assert phase is Phase.DEPLOYING and msg == "waiting for deployments: b, c"
    stale = _dep("a", available=1, generation=3, observed=2)
    assert not conditions.deployment_available(stale)
    phase, _ = conditions.rollout_phase([_dep("a", available=1, generation=3, observed=3)],
                                        expected_names=["a"])
    assert phase is Phase.RUNNING


def _gpunode(name: str = "node-a", *, unhealthy: tuple[int, ...] = (),
             ready: str = "True") -> dict[str, Any]:
    node = topology.dump_node(topology.builtin_node("4x-a10"))
    return {"metadata": {"name": name}, "spec": {"topology": node},
            "status": {"gpus": [{"index": i, "healthy": i not in unhealthy} for i in range(4)],
                       "conditions": [{"type": "Ready", "status": ready}]}}


def test_cluster_offers_only_healthy_gpus_of_ready_nodes_under_the_kubernetes_name() -> None:
    topo = cluster.cluster_from_gpunodes(
        [_gpunode("node-a", unhealthy=(1,)), _gpunode("node-b", ready="False")],
        default_network_bandwidth_bytes_per_s=25e9)
    assert topo is not None
    assert [n.name for n in topo.nodes] == ["node-a"]
    assert topo.node("node-a").gpu_indices == (0, 2, 3)
    assert all(1 not in (link.a, link.b) for link in topo.node("node-a").links)
    assert topo.default_network_bandwidth_bytes_per_s == pytest.approx(25e9)


def test_a_gpunode_with_a_broken_topology_is_left_out_not_fatal() -> None:
    broken = _gpunode("node-b")
    broken["spec"]["topology"]["gpus"][0]["memoryBytes"] = "lots"
    topo = cluster.cluster_from_gpunodes([broken, _gpunode("node-a")],
                                         default_network_bandwidth_bytes_per_s=1e9)
    assert topo is not None and [n.name for n in topo.nodes] == ["node-a"]
    assert cluster.cluster_from_gpunodes([broken], default_network_bandwidth_bytes_per_s=1e9) is None


def _wf(name: str, phase: str, placement: dict[str, Any]) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "ns"},
            "status": {"phase": phase, "placement": placement}}


WORKFLOWS = [
    _wf("on-gpu-1", "Running", {"f": {"node": "node-a", "gpu": 1}, "c": {"node": "node-a"}}),
    _wf("on-gpu-2", "Running", {"f": {"node": "node-a", "gpu": 2}}),
    _wf("elsewhere", "Running", {"f": {"node": "node-b", "gpu": 1}}),
    _wf("waiting", "Unschedulable", {}),
]


def _names(refs: list[k8s.ObjectRef]) -> list[str]:
    return sorted(r.name for r in refs)


def test_a_gpu_going_unhealthy_re_places_only_the_workflows_on_it() -> None:
    before = gpunode.node_state(_gpunode())
    after = gpunode.node_state(_gpunode(unhealthy=(1,)))
    assert _names(reconcile.workflows_to_replace(WORKFLOWS, before, after)) == ["on-gpu-1"]


def test_a_node_gone_re_places_everything_on_it() -> None:
    before = gpunode.node_state(_gpunode())
    assert _names(reconcile.workflows_to_replace(WORKFLOWS, before, None)) == [
        "on-gpu-1", "on-gpu-2"]
    not_ready = gpunode.node_state(_gpunode(ready="False"))
    assert _names(reconcile.workflows_to_replace(WORKFLOWS, before, not_ready)) == [
        "on-gpu-1", "on-gpu-2"]


def test_new_capacity_retries_only_unschedulable_workflows() -> None:
    added = gpunode.node_state(_gpunode("node-c"))
    assert _names(reconcile.workflows_to_replace(WORKFLOWS, None, added)) == ["waiting"]
    healed = gpunode.node_state(_gpunode())
    sick = gpunode.node_state(_gpunode(unhealthy=(3,)))
    assert _names(reconcile.workflows_to_replace(WORKFLOWS, sick, healed)) == ["waiting"]


def test_usage_by_other_workflows_counts_their_replicas_and_memory() -> None:
    spec = {"slo": "1s", "functions": [
        {"name": "f", "handler": "m:f", "gpu": {"memory": "1Gi"}, "replicas": 2},
        {"name": "c", "handler": "m:c"}], "edges": [{"from": "c", "to": "f", "size": 1}]}
    others = [dict(_wf("a", "Running", {"f": {"node": "n", "gpu": 1}, "c": {"node": "n"}}),
                   spec=spec),
              dict(_wf("me", "Running", {"f": {"node": "n", "gpu": 1}}), spec=spec),
              dict(_wf("broken", "Running", {"f": {"node": "n", "gpu": 1}}), spec={"slo": 3})]

    got = reconcile.usage_by_others(others, exclude=("ns", "me"))
    assert got == {("n", 1): GpuUsage(memory_used_bytes=2 << 30, slots_used=2)}


def test_desired_fields_already_present_mean_no_patch() -> None:
    actual = {"metadata": {"name": "a", "uid": "u", "labels": {"x": "1"}},
              "spec": {"replicas": 2, "template": {"spec": {"containers": [{"name": "c",
                                                                            "image": "i"}]}}}}
    assert k8s.is_subset({"metadata": {"name": "a"}, "spec": {"replicas": 2}}, actual)
    assert not k8s.is_subset({"spec": {"replicas": 3}}, actual)
    assert k8s.is_subset({"spec": {"affinity": None}}, actual)  # null asks for absence
    assert not k8s.is_subset({"spec": {"replicas": None}}, actual)
    assert not k8s.is_subset({"spec": {"template": {"spec": {"containers": []}}}}, actual)


def test_api_paths_for_namespaced_and_cluster_objects() -> None:
    assert k8s._path("Deployment", namespace="ns", name="d") == \
        "/apis/apps/v1/namespaces/ns/deployments/d"
    assert k8s._path("Service", namespace="ns") == "/api/v1/namespaces/ns/services"
    assert k8s._path("GpuNode", namespace="ignored", name="n") == "/apis/faastube.io/v1alpha1/gpunodes/n"
    with pytest.raises(ValueError, match="Pod"):
        k8s._path("Pod", namespace="ns")


def test_metrics_count_results_and_reject_unknown_ones() -> None:
    registry = CollectorRegistry()
    metrics = OperatorMetrics.build(registry)
    metrics.reconciled("success")
    metrics.reconciled("success")
    metrics.placement_cost.observe(0.004)
    assert registry.get_sample_value("faastube_operator_reconciliations_total",
                                     {"result": "success"}) == 2
    assert registry.get_sample_value("faastube_operator_placement_cost_seconds_count") == 1
    with pytest.raises(ValueError, match="result"):
        metrics.reconciled("maybe")


def _crd(name: str) -> dict[str, Any]:
    return dict(yaml.safe_load((ROOT / "crds" / name).read_text()))


def test_printer_renders_kubectl_style_tables_from_the_crd_columns() -> None:
    wf = {"metadata": {"name": "traffic", "creationTimestamp": "2026-11-27T17:55:00Z"},
          "spec": {"slo": "800ms"},
          "status": {"phase": "Running", "functionCount": 5,
                     "conditions": [{"type": "Progressing", "status": "False"},
                                    {"type": "Ready", "status": "True"}]}}
    fresh = {"metadata": {"name": "new", "creationTimestamp": "2026-11-27T17:59:30Z"}}
    text = printer.table(_crd("workflows.faastube.io.yaml"), [wf, fresh], now=T0)
    assert text.splitlines() == [
        "NAME      READY    PHASE     FUNCTIONS   AGE",
        "traffic   True     Running   5           5m",
        "new       <none>   <none>    <none>      30s",
    ]
    wide = printer.table(_crd("workflows.faastube.io.yaml"), [wf], now=T0, wide=True)
    assert wide.splitlines()[0].split() == ["NAME", "READY", "PHASE", "FUNCTIONS", "SLO", "AGE"]
    node = _gpunode()
    node["metadata"]["creationTimestamp"] = "2026-11-24T18:00:00Z"
    node["status"]["freePoolBytes"] = 1024
    lines = printer.table(_crd("gpunodes.faastube.io.yaml"), [node], now=T0).splitlines()
    assert lines[0].split() == ["NAME", "GPUS", "FREE-POOL", "READY", "AGE"]
    assert lines[1].split() == ["node-a", "0,1,2,3", "1024", "True", "3d"]


def test_printer_rejects_jsonpath_it_does_not_understand() -> None:
    with pytest.raises(ValueError, match="unsupported"):
        printer.jsonpath({}, ".a..b")
