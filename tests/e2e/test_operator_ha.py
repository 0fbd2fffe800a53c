"""The operator's life in a cluster: replicas, dead nodes, repeated reconciliations, uninstall.

Real processes against the API server emulator (``kube_emulator.py``): operators
(``faastube operator``), and sidecars publishing their GpuNodes, as in a cluster. The
test plays the garbage collector (``Cluster.collect_garbage``) where Kubernetes would.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

kmock = pytest.importorskip("kmock")
aiohttp = pytest.importorskip("aiohttp")
pytest.importorskip("kopf")

from kube_emulator import (
    NS,
    WF,
    Cluster,
    OperatorProcess,
    condition,
    emulated_cluster,
    gpunode,
    wf_path,
    workflow,
)

pytestmark = pytest.mark.timeout(120)
PEERING = "/apis/kopf.dev/v1/clusterkopfpeerings/faastube"
LIFETIME_S = 3  # peering keep-alives: a replica that dies silently is replaced this late
ACTIVE, STANDBY = "this replica is the active one", "standing by"


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    async with emulated_cluster(tmp_path) as c:
        yield c


@pytest.fixture
async def operators(cluster: Cluster) -> AsyncIterator[list[OperatorProcess]]:
    started: list[OperatorProcess] = []
    yield started
    for operator in started:
        await operator.stop()


async def _role(c: Cluster, operator: OperatorProcess) -> str | None:
    try:
        async with c.session.get(operator.health_url) as resp:
            if resp.status != 200:
                return None
            return str((await resp.json()).get("role"))
    except aiohttp.ClientError:
        return None


def _reconciled(operator: OperatorProcess, name: str) -> int:
    return operator.log().count(f"workflow {NS}/{name} reconciled")


def _placed_check(c: Cluster, name: str) -> Any:
    return lambda: _placed(c, name)


async def _placed(c: Cluster, name: str) -> Any:
    obj = await c.get(wf_path(name))
    return obj if ((obj or {}).get("status") or {}).get("placement") else None


async def test_two_replicas_peer_one_acts_and_the_other_takes_over(
        cluster: Cluster, operators: list[OperatorProcess]) -> None:
    c = cluster
    await c.create(f"/apis/{WF}/gpunodes", gpunode("node-a"))
    peering = ("--peering", "faastube", "--peering-lifetime-s", str(LIFETIME_S))
    # Started one after the other, as a Deployment's pods usually are. (Started at the
    # same instant, both may act until each has seen the other's first keep-alive: kopf's
    # peering is not a lock. docs/operator.md says why that is harmless here.)
    first = await OperatorProcess(c, "first", *peering, "--peering-priority", "200").start()
    operators.append(first)
    await c.eventually("the first replica to act", lambda: _expect_value(ACTIVE in first.log()))
    second = await OperatorProcess(c, "second", *peering, "--peering-priority", "100").start()
    operators.append(second)
    await c.eventually("the second one to stand by",
                       lambda: _expect_value(STANDBY in second.log()))
    # Both are ready (kopf's /healthz answers), the standby too, so that a disruption
    # budget counts it; the health report says which is which (kopf caches it for 10s).
    probed = (await _role(c, first), await _role(c, second))
    assert probed in (("active", "standby"), ("unknown", "unknown"))

    async def both_listed() -> Any:  # in the peering object the first one created
        peers = (await c.get(PEERING) or {}).get("status") or {}
        return sorted(p["priority"] for p in peers.values()) == [100, 200]

    await c.eventually("both replicas' keep-alives", both_listed)

    await c.create(wf_path(), workflow("traffic"))
    await c.eventually("the workflow to be placed", lambda: _placed(c, "traffic"))
    await asyncio.sleep(1.0)  # time for a standby that wrongly acted to show it
    assert _reconciled(first, "traffic") >= 1
    assert _reconciled(second, "traffic") == 0
    assert ACTIVE not in second.log()

    # The active replica dies without a goodbye (node lost): its keep-alive expires and
    # the standby takes over, within the peering lifetime.
    died = time.monotonic()
    assert await first.stop(kill=True) == -signal.SIGKILL
    await c.patch(wf_path("traffic"), {"spec": {"slo": "900ms"}})

    async def taken_over() -> Any:
        obj = await c.get(wf_path("traffic"))
        return (obj or {}).get("status", {}).get("observedGeneration") == 2

    await c.eventually("the standby to reconcile the change", taken_over, timeout_s=30)
    assert time.monotonic() - died < LIFETIME_S + 10
    assert _reconciled(second, "traffic") >= 1
    assert ACTIVE in second.log()

    # A third replica joins with a lower priority and stands by; the active one leaves
    # cleanly (rolling update, drain): it says goodbye, and the third takes over at once.
    third = await OperatorProcess(c, "third", *peering, "--peering-priority", "50").start()
    operators.append(third)
    await c.eventually("the newcomer to stand by", lambda: _expect_value(STANDBY in third.log()))
    left = time.monotonic()
    assert await second.stop() == 0
    await c.patch(wf_path("traffic"), {"spec": {"slo": "950ms"}})
    await c.eventually("the third replica to take over",
                       lambda: _expect_value(_reconciled(third, "traffic") >= 1))
    assert time.monotonic() - left < LIFETIME_S + 5


async def _expect_value(value: bool) -> bool:
    return value


async def test_a_node_whose_heartbeat_stops_goes_not_ready_and_its_workflow_moves(
        cluster: Cluster, operators: list[OperatorProcess], make_sidecar: Any) -> None:
    c = cluster
    node_uids = {}
    for name in ("node-a", "node-b"):
        node = await c.create("/api/v1/nodes", {"apiVersion": "v1", "kind": "Node",
                                                "metadata": {"name": name}})
        node_uids[name] = node["metadata"]["uid"]
    sidecars = {name: await asyncio.to_thread(
        make_sidecar, "--publish-node", "--node-name", name, "--kubeconfig", str(c.kubeconfig),
        "--simulated-topology", "4x-a10", "--heartbeat", "500ms") for name in node_uids}

    async def published() -> Any:
        nodes = await c.items(f"/apis/{WF}/gpunodes")
        return nodes if len([n for n in nodes if n.get("status")]) == 2 else None

    nodes = await c.eventually("both sidecars to publish their GpuNodes", published)
    for node in nodes:  # owned by their Node: garbage-collected with it
        (owner,) = node["metadata"]["ownerReferences"]
        assert owner == {"apiVersion": "v1", "kind": "Node", "name": node["metadata"]["name"],
                         "uid": node_uids[node["metadata"]["name"]]}

    operator = await OperatorProcess(c, "operator", "--gpunode-heartbeat-s", "1",
                                     "--gpunode-missed-heartbeats", "3").start()
    operators.append(operator)
    await c.create(wf_path(), workflow("traffic"))
    wf = await c.eventually("the workflow to be placed", lambda: _placed(c, "traffic"))
    home = wf["status"]["placement"]["detect"]["node"]
    other = next(n for n in node_uids if n != home)

    # The sidecar on the workflow's node dies (so does its heartbeat).
    sidecars[home].proc.send_signal(signal.SIGKILL)
    stopped = time.monotonic()

    async def stale() -> Any:
        node = await c.get(f"/apis/{WF}/gpunodes/{home}")
        ready = condition(node, "Ready")
        return ready if ready.get("reason") == "HeartbeatStale" else None

    ready = await c.eventually(f"GpuNode {home} to be marked NotReady", stale, timeout_s=30)
    assert ready["status"] == "False" and "no heartbeat" in ready["message"]
    assert time.monotonic() - stopped >= 2.0  # not before ~3 heartbeats were missed
    other_node = await c.get(f"/apis/{WF}/gpunodes/{other}")
    assert condition(other_node, "Ready")["status"] == "True"  # the live one is left alone

    async def moved() -> Any:
        obj = await c.get(wf_path("traffic")) or {}
        placement = obj["status"]["placement"]
        return obj if {p["node"] for p in placement.values()} == {other} else None

    await c.eventually(f"the workflow to move to {other}", moved)
    dep = await c.get(f"/apis/apps/v1/namespaces/{NS}/deployments/traffic-detect")
    assert dep is not None
    terms = dep["spec"]["template"]["spec"]["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert terms[0]["matchExpressions"][0]["values"] == [other]
    async with c.session.get(operator.metrics_url) as resp:
        assert "faastube_operator_gpunodes_marked_stale_total 1.0" in await resp.text()

    # The node is removed from the cluster: its GpuNode goes with it (owner reference).
    status, _ = await c.request("DELETE", f"/api/v1/nodes/{home}")
    assert status == 200
    assert f"gpunodes/{home}" in await c.collect_garbage()
    assert await c.get(f"/apis/{WF}/gpunodes/{home}") is None
    assert await c.get(f"/apis/{WF}/gpunodes/{other}") is not None


async def test_a_second_reconciliation_of_an_unchanged_workflow_writes_nothing(
        cluster: Cluster, operators: list[OperatorProcess]) -> None:
    c = cluster
    await c.create(f"/apis/{WF}/gpunodes", gpunode("node-a", heartbeat="2026-11-27T18:00:00Z"))
    operator = await OperatorProcess(c, "operator", "--gpunode-heartbeat-s", "60").start()
    operators.append(operator)
    await c.create(wf_path(), workflow("traffic"))
    await c.eventually("the workflow to be placed", lambda: _placed(c, "traffic"))
    await c.eventually("the first reconciliation to finish",
                       lambda: _expect_value(_reconciled(operator, "traffic") == 1))
    applied = [r for r in c.writes() if _is_apply(r)]
    assert len(applied) == 8  # four Deployments and four Services, one apply each
    before_writes, before_events = len(c.writes()), len(_events(c))

    # Re-placement asked for with nothing changed (what a GpuNode event does): the
    # reconciliation runs again, finds the same placement and sends no child anything.
    await c.patch(wf_path("traffic"), {"metadata": {"annotations": {
        "faastube.io/replace-requested": "test: nothing changed"}}})
    await c.eventually("the second reconciliation",
                       lambda: _expect_value(_reconciled(operator, "traffic") == 2))
    # An operator restart resumes every workflow: a third reconciliation.
    await operator.stop()
    operator = await OperatorProcess(c, "operator-again", "--gpunode-heartbeat-s", "60").start()
    operators.append(operator)
    await c.eventually("the reconciliation on resume",
                       lambda: _expect_value(_reconciled(operator, "traffic") == 1))
    await asyncio.sleep(0.5)
    assert c.writes()[before_writes:] == []  # no PATCH (apply or other), POST or DELETE
    assert [e["reason"] for e in _events(c)[before_events:]] == []  # no Applied/Placed events


def _is_apply(request: Any) -> bool:
    headers = {k.lower(): v for k, v in (request.headers or {}).items()}
    return str(headers.get("content-type", "")).startswith("application/apply-patch+yaml")


def _events(c: Cluster) -> list[dict[str, Any]]:
    return [r.data or json.loads(r.text or "{}") for r in list(c.emulator)
            if str(r.method).upper().endswith("POST") and str(r.url.path).endswith("/events")]


async def test_workflows_deleted_after_the_operator_is_gone_do_not_hang(
        cluster: Cluster, operators: list[OperatorProcess]) -> None:
    c = cluster
    await c.create(f"/apis/{WF}/gpunodes", gpunode("node-a"))
    # A workflow as the previous operator version left it: held by its finalizer.
    legacy = workflow("legacy")
    legacy["metadata"]["finalizers"] = ["faastube.io/cleanup"]
    await c.create(wf_path(), legacy)
    operator = await OperatorProcess(c, "operator").start()
    operators.append(operator)
    await c.create(wf_path(), workflow("traffic"))
    for name in ("legacy", "traffic"):
        await c.eventually(f"{name} to be placed", _placed_check(c, name))

    async def released() -> Any:
        obj = await c.get(wf_path("legacy"))
        return not (obj or {}).get("metadata", {}).get("finalizers")

    # The upgraded operator needs no finalizer, so kopf takes the old one off.
    await c.eventually("the old finalizer to be removed", released)

    # Uninstall (helm uninstall: the operator goes first), then the workflows are deleted.
    await operator.stop()
    for name in ("legacy", "traffic"):
        status, _ = await c.request("DELETE", wf_path(name))
        assert status == 200
        assert await c.get(wf_path(name)) is None, f"{name} is stuck in deletion"
    # The garbage collector deletes what they owned.
    gone = await c.collect_garbage()
    assert len(gone) == 16
    assert await c.items(f"/apis/apps/v1/namespaces/{NS}/deployments") == []
    assert await c.items(f"/api/v1/namespaces/{NS}/services") == []
