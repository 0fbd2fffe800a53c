"""The operator's scaling, pure: from a gateway's /scale answer to a Deployment's replicas.

The decision step (``autoscaling``), the loop (``scaler.Scaler``) over an in-memory
``KubeApi`` and a scripted gateway, and the reconciliation's hand-over of replicas
(``reconcile.apply_autoscaled``). The same behaviour with real processes (the operator,
a real gateway) is in tests/e2e/test_operator_scaling.py.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
from collections.abc import Mapping
from typing import Any

import pytest

pytest.importorskip("prometheus_client")
from faastube_operator import (
    autoscaling,
    cli,
    conditions,
    errors,
    k8s,
    manifests,
    reconcile,
    scaler,
)
from faastube_operator.metrics import OperatorMetrics
from faastube_operator.settings import AutoscalingSettings, OperatorSettings
from faastube_placement import Where
from faastube_spec import workflow as wf
from memory_kube import MemoryObjects, key_of
from prometheus_client import CollectorRegistry

NS = "team-a"


def _target(replicas: int, *, low: int = 1, high: int = 4) -> autoscaling.ScaleTarget:
    return autoscaling.ScaleTarget(namespace=NS, workflow="w", function="detect", deployment="w-detect",
                                   min_replicas=low, max_replicas=high, replicas=replicas)


def _decision(desired: int, reason: str = "stable", *, concurrency: float = 1.0) -> autoscaling.GatewayDecision:
    return autoscaling.GatewayDecision("detect", desired=desired, current=1, reason=reason,
                                       concurrency=concurrency)


# --- the decision ---------------------------------------------------------------------------


def test_the_gateways_decision_is_clamped_to_the_workflows_bounds() -> None:
    up = autoscaling.decide(_target(2, high=4), _decision(9, "panic"))
    assert up is not None and (up.replicas, up.direction) == (4, "up")
    assert "the gateway asked 9, bounds 1..4" in up.describe()
    down = autoscaling.decide(_target(3, low=2), _decision(0))
    assert down is not None and (down.replicas, down.direction) == (2, "down")
    to_zero = autoscaling.decide(_target(1, low=0), _decision(0))
    assert to_zero is not None and to_zero.replicas == 0
    assert to_zero.describe() == "detect: 1 -> 0 replicas (stable, concurrency 1.00)"


def test_nothing_is_done_when_the_count_is_already_right_or_the_gateway_knows_nothing() -> None:
    assert autoscaling.decide(_target(3), _decision(3)) is None
    assert autoscaling.decide(_target(4, high=4), _decision(7)) is None  # clamped: already at max
    # A gateway that just started says its starting count: not a decision to act on.
    assert autoscaling.decide(_target(3), _decision(1, "no-data")) is None
    assert autoscaling.decide(_target(3), None) is None  # it runs a spec without the function


def test_the_scale_answer_is_validated() -> None:
    answer = autoscaling.parse_scale_answer({"detect": {
        "desired": 2, "current": 1, "concurrency": 2.5, "panicConcurrency": 3.0, "panicking": True,
        "reason": "panic", "minReplicas": 0, "maxReplicas": 4}})
    assert answer == {"detect": autoscaling.GatewayDecision("detect", 2, 1, "panic", 2.5, True)}
    for bad in ([], {"detect": 3}, {"detect": {"desired": -1}}, {"detect": {"desired": True}},
                {"detect": {"desired": 1, "concurrency": "lots"}}, {"detect": {"current": 1}},
                {"detect": {"desired": 1, "concurrency": float("nan")}}):
        with pytest.raises(autoscaling.InvalidScaleAnswer):
            autoscaling.parse_scale_answer(bad)


def test_a_throttle_tells_at_once_then_holds_and_sums_up_what_came_meanwhile() -> None:
    throttle: autoscaling.Throttle[str, int] = autoscaling.Throttle(10.0)
    assert throttle.offer("a", 1, now_s=0.0) == autoscaling.Held(1, 1, 1)
    assert throttle.offer("a", 2, now_s=3.0) is None
    assert throttle.offer("a", 3, now_s=4.0) is None
    assert throttle.offer("b", 9, now_s=4.0) == autoscaling.Held(9, 9, 1)  # keys are apart
    assert throttle.due(now_s=9.0) == []
    assert throttle.due(now_s=10.0) == [("a", autoscaling.Held(2, 3, 2))]
    assert throttle.due(now_s=100.0) == []  # nothing happened since: nothing to tell
    assert throttle.offer("a", 4, now_s=100.0) == autoscaling.Held(4, 4, 1)
    throttle.forget("a")
    assert not throttle.holds("a") and throttle.offer("a", 5, now_s=101.0) is not None


# --- which gateways a round asks ------------------------------------------------------------


def _workflow_body(name: str = "w", *, phase: str = "Running", namespace: str = NS,
                   scaling: Mapping[str, Any] | None = None, **meta: Any) -> dict[str, Any]:
    detect: dict[str, Any] = {"name": "detect", "handler": "f:detect", "gpu": True}
    detect.update({"minReplicas": 1, "maxReplicas": 4} if scaling is None else scaling)
    return {"apiVersion": "faastube.io/v1alpha1", "kind": "Workflow",
            "metadata": {"name": name, "namespace": namespace, "uid": f"uid-{name}", "generation": 1,
                         "resourceVersion": "5", **meta},
            "spec": {"slo": "800ms", "functions": [{"name": "decode", "handler": "f:decode"}, detect],
                     "edges": [{"from": "decode", "to": "detect", "size": "1MB"}]},
            "status": {"phase": phase, "observedGeneration": 1,
                       "placement": {"decode": {"node": "n"}, "detect": {"node": "n", "gpu": 0}}}}


def _deployment(name: str, *, workflow: str = "w", replicas: int = 1, available: int | None = None,
                namespace: str = NS) -> dict[str, Any]:
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": name, "namespace": namespace,
                         "labels": {"faastube.io/workflow": workflow,
                                    "app.kubernetes.io/managed-by": "faastube-operator"}},
            "spec": {"replicas": replicas},
            "status": {"availableReplicas": replicas if available is None else available}}


def _children(workflow: str = "w", *, detect: int = 1, gateway_available: int = 1,
              namespace: str = NS) -> list[dict[str, Any]]:
    return [_deployment(f"{workflow}-decode", workflow=workflow, namespace=namespace),
            _deployment(f"{workflow}-detect", workflow=workflow, replicas=detect, namespace=namespace),
            _deployment(f"{workflow}-gateway", workflow=workflow, available=gateway_available,
                        namespace=namespace)]


def test_a_round_asks_the_gateways_of_deployed_workflows_with_autoscaled_functions_only() -> None:
    settings = OperatorSettings(namespaces=(NS,), autoscaling=AutoscalingSettings(
        gateway_url_template="http://{service}.{namespace}.svc.cluster.local:{port}"))
    workflows = [
        _workflow_body("w"),
        _workflow_body("deploying", phase="Deploying"),
        _workflow_body("pending", phase="Pending"),
        _workflow_body("fixed", scaling={"replicas": 2}),
        _workflow_body("keda", annotations={autoscaling.ANNOTATION_SCALER: "external"}),
        _workflow_body("no-gateway-yet"),
        _workflow_body("elsewhere", namespace="team-b"),
        _workflow_body("going", deletionTimestamp="2026-11-27T18:00:00Z"),
        {**_workflow_body("broken"), "spec": {"functions": []}},
    ]
    deployments = [*_children("w", detect=2), *_children("deploying"), *_children("pending"),
                   *_children("fixed"), *_children("keda"), *_children("no-gateway-yet", gateway_available=0),
                   *_children("elsewhere", namespace="team-b"), *_children("going"), *_children("broken")]
    jobs = autoscaling.plan_round(workflows, deployments, settings=settings)
    assert [job.workflow for job in jobs] == ["w", "deploying"]
    assert jobs[0].url == "http://w-gateway.team-a.svc.cluster.local:8080/scale"
    assert jobs[0].targets == (autoscaling.ScaleTarget(NS, "w", "detect", "w-detect", 1, 4, 2),)
    # A Deployment not created yet is not a target; nothing else to scale: no need to ask.
    assert autoscaling.plan_round([_workflow_body("w")], _children("w")[::2], settings=settings) == []


def test_the_gateway_url_template_is_checked_when_the_operator_starts() -> None:
    settings = AutoscalingSettings(gateway_url_template="http://127.0.0.1:9999/")
    assert settings.gateway_url(service="s", namespace="n", port=1, workflow="w") == "http://127.0.0.1:9999"
    for bad, match in (("http://{svc}.{namespace}:{port}", "unknown field"), ("http://{service", "expected"),
                       ("{service}:{port}", "http://"), ("http://{}:1", "unknown field")):
        with pytest.raises(ValueError, match=match):
            AutoscalingSettings(gateway_url_template=bad)
    with pytest.raises(ValueError, match="interval_s"):
        AutoscalingSettings(interval_s=0)


def test_the_command_line_sets_the_scaling_loop() -> None:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    default = cli.settings_from_args(parser.parse_args([])).autoscaling
    assert default == AutoscalingSettings() and default.enabled and default.interval_s == 2.0
    assert default.gateway_url_template == "http://{service}.{namespace}.svc:{port}"
    given = cli.settings_from_args(parser.parse_args([
        "--no-autoscaling", "--autoscaling-interval-s", "0.5", "--gateway-scrape-timeout-s", "3",
        "--gateway-url-template", "http://{workflow}-gw.{namespace}:{port}"])).autoscaling
    assert (given.enabled, given.interval_s, given.timeout_s) == (False, 0.5, 3.0)


# --- the loop -------------------------------------------------------------------------------


class FakeApi(MemoryObjects):
    """An in-memory ``KubeApi`` for the loop: objects by (kind, namespace, name)."""

    def __init__(self, objects: list[dict[str, Any]]) -> None:
        super().__init__(objects)
        self.scaled: list[tuple[str, int, str]] = []
        self.events: list[dict[str, Any]] = []
        self.applied: list[tuple[dict[str, Any], Mapping[str, Any] | None]] = []
        self.fail_scale: errors.KubeApiError | None = None

    def create(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        self.events.append(dict(obj))
        return dict(obj)

    def apply(self, obj: Mapping[str, Any], *, initial: Mapping[str, Any] | None = None) -> k8s.ApplyResult:
        self.applied.append((copy.deepcopy(dict(obj)), initial))
        key = key_of(obj)
        existed = key in self.objects
        stored = copy.deepcopy(dict(obj))
        if existed and "replicas" not in stored["spec"]:
            stored["spec"]["replicas"] = self.objects[key]["spec"].get("replicas")
            stored["metadata"]["managedFields"] = self.objects[key]["metadata"].get("managedFields")
        if not existed and initial:
            stored["spec"]["replicas"] = initial["spec"]["replicas"]
        self.objects[key] = stored
        return "patched" if existed else "created"

    def apply_replicas(self, ref: k8s.ObjectRef, replicas: int, *, field_manager: str) -> dict[str, Any]:
        if self.fail_scale is not None:
            raise self.fail_scale
        self.scaled.append((ref.name, replicas, field_manager))
        obj = self.objects[(ref.kind, ref.namespace, ref.name)]
        obj["spec"]["replicas"] = replicas
        obj["metadata"]["managedFields"] = [{"manager": field_manager, "operation": "Apply",
                                             "fieldsV1": {"f:spec": {"f:replicas": {}}}}]
        return copy.deepcopy(obj)

    def merge_patch(self, ref: k8s.ObjectRef, patch: Mapping[str, Any], *,
                    subresource: str | None = None) -> dict[str, Any]:
        raise AssertionError("the scaling loop merge-patches nothing")

    def delete(self, ref: k8s.ObjectRef) -> bool:
        raise AssertionError("the scaling loop deletes nothing")


class ScriptedGateway:
    """Answers GET /scale with what the test says (or fails the way it says)."""

    def __init__(self) -> None:
        self.answer: Any = {}
        self.failure: scaler.ScrapeFailed | None = None
        self.asked: list[str] = []

    async def fetch(self, url: str) -> Any:
        self.asked.append(url)
        if self.failure is not None:
            raise self.failure
        return copy.deepcopy(self.answer)


class Clock:
    def __init__(self) -> None:
        self.now_s = 1000.0

    def __call__(self) -> float:
        return self.now_s


def _scale_entry(desired: int, reason: str = "stable", concurrency: float = 1.0) -> dict[str, Any]:
    return {"desired": desired, "current": 1, "concurrency": concurrency, "panicConcurrency": concurrency,
            "panicking": reason == "panic", "reason": reason, "minReplicas": 1, "maxReplicas": 4}


def _loop(api: FakeApi, gateway: ScriptedGateway, *, active: list[bool] | None = None,
          registry: CollectorRegistry | None = None, clock: Clock | None = None) -> scaler.Scaler:
    state = active if active is not None else [True]
    return scaler.Scaler(api, settings=OperatorSettings(), metrics=OperatorMetrics.build(registry or CollectorRegistry()),
                         fetcher=gateway, is_active=lambda: state[0], monotonic=clock or Clock())


def _sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    value = registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def test_the_active_replica_sets_what_the_gateway_decided_under_its_own_field_manager() -> None:
    api = FakeApi([_workflow_body(), *_children(detect=1)])
    gateway = ScriptedGateway()
    gateway.answer = {"decode": _scale_entry(1), "detect": _scale_entry(3, "panic", 5.2)}
    registry = CollectorRegistry()
    loop = _loop(api, gateway, registry=registry)
    report = asyncio.run(loop.round_once())
    assert (report.role, report.asked, report.failed) == ("active", (f"{NS}/w",), ())
    assert gateway.asked == ["http://w-gateway.team-a.svc:8080/scale"]
    assert api.scaled == [("w-detect", 3, "faastube-autoscaler")]  # decode is fixed: never touched
    (event,) = api.events
    assert (event["type"], event["reason"]) == ("Normal", "ScaledUp")
    assert event["message"] == "detect: 1 -> 3 replicas (panic, concurrency 5.20)"
    assert event["involvedObject"]["kind"] == "Workflow" and event["involvedObject"]["uid"] == "uid-w"
    assert _sample(registry, "faastube_operator_scale_actions_total", direction="up", result="applied") == 1
    # The same answer again: the Deployment has it, nothing is written, nothing is told.
    assert asyncio.run(loop.round_once()).actions == ()
    assert len(api.scaled) == 1 and len(api.events) == 1


def test_a_standby_replica_asks_no_gateway_and_writes_nothing() -> None:
    api = FakeApi([_workflow_body(), *_children()])
    gateway = ScriptedGateway()
    gateway.answer = {"detect": _scale_entry(4)}
    active = [False]
    loop = _loop(api, gateway, active=active)
    for _ in range(3):
        assert asyncio.run(loop.round_once()) == scaler.RoundReport("standby")
    assert gateway.asked == [] and api.scaled == [] and api.events == []
    active[0] = True  # the active one went away
    assert [a.replicas for a in asyncio.run(loop.round_once()).actions] == [4]


def test_a_gateway_that_does_not_answer_changes_nothing_and_is_told_once_per_interval() -> None:
    api = FakeApi([_workflow_body(), *_children(detect=3)])
    gateway = ScriptedGateway()
    gateway.failure = scaler.ScrapeFailed("GET http://w-gateway/scale: connection refused", reason="unreachable")
    registry, clock = CollectorRegistry(), Clock()
    loop = _loop(api, gateway, registry=registry, clock=clock)
    for _ in range(5):  # 2 s apart: within the 60 s warning interval
        report = asyncio.run(loop.round_once())
        assert report.failed == (f"{NS}/w",) and report.actions == ()
        clock.now_s += 2
    assert api.scaled == [] and api.objects[("Deployment", NS, "w-detect")]["spec"]["replicas"] == 3
    assert _sample(registry, "faastube_operator_gateway_scrape_failures_total", reason="unreachable") == 5
    (warning,) = api.events
    assert (warning["type"], warning["reason"]) == ("Warning", "GatewayScaleUnavailable")
    assert "replicas kept" in warning["message"] and "connection refused" in warning["message"]
    clock.now_s += 60  # still failing a minute later: told again, with the count
    asyncio.run(loop.round_once())
    assert len(api.events) == 2 and "(5 failures since the last report)" in api.events[1]["message"]
    # An answer that is no /scale document is a failure too (and counted apart).
    gateway.failure, gateway.answer = None, {"detect": {"desired": "many"}}
    asyncio.run(loop.round_once())
    assert _sample(registry, "faastube_operator_gateway_scrape_failures_total", reason="invalid-answer") == 1
    gateway.answer = {"detect": _scale_entry(3)}  # answers again: it has 3 already
    assert asyncio.run(loop.round_once()).failed == () and api.scaled == []


def test_scaling_events_are_rate_limited_and_the_last_change_is_still_told() -> None:
    api = FakeApi([_workflow_body(), *_children(detect=1)])
    gateway = ScriptedGateway()
    clock = Clock()
    loop = _loop(api, gateway, clock=clock)
    for desired in (2, 4, 3):  # 2 s apart, within the 10 s event interval
        gateway.answer = {"detect": _scale_entry(desired)}
        asyncio.run(loop.round_once())
        clock.now_s += 2
    assert [r for _, r, _ in api.scaled] == [2, 4, 3]  # every decision is acted on at once...
    assert [e["message"] for e in api.events] == ["detect: 1 -> 2 replicas (stable, concurrency 1.00)"]
    clock.now_s += 10
    asyncio.run(loop.round_once())  # ...and the held changes are summed up once the interval passed
    assert [(e["reason"], e["message"]) for e in api.events[1:]] == [
        ("ScaledUp", "detect: 2 -> 3 replicas over 2 changes (last: stable, concurrency 1.00)")]
    for _ in range(3):
        clock.now_s += 20
        asyncio.run(loop.round_once())
    assert len(api.events) == 2  # nothing changed: nothing told


def test_a_deployment_deleted_since_it_was_listed_is_skipped_and_counted() -> None:
    api = FakeApi([_workflow_body(), *_children(detect=1)])
    api.fail_scale = errors.KubeApiError("gone", status=404)
    gateway = ScriptedGateway()
    gateway.answer = {"detect": _scale_entry(2)}
    registry = CollectorRegistry()
    assert asyncio.run(_loop(api, gateway, registry=registry).round_once()).actions == ()
    assert _sample(registry, "faastube_operator_scale_actions_total", direction="up", result="failed") == 1
    assert api.events == []


# --- the reconciliation leaves replicas to the autoscaler --------------------------------------


def _parsed(scaling: Mapping[str, Any]) -> wf.Workflow:
    body = _workflow_body(scaling=scaling)
    return reconcile.parse(reconcile.WorkflowObject.from_body(body))


def _detect_deployment(workflow: wf.Workflow) -> dict[str, Any]:
    children = manifests.workflow_children(
        workflow, namespace=NS, spec={}, settings=OperatorSettings(),
        placement={"decode": Where("n"), "detect": Where("n", 0)})
    return next(c for c in children if c["metadata"]["name"] == "w-detect")


def test_an_autoscaled_functions_deployment_is_built_without_replicas_and_a_fixed_ones_with() -> None:
    assert "replicas" not in _detect_deployment(_parsed({"minReplicas": 0, "maxReplicas": 3}))["spec"]
    assert _detect_deployment(_parsed({"replicas": 2}))["spec"]["replicas"] == 2


def test_a_new_autoscaled_deployment_starts_at_its_replicas_held_by_the_autoscaler() -> None:
    workflow = _parsed({"minReplicas": 0, "replicas": 2, "maxReplicas": 3})
    api = FakeApi([])
    fn = workflow.function("detect")
    assert reconcile.apply_autoscaled(api, _detect_deployment(workflow), fn) == "created"
    ((config, initial),) = api.applied
    assert "replicas" not in config["spec"] and initial == {"spec": {"replicas": 2}}
    assert api.scaled == [("w-detect", 2, "faastube-autoscaler")]  # the hand-over
    # Reconciled again: applied without replicas, and the autoscaler's count stays.
    api.apply_replicas(k8s.ObjectRef("Deployment", "w-detect", NS), 3, field_manager="faastube-autoscaler")
    api.scaled.clear()
    reconcile.apply_autoscaled(api, _detect_deployment(workflow), fn)
    assert api.scaled == [] and api.objects[("Deployment", NS, "w-detect")]["spec"]["replicas"] == 3
    assert api.applied[-1][1] is None


def test_a_deployment_becoming_autoscaled_is_handed_over_within_its_bounds_before_the_apply() -> None:
    fixed = _detect_deployment(_parsed({"replicas": 5}))
    fixed["metadata"]["managedFields"] = [{"manager": "faastube-operator", "operation": "Apply",
                                           "fieldsV1": {"f:spec": {"f:replicas": {}}}}]
    api = FakeApi([fixed])
    workflow = _parsed({"minReplicas": 1, "maxReplicas": 3})
    assert reconcile.apply_autoscaled(api, _detect_deployment(workflow), workflow.function("detect")) == "patched"
    assert api.scaled == [("w-detect", 3, "faastube-autoscaler")]  # 5 was above the new maximum
    # Held by someone else already (an HPA, kubectl scale): left alone within the bounds.
    api.objects[("Deployment", NS, "w-detect")]["metadata"]["managedFields"] = [
        {"manager": "kube-controller-manager", "operation": "Update", "subresource": "scale",
         "fieldsV1": {"f:spec": {"f:replicas": {}}}}]
    api.scaled.clear()
    reconcile.apply_autoscaled(api, _detect_deployment(workflow), workflow.function("detect"))
    assert api.scaled == []


def test_replicas_owners_reads_managed_fields_but_not_the_status() -> None:
    live = {"metadata": {"managedFields": [
        {"manager": "faastube-operator", "operation": "Apply", "fieldsV1": {"f:spec": {"f:template": {}}}},
        {"manager": "faastube-autoscaler", "operation": "Apply", "fieldsV1": {"f:spec": {"f:replicas": {}}}},
        {"manager": "kube-controller-manager", "operation": "Update", "subresource": "status",
         "fieldsV1": {"f:status": {"f:replicas": {}}}}]}}
    assert k8s.replicas_owners(live) == {"faastube-autoscaler"}
    assert k8s.replicas_config(k8s.ObjectRef("Deployment", "d", "ns"), 0) == {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d", "namespace": "ns"},
        "spec": {"replicas": 0}}


def test_an_autoscaled_function_counts_as_available_with_its_minimum_replicas() -> None:
    def dep(replicas: int, available: int) -> dict[str, Any]:
        return {"metadata": {"name": "w-detect"}, "spec": {"replicas": replicas},
                "status": {"updatedReplicas": replicas, "availableReplicas": available}}

    assert not conditions.deployment_available(dep(3, 1))  # a fixed function wants all three
    assert conditions.deployment_available(dep(3, 1), minimum=1)  # scaling up: still available
    assert not conditions.deployment_available(dep(3, 0), minimum=1)
    assert conditions.deployment_available(dep(0, 0), minimum=0)  # scaled to zero
    assert conditions.deployment_available(dep(1, 0), minimum=0)  # ...and starting from zero
    phase, _ = conditions.rollout_phase([dep(3, 1)], expected_names=["w-detect"],
                                        minimum_available={"w-detect": 1})
    assert phase is conditions.Phase.RUNNING


def test_the_documented_keda_scaled_object_reads_the_gauge_the_gateway_exports() -> None:
    import re
    from pathlib import Path

    import yaml
    from faastube_runtime.metrics import GatewayMetrics

    doc = (Path(__file__).resolve().parents[2] / "docs" / "operator.md").read_text()
    (block,) = [b for b in re.findall(r"```yaml\n(.*?)```", doc, flags=re.S) if "ScaledObject" in b]
    scaled = yaml.safe_load(block)
    assert scaled["kind"] == "ScaledObject" and scaled["apiVersion"] == "keda.sh/v1alpha1"
    assert scaled["spec"]["scaleTargetRef"]["name"] == manifests.function_deployment_name("traffic", "detection")
    (trigger,) = scaled["spec"]["triggers"]
    (family,) = GatewayMetrics.create().desired_replicas.describe()
    assert family.name == "faastube_gateway_desired_replicas"
    assert f"{family.name}{{" in trigger["metadata"]["query"]
    assert trigger["metadata"]["threshold"] == "1"  # replicas = the gateway's desired count
