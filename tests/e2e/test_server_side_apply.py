"""The operator's writes of children: server-side apply, against the emulator over HTTP.

``k8s.KubeClient.apply`` sends an apply configuration as ``faastube-operator`` (forced)
unless the live object already says it is up to date. These tests use the real client
and the real manifest builders; the emulator (``kube_emulator.py``) implements apply by
field manager, and stores built-in objects without empty lists, as the API server does.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import AsyncIterator
from typing import Any

import pytest

kmock = pytest.importorskip("kmock")
kubernetes = pytest.importorskip("kubernetes")

from faastube_operator import errors, k8s, manifests
from faastube_operator.settings import OperatorSettings
from faastube_spec import workflow as wf
from kube_emulator import NS, Cluster
from kube_emulator import workflow as workflow_body

pytestmark = pytest.mark.timeout(60)
OWNER = {"apiVersion": "faastube.io/v1alpha1", "kind": "Workflow", "name": "traffic",
         "uid": "0b6f8a52-7d1c-4c1e-9f5e-2a4b6c8d0e1f", "controller": True,
         "blockOwnerDeletion": True}
DEPLOYMENTS = f"/apis/apps/v1/namespaces/{NS}/deployments"


@pytest.fixture
async def client(cluster: Cluster) -> AsyncIterator[k8s.KubeClient]:
    config = kubernetes.client.Configuration()
    config.host = cluster.url
    api = k8s.KubeClient(kubernetes.client.ApiClient(config))
    yield api
    api.close()


def _children(placement: dict[str, manifests.Where]) -> list[dict[str, Any]]:
    body = workflow_body("traffic")
    parsed = wf.parse_workflow(body)
    children = manifests.workflow_children(parsed, namespace=NS, spec=body["spec"],
                                           placement=placement, settings=OperatorSettings())
    for child in children:  # what kopf.adopt adds
        child["metadata"]["ownerReferences"] = [dict(OWNER)]
    return children


PINNED = {"decode": manifests.Where("node-a"), "detect": manifests.Where("node-a", 1),
          "classify": manifests.Where("node-a", 2)}


async def _apply_all(client: k8s.KubeClient, objs: list[dict[str, Any]]) -> list[str]:
    return [await asyncio.to_thread(client.apply, obj) for obj in objs]


def _managers(obj: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(e["manager"], e["operation"]): e["fieldsV1"]
            for e in obj["metadata"].get("managedFields") or []}


async def test_a_second_apply_of_unchanged_children_sends_nothing(
        cluster: Cluster, client: k8s.KubeClient) -> None:
    children = _children(PINNED)
    assert await _apply_all(client, children) == ["created"] * len(children)
    detect = await cluster.get(f"{DEPLOYMENTS}/traffic-detect")
    assert detect is not None
    # The review's case: the GPU function's pod spec is built with `volumes: []`, and the
    # API server stores it without the field, so "is every desired field there?" said no
    # on every reconciliation. The apply configuration leaves empty lists out.
    built = next(c for c in children if c["metadata"]["name"] == "traffic-detect")
    assert built["spec"]["template"]["spec"]["volumes"] == []
    assert "volumes" not in detect["spec"]["template"]["spec"]
    assert not k8s.is_subset(built, detect)
    assert _managers(detect).keys() == {("faastube-operator", "Apply")}
    assert detect["metadata"]["annotations"][k8s.ANNOTATION_APPLIED]

    before = len(cluster.writes())
    assert await _apply_all(client, _children(PINNED)) == ["unchanged"] * len(children)
    assert len(cluster.writes()) == before  # not a single PATCH or POST

    # Sent anyway (say, by an older client), an identical apply is a no-op server side.
    config = k8s.apply_config(built)
    status, same = await cluster.request_apply(f"{DEPLOYMENTS}/traffic-detect", config)
    assert status == 200
    assert same["metadata"]["resourceVersion"] == detect["metadata"]["resourceVersion"]


async def test_fields_no_longer_applied_are_removed_and_drift_is_undone(
        cluster: Cluster, client: k8s.KubeClient) -> None:
    await _apply_all(client, _children(PINNED))
    # detect moves off its GPU to "anywhere": its GPU limit, node pin and GPU env go.
    moved = dict(PINNED, detect=manifests.Where(None), classify=manifests.Where(None))
    results = await _apply_all(client, _children(moved))
    assert results.count("patched") >= 2
    detect = await cluster.get(f"{DEPLOYMENTS}/traffic-detect")
    assert detect is not None
    pod = detect["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"] == {"memory": "8Gi"}  # the GPU's limit went
    assert "FAASTUBE_GPU_INDEX" not in {e["name"] for e in container["env"]}
    assert set(pod["affinity"]) == {"podAffinity"}  # the node pin is gone
    assert pod["volumes"][0]["name"] == "faastube-socket"  # CPU functions mount the socket

    # Someone scales it by hand (a merge patch, as `kubectl scale` would): the field is
    # theirs now; the next apply takes it back (forced: the Workflow decides replicas).
    status, _ = await cluster.request("PATCH", f"{DEPLOYMENTS}/traffic-detect?fieldManager=kubectl",
                                      {"spec": {"replicas": 5}})
    assert status == 200
    scaled = await cluster.get(f"{DEPLOYMENTS}/traffic-detect")
    assert scaled is not None
    assert _managers(scaled)[("kubectl", "Update")] == {"f:spec": {"f:replicas": {}}}
    assert await asyncio.to_thread(client.apply, _children(moved)[2]) == "patched"
    restored = await cluster.get(f"{DEPLOYMENTS}/traffic-detect")
    assert restored is not None and restored["spec"]["replicas"] == 1
    assert ("kubectl", "Update") not in _managers(restored)


async def test_fields_other_managers_set_are_kept_and_do_not_cause_writes(
        cluster: Cluster, client: k8s.KubeClient) -> None:
    await _apply_all(client, _children(PINNED))
    note = {"metadata": {"annotations": {"team.example/owner": "vision"}}}
    status, _ = await cluster.request(
        "PATCH", f"/api/v1/namespaces/{NS}/services/traffic-gateway?fieldManager=kubectl", note)
    assert status == 200
    before = len(cluster.writes())
    assert set(await _apply_all(client, _children(PINNED))) == {"unchanged"}
    assert len(cluster.writes()) == before
    moved = dict(PINNED, detect=manifests.Where("node-a", 3))
    await _apply_all(client, _children(moved))
    gateway = await cluster.get(f"/api/v1/namespaces/{NS}/services/traffic-gateway")
    assert gateway is not None
    assert gateway["metadata"]["annotations"]["team.example/owner"] == "vision"


async def test_children_written_by_the_previous_operator_version_are_taken_over(
        cluster: Cluster, client: k8s.KubeClient) -> None:
    # The previous version created children with POST and merge patches, no field
    # manager: the API server names the manager after the client's user agent.
    old = _children(PINNED)[2]
    assert old["metadata"]["name"] == "traffic-detect"
    # (The client's private request method: the public ones all name our manager.)
    created = await asyncio.to_thread(client._request, "POST", DEPLOYMENTS, body=old)
    assert created["metadata"]["name"] == "traffic-detect"
    legacy = await cluster.get(f"{DEPLOYMENTS}/traffic-detect")
    assert legacy is not None
    assert _managers(legacy).keys() == {("OpenAPI-Generator", "Update")}

    unpinned = _children(dict(PINNED, detect=manifests.Where(None)))[2]
    assert await asyncio.to_thread(client.apply, unpinned) == "patched"
    now = await cluster.get(f"{DEPLOYMENTS}/traffic-detect")
    assert now is not None
    assert _managers(now).keys() == {("faastube-operator", "Apply")}
    pod = now["spec"]["template"]["spec"]
    assert set(pod["affinity"]) == {"podAffinity"}  # the old pin did not linger
    assert pod["containers"][0]["resources"]["limits"] == {"memory": "8Gi"}


async def test_the_emulator_refuses_a_conflicting_apply_unless_forced(cluster: Cluster) -> None:
    dep = copy.deepcopy(_children(PINNED)[0])
    path = f"{DEPLOYMENTS}/{dep['metadata']['name']}"
    assert (await cluster.request_apply(path, dep, manager="one"))[0] == 201
    dep["spec"]["replicas"] = 3
    status, body = await cluster.request_apply(path, dep, manager="two", force=False)
    assert status == 409 and "f:replicas" not in body["message"] and "replicas" in body["message"]
    assert (await cluster.request_apply(path, dep, manager="two", force=True))[0] == 200
    stored = await cluster.get(path)
    assert stored is not None and stored["spec"]["replicas"] == 3
    one = _managers(stored)[("one", "Apply")]
    assert "f:replicas" not in one["f:spec"]  # taken by force
    assert "f:replicas" in _managers(stored)[("two", "Apply")]["f:spec"]



# --- replicas of autoscaled functions ----------------------------------------------------------


def _autoscaled_detect(*, slo: str = "800ms", low: int = 1, high: int = 4) -> tuple[dict[str, Any], Any]:
    body = workflow_body("traffic", slo=slo)
    body["spec"]["functions"][1].update({"minReplicas": low, "replicas": 2, "maxReplicas": high})
    parsed = wf.parse_workflow(body)
    children = manifests.workflow_children(parsed, namespace=NS, spec=body["spec"], placement=PINNED,
                                           settings=OperatorSettings())
    detect = next(c for c in children if c["metadata"]["name"] == "traffic-detect")
    detect["metadata"]["ownerReferences"] = [dict(OWNER)]
    return detect, parsed.function("detect")


async def test_an_autoscaled_deployments_replicas_outlive_every_apply_of_the_operator(
        cluster: Cluster, client: k8s.KubeClient) -> None:
    from faastube_operator import reconcile

    path = f"{DEPLOYMENTS}/traffic-detect"
    detect, fn = _autoscaled_detect()
    assert "replicas" not in detect["spec"]
    assert await asyncio.to_thread(reconcile.apply_autoscaled, client, detect, fn) == "created"
    created = await cluster.get(path)
    assert created is not None and created["spec"]["replicas"] == 2  # its starting count
    assert "f:replicas" in _managers(created)[("faastube-autoscaler", "Apply")]["f:spec"]
    before = len(cluster.writes())
    assert await asyncio.to_thread(reconcile.apply_autoscaled, client, detect, fn) == "unchanged"
    assert len(cluster.writes()) == before  # (the starting count is not part of the digest)

    # The scaling loop sets 4; a new spec rolls the pods: the apply leaves 4 alone.
    ref = k8s.ObjectRef("Deployment", "traffic-detect", NS)
    await asyncio.to_thread(client.apply_replicas, ref, 4, field_manager=k8s.AUTOSCALER_FIELD_MANAGER)
    rolled, fn = _autoscaled_detect(slo="900ms")
    assert await asyncio.to_thread(reconcile.apply_autoscaled, client, rolled, fn) == "patched"
    now = await cluster.get(path)
    assert now is not None and now["spec"]["replicas"] == 4
    assert now["spec"]["template"] != created["spec"]["template"]
    assert "f:replicas" not in _managers(now)[("faastube-operator", "Apply")]["f:spec"]

    # The bounds shrink below the count: brought within them by the same manager.
    narrow, fn = _autoscaled_detect(slo="900ms", high=3)
    await asyncio.to_thread(reconcile.apply_autoscaled, client, narrow, fn)
    assert ((await cluster.get(path)) or {})["spec"]["replicas"] == 3

    # A replicas-only apply never creates a Deployment (it has no selector or template).
    with pytest.raises(errors.KubeApiError) as missing:
        await asyncio.to_thread(client.apply_replicas, k8s.ObjectRef("Deployment", "gone", NS), 1,
                                field_manager=k8s.AUTOSCALER_FIELD_MANAGER)
    assert missing.value.status == 422 and await cluster.get(f"{DEPLOYMENTS}/gone") is None


async def test_without_the_hand_over_an_apply_leaving_replicas_out_would_drop_them(
        cluster: Cluster, client: k8s.KubeClient) -> None:
    """Why ``apply_autoscaled`` hands replicas over first (Kubernetes' own warning about
    HPAs): a field that only the applying manager owned, left out, is removed."""
    from faastube_operator import reconcile

    path = f"{DEPLOYMENTS}/traffic-detect"
    fixed = _children(PINNED)[2]
    fixed["spec"]["replicas"] = 5
    await asyncio.to_thread(client.apply, fixed)
    autoscaled, fn = _autoscaled_detect(low=1, high=6)
    naive = copy.deepcopy(autoscaled)
    await asyncio.to_thread(client.apply, naive)  # what a plain apply would do
    assert "replicas" not in ((await cluster.get(path)) or {})["spec"]  # gone: the server's default, 1

    await asyncio.to_thread(client.apply, fixed)  # fixed at 5 again, then made autoscaled properly
    assert await asyncio.to_thread(reconcile.apply_autoscaled, client, autoscaled, fn) == "patched"
    kept = await cluster.get(path)
    assert kept is not None and kept["spec"]["replicas"] == 5
    assert k8s.replicas_owners(kept) == {"faastube-autoscaler"}
