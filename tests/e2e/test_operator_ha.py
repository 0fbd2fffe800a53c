"""The operator's life in a cluster: replicas, dead nodes, repeated reconciliations, uninstall.

Real processes against the API server emulator (``kube_emulator.py``): operators
(``faastube operator``), and sidecars publishing their GpuNodes, as in a cluster. The
tests play the garbage collector and the namespace controller where Kubernetes would.
What the operator did is read from the outside: the emulator's request log, the objects,
the events posted, the operator's /metrics and /healthz, and its log.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from typing import Any

import pytest

kmock = pytest.importorskip("kmock")
aiohttp = pytest.importorskip("aiohttp")
pytest.importorskip("kopf")

from kube_emulator import (
    NS,
    ROOT,
    WF,
    Cluster,
    OperatorProcess,
    condition,
    gpunode,
    wf_path,
    workflow,
)

pytestmark = pytest.mark.timeout(120)
PEERING = "/apis/kopf.dev/v1/clusterkopfpeerings/faastube"
LIFETIME_S = 5  # a replica that dies silently is replaced this late (kopf touches every 1 s)
ACTIVE, STANDBY = "this replica is the active one", "standing by"


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


async def _reconciliations(c: Cluster, operator: OperatorProcess) -> float:
    """The operator's own count of workflow reconciliations (all results), from /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    async with c.session.get(operator.metrics_url) as resp:
        text = await resp.text()
    return sum(sample.value for family in text_string_to_metric_families(text)
               for sample in family.samples
               if sample.name == "faastube_operator_reconciliations_total")


def _valid_peering(obj: dict[str, Any]) -> None:
    """The peering object as kopf wrote it passes the CRD the chart installs."""
    osv = pytest.importorskip("openapi_schema_validator")
    import yaml

    crd = yaml.safe_load((ROOT / "crds" / "clusterkopfpeerings.kopf.dev.yaml").read_text())
    osv.validate(obj, crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"],
                 cls=osv.OAS30Validator)


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

    async def both_listed() -> Any:  # in the peering object the first one created
        peering = await c.get(PEERING) or {}
        peers = peering.get("status") or {}
        return peering if sorted(p["priority"] for p in peers.values()) == [100, 200] else None

    _valid_peering(await c.eventually("both replicas' keep-alives", both_listed))
    # Both are ready (kopf's /healthz answers: the readiness probe), the standby too, so
    # that a disruption budget counts it; the report says which is which. (kopf runs the
    # probes on the first request and caches the answer for 10 s: this is the first.)
    assert (await _role(c, first), await _role(c, second)) == ("active", "standby")

    await c.create(wf_path(), workflow("traffic"))
    await c.eventually("the workflow to be placed", lambda: _placed(c, "traffic"))
    deployments = f"/apis/apps/v1/namespaces/{NS}/deployments"
    assert len(await c.items(deployments)) == 4
    # A fixed window, the only way to see that something does not happen: a standby
    # that wrongly acted would have reconciled the workflow about when the first did.
    await asyncio.sleep(1.0)
    assert _reconciled(first, "traffic") >= 1 and await _reconciliations(c, first) >= 1
    assert _reconciled(second, "traffic") == 0 and await _reconciliations(c, second) == 0
    assert ACTIVE not in second.log()

    # The active replica dies without a goodbye (node lost): its keep-alive expires and
    # the standby takes over, within the peering lifetime.
    template_before = ((await c.get(f"{deployments}/traffic-detect")) or {})["spec"]["template"]
    died = time.monotonic()
    assert await first.stop(kill=True) == -signal.SIGKILL
    await c.patch(wf_path("traffic"), {"spec": {"slo": "900ms"}})

    async def taken_over() -> Any:
        obj = await c.get(wf_path("traffic"))
        return (obj or {}).get("status", {}).get("observedGeneration") == 2

    await c.eventually("the standby to reconcile the change", taken_over, timeout_s=30)
    # generous: a loaded 2-core CI machine starts and polls slowly; the bound is that it happens
    assert time.monotonic() - died < LIFETIME_S + 20
    assert _reconciled(second, "traffic") >= 1 and await _reconciliations(c, second) >= 1
    assert ACTIVE in second.log()
    dep = await c.get(f"{deployments}/traffic-detect")
    assert dep is not None and dep["spec"]["template"] != template_before  # rolled by the new one

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
    assert time.monotonic() - left < LIFETIME_S + 15  # took 10.8 s once with the machine loaded
    peers = (await c.get(PEERING) or {}).get("status") or {}
    assert [p["priority"] for p in peers.values() if p] == [50]  # the leavers said goodbye


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

    # Sidecars heartbeat every 0.5 s, but their timestamps have whole seconds: the operator
    # counts one a second, so 4 missed make 4 s of silence (a live sidecar, even slowed
    # down by a busy machine, is far from that).
    operator = await OperatorProcess(c, "operator", "--gpunode-heartbeat-s", "0.5",
                                     "--gpunode-missed-heartbeats", "4").start()
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
    assert time.monotonic() - stopped >= 3.0  # not before ~4 heartbeats were missed
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
    await c.eventually("its Placed and Applied events",
                       lambda: _expect_value(_reasons(c) == ["Placed", "Applied"]))
    children = await _children_versions(c)
    assert len(children) == 8

    # Re-placement asked for with nothing changed (what a GpuNode event does): the
    # reconciliation runs again, finds the same placement and sends no child anything.
    mark = _Mark(c)
    await c.patch(wf_path("traffic"), {"metadata": {"annotations": {
        "faastube.io/replace-requested": "test: nothing changed"}}})
    await c.eventually("the second reconciliation",
                       lambda: _expect_value(_reconciled(operator, "traffic") == 2))
    await _expect_silence_then_a_change(c, mark, operator, expected_reconciliations=3,
                                        slo="900ms")
    assert await _children_versions(c) != children  # the sentinel's change did roll them

    # An operator restart resumes every workflow: one more reconciliation, as silent.
    await operator.stop()
    children = await _children_versions(c)
    mark = _Mark(c)
    operator = await OperatorProcess(c, "operator-again", "--gpunode-heartbeat-s", "60").start()
    operators.append(operator)
    await c.eventually("the reconciliation on resume",
                       lambda: _expect_value(_reconciled(operator, "traffic") == 1))
    assert await _children_versions(c) == children
    await _expect_silence_then_a_change(c, mark, operator, expected_reconciliations=2,
                                        slo="950ms")


class _Mark:
    """Where the emulator's request log and the posted events stood at one moment."""

    def __init__(self, c: Cluster) -> None:
        self.writes = len(_operator_writes(c))
        self.events = len(_events(c))


async def _expect_silence_then_a_change(c: Cluster, mark: _Mark, operator: OperatorProcess, *,
                                        expected_reconciliations: int, slo: str) -> None:
    """Nothing was written or posted since ``mark`` by the no-op reconciliation just done.

    Requests are checked at once (the reconciliation logs only after its writes); events
    go out in the background, in order per object, so a real change made now (the
    sentinel) must be the first to post anything: an event of the no-op would come
    before its ``Applied``.
    """
    writes = _operator_writes(c)[mark.writes:]
    # kopf's own bookkeeping on the Workflow (its last-handled annotation) aside, nothing:
    # no apply to a child, no POST, no status patch of ours.
    assert [_describe(r) for r in writes if not _kopf_bookkeeping(r)] == []
    await c.patch(wf_path("traffic"), {"spec": {"slo": slo}})
    await c.eventually("the sentinel change to be reconciled", lambda: _expect_value(
        _reconciled(operator, "traffic") == expected_reconciliations))
    await c.eventually("the sentinel's Applied event",
                       lambda: _expect_value("Applied" in _reasons(c)[mark.events:]))
    assert _reasons(c)[mark.events:] == ["Applied"]  # not Placed: it stayed where it was


def _operator_writes(c: Cluster) -> list[Any]:
    return c.writes(plurals=("deployments", "services", "workflows"), by_the_test=False)


async def _children_versions(c: Cluster) -> dict[str, str]:
    """The resourceVersion of every Deployment and Service, by path."""
    versions = {}
    for path in (f"/apis/apps/v1/namespaces/{NS}/deployments", f"/api/v1/namespaces/{NS}/services"):
        for obj in await c.items(path):
            versions[f"{path}/{obj['metadata']['name']}"] = obj["metadata"]["resourceVersion"]
    return versions


def _describe(request: Any) -> str:
    return f"{request.method} {request.url.path} {request.data or request.text}"


def _kopf_bookkeeping(request: Any) -> bool:
    """A merge patch of the Workflow that touches only kopf's annotations and status.kopf."""
    data = request.data
    if getattr(request.resource, "plural", None) != "workflows" or not isinstance(data, dict):
        return False
    if not str(request.method).upper().endswith("PATCH"):
        return False
    rest = {k: v for k, v in data.items() if k not in ("metadata", "status")}
    annotations = ((data.get("metadata") or {}).get("annotations") or {})
    # (resourceVersion: the emulator writes the new one into the request it stores)
    meta_rest = {k: v for k, v in (data.get("metadata") or {}).items()
                 if k not in ("annotations", "resourceVersion")}
    status_rest = {k: v for k, v in (data.get("status") or {}).items() if k != "kopf"}
    return (not rest and not meta_rest and not status_rest
            and all(k.startswith("kopf.zalando.org/") for k in annotations))


def _reasons(c: Cluster) -> list[str]:
    return [str(e.get("reason")) for e in _events(c)]


def _is_apply(request: Any) -> bool:
    headers = {k.lower(): v for k, v in (request.headers or {}).items()}
    return str(headers.get("content-type", "")).startswith("application/apply-patch+yaml")


def _events(c: Cluster) -> list[dict[str, Any]]:
    return [r.data or json.loads(r.text or "{}") for r in list(c.emulator)
            if str(r.method).upper().endswith("POST") and str(r.url.path).endswith("/events")]


async def test_the_documented_uninstall_order_leaves_nothing_behind(
        cluster: Cluster, operators: list[OperatorProcess]) -> None:
    """docs/operator.md: delete the workflows, helm uninstall, delete the peering, the CRDs."""
    c = cluster
    await c.create(f"/apis/{WF}/gpunodes", gpunode("node-a"))
    operator = await OperatorProcess(c, "operator", "--peering", "faastube",
                                     "--peering-lifetime-s", str(LIFETIME_S)).start()
    operators.append(operator)
    for name in ("traffic", "video"):
        await c.create(wf_path(), workflow(name))
        await c.eventually(f"{name} to be placed", _placed_check(c, name))
    peering = await c.eventually("the operator's keep-alive", _peering_status(c))
    assert len(peering) == 1
    assert c.finalizers() == {}  # the operator holds nothing

    # 1. kubectl delete ftwf --all -A --wait: gone at once, the operator still running.
    for name in ("traffic", "video"):
        status, _ = await c.request("DELETE", wf_path(name))
        assert status == 200
        assert await c.get(wf_path(name)) is None, f"{name} is held in deletion"
    assert len(await c.collect_garbage()) == 16  # their Deployments and Services
    # 2. helm uninstall: the operator exits cleanly and takes its keep-alive with it.
    assert await operator.stop() == 0
    assert await _peering_status(c)() in (None, {})
    assert await c.items(f"/apis/apps/v1/namespaces/{NS}/deployments") == []  # none came back
    assert await c.items(f"/api/v1/namespaces/{NS}/services") == []
    # 3. kubectl delete clusterkopfpeering faastube; 4. kubectl delete -f crds/ (which
    # deletes every GpuNode): nothing waits for a finalizer.
    status, _ = await c.request("DELETE", PEERING)
    assert status == 200 and await c.get(PEERING) is None
    status, _ = await c.request("DELETE", f"/apis/{WF}/gpunodes/node-a")
    assert status == 200 and await c.get(f"/apis/{WF}/gpunodes/node-a") is None
    assert c.finalizers() == {}


def _peering_status(c: Cluster) -> Any:
    async def live_peers() -> Any:
        status = (await c.get(PEERING) or {}).get("status") or {}
        return {k: v for k, v in status.items() if v}

    return live_peers


async def test_workflows_and_namespaces_deleted_after_the_operator_is_gone_do_not_hang(
        cluster: Cluster, operators: list[OperatorProcess]) -> None:
    c = cluster
    await c.create(f"/apis/{WF}/gpunodes", gpunode("node-a"))
    # A workflow as the previous operator version left it: held by its finalizer.
    legacy = workflow("legacy")
    legacy["metadata"]["finalizers"] = ["faastube.io/cleanup"]
    await c.create(wf_path(), legacy)
    operator = await OperatorProcess(c, "operator").start()
    operators.append(operator)
    for name in ("traffic", "video"):
        await c.create(wf_path(), workflow(name))
    for name in ("legacy", "traffic", "video"):
        await c.eventually(f"{name} to be placed", _placed_check(c, name))

    async def released() -> Any:
        obj = await c.get(wf_path("legacy"))
        return not (obj or {}).get("metadata", {}).get("finalizers")

    # The upgraded operator needs no finalizer, so kopf takes the old one off.
    await c.eventually("the old finalizer to be removed", released)
    assert c.finalizers() == {}

    # Out of order: helm uninstall first (the operator goes), then the workflows.
    assert await operator.stop() == 0
    for name in ("legacy", "traffic"):
        status, _ = await c.request("DELETE", wf_path(name))
        assert status == 200
        assert await c.get(wf_path(name)) is None, f"{name} is stuck in deletion"
    # The garbage collector deletes what they owned.
    assert len(await c.collect_garbage()) == 16
    # ... or the whole namespace goes (kubectl delete namespace): nothing in it holds it.
    assert await c.delete_namespace_contents(NS) == []
    assert await c.get(wf_path("video")) is None
    assert await c.items(f"/apis/apps/v1/namespaces/{NS}/deployments") == []
    assert await c.items(f"/api/v1/namespaces/{NS}/services") == []
