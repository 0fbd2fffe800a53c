"""The operator's control decisions, pure: who acts, when a node is stale, what to apply.

The sweep (``housekeeping``) runs over an in-memory ``KubeApi``; the end-to-end versions
of the same behaviour, with real processes, are in tests/e2e/test_operator_ha.py.
"""

from __future__ import annotations

import argparse
import copy
import datetime
from collections.abc import Mapping
from typing import Any

import pytest

pytest.importorskip("prometheus_client")
from faastube_operator import cli, errors, heartbeats, housekeeping, k8s, leadership
from faastube_operator.metrics import OperatorMetrics
from faastube_operator.settings import NodeHealthSettings, OperatorSettings, PeeringSettings
from memory_kube import MemoryObjects
from prometheus_client import CollectorRegistry

T0 = datetime.datetime(2026, 11, 27, 18, 0, tzinfo=datetime.UTC)


def _peer(priority: int, *, seen_s_ago: float, lifetime_s: int = 60) -> dict[str, Any]:
    return {"priority": priority, "lifetime": lifetime_s,
            "lastseen": (T0 - datetime.timedelta(seconds=seen_s_ago)).isoformat()}


# --- leadership -----------------------------------------------------------------------------


def test_the_replica_with_the_highest_live_priority_is_the_active_one() -> None:
    status = {"me": _peer(50, seen_s_ago=1), "other": _peer(10, seen_s_ago=1)}
    assert leadership.is_active(status, identity="me", priority=50, now=T0)
    assert not leadership.is_active(status, identity="other", priority=10, now=T0)


def test_a_dead_peer_does_not_count_and_a_tie_pauses_both_as_in_kopf() -> None:
    dead = {"old": _peer(99, seen_s_ago=61)}
    assert leadership.is_active(dead, identity="me", priority=1, now=T0)
    tie = {"me": _peer(7, seen_s_ago=0), "twin": _peer(7, seen_s_ago=0)}
    assert not leadership.is_active(tie, identity="me", priority=7, now=T0)
    assert leadership.is_active(None, identity="me", priority=1, now=T0)  # nobody else yet


def test_new_priorities_are_random_and_identities_name_the_process() -> None:
    assert len({leadership.new_priority() for _ in range(20)}) > 1
    assert leadership.new_identity().endswith(f"/{__import__('os').getpid()}")


# --- heartbeats -----------------------------------------------------------------------------


def _gpunode(name: str = "node-a", *, heartbeat: str = "2026-11-27T17:59:00Z",
             ready: tuple[str, str] = ("True", "Heartbeat"), version: str = "7") -> dict[str, Any]:
    return {"metadata": {"name": name, "resourceVersion": version},
            "status": {"lastHeartbeatTime": heartbeat, "conditions": [
                {"type": "Ready", "status": ready[0], "reason": ready[1], "message": "",
                 "lastTransitionTime": "2026-11-27T17:00:00Z"}]}}


def test_a_heartbeat_is_stale_after_it_stops_changing_by_the_operators_own_clock() -> None:
    tracker = heartbeats.HeartbeatTracker()
    # However old the sidecar's timestamp looks (clock skew), the first sight starts the clock.
    assert tracker.observe("a", "2020-01-01T00:00:00Z", now_s=100.0) == 0.0
    assert tracker.observe("a", "2020-01-01T00:00:00Z", now_s=125.0) == 25.0
    assert tracker.observe("a", "2020-01-01T00:00:10Z", now_s=126.0) == 0.0  # it moved
    tracker.forget_others(["b"])
    assert tracker.observe("a", "2020-01-01T00:00:10Z", now_s=200.0) == 0.0  # forgotten


def test_a_stale_node_gets_ready_false_with_its_version_and_only_once() -> None:
    node = _gpunode()
    assert heartbeats.stale_status_patch(node, silent_s=29, stale_after_s=30, heartbeat_s=10,
                                         now=T0) is None
    patch = heartbeats.stale_status_patch(node, silent_s=31, stale_after_s=30, heartbeat_s=10,
                                          now=T0)
    assert patch is not None and patch["metadata"] == {"resourceVersion": "7"}
    (ready,) = patch["status"]["conditions"]
    assert (ready["status"], ready["reason"]) == ("False", "HeartbeatStale")
    assert ready["lastTransitionTime"] == "2026-11-27T18:00:00Z"
    assert "31s" in ready["message"] and "2026-11-27T17:59:00Z" in ready["message"]
    marked = _gpunode(ready=("False", "HeartbeatStale"))
    assert heartbeats.stale_status_patch(marked, silent_s=99, stale_after_s=30, heartbeat_s=10,
                                         now=T0) is None
    # Not ready for another reason (no healthy GPU): the staleness is news, say it.
    sick = _gpunode(ready=("False", "NoHealthyGpus"))
    assert heartbeats.stale_status_patch(sick, silent_s=99, stale_after_s=30, heartbeat_s=10,
                                         now=T0) is not None


# --- apply configurations -------------------------------------------------------------------


def _deployment(**pod: Any) -> dict[str, Any]:
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "d", "namespace": "ns", "labels": {"a": "1"}},
            "spec": {"replicas": 1, "template": {"spec": {
                "containers": [{"name": "c", "image": "i", "volumeMounts": [],
                                "resources": {"limits": {"faastube.io/gpu-1": 1}}}],
                **pod}}}}


def test_the_apply_configuration_states_only_what_we_own_in_the_servers_form() -> None:
    config = k8s.apply_config(_deployment(volumes=[], affinity={"nodeAffinity": None,
                                                                "podAffinity": {"x": 1}}))
    pod = config["spec"]["template"]["spec"]
    assert "volumes" not in pod and "volumeMounts" not in pod["containers"][0]
    assert pod["affinity"] == {"podAffinity": {"x": 1}}
    assert pod["containers"][0]["resources"]["limits"] == {"faastube.io/gpu-1": "1"}
    assert config["spec"]["replicas"] == 1  # only quantities become strings
    digest = config["metadata"]["annotations"][k8s.ANNOTATION_APPLIED]
    assert digest == k8s.config_digest(config) and len(digest) == 16


def test_up_to_date_needs_the_same_digest_and_every_value_still_in_place() -> None:
    config = k8s.apply_config(_deployment())
    live = copy.deepcopy(config)
    live["metadata"].update(uid="u", resourceVersion="3")
    live["status"] = {"replicas": 1}
    live["spec"]["template"]["spec"]["containers"][0]["terminationMessagePath"] = "/dev/x"
    assert k8s.up_to_date(config, live)  # server defaults and status do not count
    scaled = copy.deepcopy(live)
    scaled["spec"]["replicas"] = 4
    assert not k8s.up_to_date(config, scaled)  # someone changed a field of ours
    # The same values, but the last apply set a field this one no longer does: only the
    # digest can tell (the apply would remove it).
    older = k8s.apply_config(_deployment(nodeSelector={"zone": "a"}))
    live_older = copy.deepcopy(older)
    assert k8s.is_subset(config, {**live_older, "metadata": config["metadata"]}) is True
    assert not k8s.up_to_date(config, live_older)


def test_fields_of_the_previous_operator_version_move_to_our_apply_manager_once() -> None:
    update = {"manager": "OpenAPI-Generator", "operation": "Update", "apiVersion": "apps/v1",
              "time": "2026-01-01T00:00:00Z", "fieldsType": "FieldsV1",
              "fieldsV1": {"f:spec": {"f:replicas": {}}}}
    status = {"manager": "kube-controller-manager", "operation": "Update",
              "subresource": "status", "fieldsV1": {"f:status": {"f:replicas": {}}}}
    live = {"apiVersion": "apps/v1", "metadata": {"managedFields": [update, status]}}
    moved = k8s.legacy_ownership(live)
    assert moved is not None
    assert [(e["manager"], e["operation"]) for e in moved] == [
        ("kube-controller-manager", "Update"), ("faastube-operator", "Apply")]
    assert moved[1]["fieldsV1"] == {"f:spec": {"f:replicas": {}}}
    assert k8s.legacy_ownership({"metadata": {"managedFields": moved}}) is None  # done
    assert k8s.legacy_ownership({"metadata": {}}) is None


# --- the sweep ------------------------------------------------------------------------------


class FakeApi(MemoryObjects):
    """An in-memory ``KubeApi``: objects by (kind, namespace, name), writes recorded."""

    def __init__(self, objects: list[dict[str, Any]]) -> None:
        super().__init__(objects)
        self.patches: list[tuple[k8s.ObjectRef, dict[str, Any], str | None]] = []
        self.created: list[dict[str, Any]] = []
        self.conflict_on: set[str] = set()

    def create(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        self.created.append(dict(obj))
        return dict(obj)

    def apply(self, obj: Mapping[str, Any]) -> k8s.ApplyResult:
        raise AssertionError("the sweep applies nothing")

    def merge_patch(self, ref: k8s.ObjectRef, patch: Mapping[str, Any], *,
                    subresource: str | None = None) -> dict[str, Any]:
        if ref.name in self.conflict_on:
            raise errors.KubeConflict("changed", status=409)
        self.patches.append((ref, dict(patch), subresource))
        return {}

    def delete(self, ref: k8s.ObjectRef) -> bool:
        raise AssertionError("the sweep deletes nothing")


class Clocks:
    def __init__(self) -> None:
        self.mono = 1000.0

    def wall(self) -> datetime.datetime:
        return T0 + datetime.timedelta(seconds=self.mono - 1000.0)

    def monotonic(self) -> float:
        return self.mono


def _keeper(api: FakeApi, clocks: Clocks, **settings: Any) -> housekeeping.Housekeeper:
    return housekeeping.Housekeeper(
        api, settings=OperatorSettings(**settings),
        metrics=OperatorMetrics.build(CollectorRegistry()),
        clock=clocks.wall, monotonic=clocks.monotonic)


def _gpu_node(name: str) -> dict[str, Any]:
    return {"kind": "GpuNode", **_gpunode(name)}


def test_the_sweep_marks_a_silent_node_after_the_configured_heartbeats_only() -> None:
    api = FakeApi([_gpu_node("node-a"), _gpu_node("node-b")])
    clocks = Clocks()
    keeper = _keeper(api, clocks, node_health=NodeHealthSettings(heartbeat_s=5,
                                                                 missed_heartbeats=2))
    assert keeper.sweep_once() == housekeeping.SweepReport("active")
    clocks.mono += 6
    api.objects[("GpuNode", None, "node-b")]["status"]["lastHeartbeatTime"] = "2026-11-27T18:00:05Z"
    assert keeper.sweep_once().marked_stale == ()
    clocks.mono += 5  # node-a silent for 11s > 2 x 5s; node-b heard from 5s ago
    api.conflict_on = {"node-a"}  # ...but a heartbeat lands meanwhile: try again next time
    assert keeper.sweep_once().marked_stale == ()
    api.conflict_on = set()
    assert keeper.sweep_once().marked_stale == ("node-a",)
    ref, patch, subresource = api.patches[-1]
    assert (ref.kind, ref.name, subresource) == ("GpuNode", "node-a", "status")
    assert patch["status"]["conditions"][0]["reason"] == "HeartbeatStale"


def test_a_standby_replica_reads_the_peering_object_and_writes_nothing() -> None:
    peering = {"kind": "ClusterKopfPeering", "metadata": {"name": "ft"},
               "status": {"them": _peer(900, seen_s_ago=0), "me": _peer(1, seen_s_ago=0)}}
    api = FakeApi([peering, _gpu_node("node-a")])
    clocks = Clocks()
    keeper = _keeper(api, clocks, peering=PeeringSettings(name="ft", identity="me", priority=1),
                     node_health=NodeHealthSettings(heartbeat_s=1, missed_heartbeats=1))
    for _ in range(3):
        clocks.mono += 10
        assert keeper.sweep_once() == housekeeping.SweepReport("standby")
    assert api.patches == [] and keeper.role == "standby"
    # The active one went away: this one takes over, and judges nodes from now on.
    del api.objects[("ClusterKopfPeering", None, "ft")]["status"]["them"]
    assert keeper.sweep_once().role == "active"
    assert api.patches == []  # a fresh clock: node-a is not judged on the standby's time
    assert ("ClusterKopfPeering", None, "missing") not in api.objects
    gone = _keeper(FakeApi([]), clocks, peering=PeeringSettings(name="ft", identity="me"))
    assert gone.sweep_once().role == "standby"  # no peering object: kopf is paused too


def test_the_sweep_refreshes_ready_conditionally_and_posts_the_event() -> None:
    wf: dict[str, Any] = {"apiVersion": "faastube.io/v1alpha1", "kind": "Workflow",
                          "metadata": {"name": "w", "namespace": "ns", "uid": "u1",
                                       "generation": 1, "resourceVersion": "41"},
                          "spec": {}, "status": {"phase": "Deploying", "observedGeneration": 1,
                                                 "placement": {"f": {"node": "n"}}}}
    deployments = [{"kind": "Deployment", "metadata": {
        "name": name, "namespace": "ns", "labels": {"faastube.io/workflow": "w"}},
        "spec": {"replicas": 1}, "status": {"updatedReplicas": 1, "availableReplicas": 1}}
        for name in ("w-f", "w-gateway")]
    other_ns = copy.deepcopy(wf)
    other_ns["metadata"]["namespace"] = "elsewhere"
    api = FakeApi([wf, other_ns, *deployments])
    report = _keeper(api, Clocks(), namespaces=("ns",)).sweep_once()
    assert report.refreshed == ("ns/w",)  # not the one in a namespace it does not serve
    ref, patch, subresource = api.patches[0]
    assert (ref.name, subresource) == ("w", "status")
    assert patch["metadata"] == {"resourceVersion": "41"}  # lost to a concurrent write: 409
    assert patch["status"]["phase"] == "Running" and "observedGeneration" not in patch["status"]
    (event,) = api.created
    assert (event["kind"], event["reason"], event["type"]) == ("Event", "Ready", "Normal")
    assert event["involvedObject"]["uid"] == "u1" and event["metadata"]["namespace"] == "ns"


# --- the command line -----------------------------------------------------------------------


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_the_command_line_sets_peering_and_node_health() -> None:
    settings = cli.settings_from_args(_args(
        "--peering", "ft", "--peering-priority", "5", "--peering-lifetime-s", "15",
        "--gpunode-heartbeat-s", "2", "--gpunode-missed-heartbeats", "4", "--namespace", "team-*"))
    assert settings.peering == PeeringSettings(name="ft", identity=leadership.new_identity(),
                                               priority=5, lifetime_s=15)
    assert settings.node_health.stale_after_s == 8
    # Heartbeat times have whole seconds: one sent twice a second changes once a second.
    assert NodeHealthSettings(heartbeat_s=0.5, missed_heartbeats=3).stale_after_s == 3
    assert settings.serves("team-a") and not settings.serves("kube-system")
    standalone = cli.settings_from_args(_args())
    assert not standalone.peering.enabled and standalone.serves("anything")
    assert standalone.peering.priority > 0  # random, unless given
    with pytest.raises(ValueError, match="missed_heartbeats"):
        NodeHealthSettings(missed_heartbeats=0)
    with pytest.raises(ValueError, match="lifetime"):
        PeeringSettings(name="ft", lifetime_s=1)
