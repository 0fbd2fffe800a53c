"""The real operator process (``faastube operator``) against the API server emulator.

The emulator (``kube_emulator.py``, on kmock) has no controllers, admission or schema
pruning (see kubernetes-notes.md): the test plays the Deployment controller by patching
Deployment status and the garbage collector by deleting what lost its owner, and checks
schema validation separately (test_crds_schema.py).
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any

import pytest
import yaml

kmock = pytest.importorskip("kmock")
aiohttp = pytest.importorskip("aiohttp")
pytest.importorskip("kopf")

from faastube_operator import printer
from kube_emulator import (
    NS,
    ROOT,
    WF,
    Cluster,
    OperatorProcess,
)
from kube_emulator import condition as _condition
from kube_emulator import gpunode as _gpunode
from kube_emulator import wf_path as _wf_path
from kube_emulator import workflow as _workflow

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
async def cluster(cluster: Cluster) -> AsyncIterator[Cluster]:
    """conftest.py's emulated cluster, with one operator running on it."""
    c = cluster
    operator = await OperatorProcess(c, "operator").start()
    c.proc = operator.proc  # type: ignore[attr-defined]
    c.operator = operator  # type: ignore[attr-defined]
    c.metrics_url = operator.metrics_url  # type: ignore[attr-defined]
    c.liveness_url = operator.health_url  # type: ignore[attr-defined]
    try:
        yield c
    finally:
        await operator.stop()


async def test_operator_places_deploys_replaces_and_cleans_up_a_workflow(cluster: Cluster) -> None:
    c = cluster
    await c.create(f"/apis/{WF}/gpunodes", _gpunode("node-a"))
    await c.create(_wf_path(), _workflow("traffic"))

    async def deploying() -> Any:
        obj = await c.get(_wf_path("traffic"))
        return obj if (obj or {}).get("status", {}).get("phase") == "Deploying" else None

    wf = await c.eventually("the workflow to be placed and deployed", deploying)
    placement = wf["status"]["placement"]
    assert placement["detect"]["node"] == "node-a" and placement["detect"]["gpu"] is not None
    assert placement["decode"] == {"node": "node-a"}  # follows the GPU it feeds
    # No finalizer: deleting the workflow never waits for the operator (see the HA tests).
    assert not wf["metadata"].get("finalizers")
    qualified = re.compile(r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
    for key in wf["metadata"].get("annotations") or {}:
        assert qualified.match(key) and len(key.rpartition("/")[2]) <= 63, key
    assert wf["status"]["observedGeneration"] == 1 and wf["status"]["functionCount"] == 3
    assert _condition(wf, "Progressing")["status"] == "True"

    deployments = {d["metadata"]["name"]: d for d in
                   await c.items(f"/apis/apps/v1/namespaces/{NS}/deployments")}
    assert set(deployments) == {"traffic-decode", "traffic-detect", "traffic-classify",
                                "traffic-gateway"}
    detect = deployments["traffic-detect"]
    gpu = placement["detect"]["gpu"]
    container = detect["spec"]["template"]["spec"]["containers"][0]
    # Quantities, in the API server's string form (the operator applies them so).
    assert container["resources"]["limits"] == {f"faastube.io/gpu-{gpu}": "1", "memory": "8Gi"}
    assert {"name": "FAASTUBE_FUNCTION", "value": "detect"} in container["env"]
    assert detect["metadata"]["ownerReferences"][0]["uid"] == wf["metadata"]["uid"]
    assert await c.get(f"/api/v1/namespaces/{NS}/services/traffic-gateway") is not None
    services = {s["metadata"]["name"]: s for s in await c.items(f"/api/v1/namespaces/{NS}/services")}
    assert services["traffic-detect"]["spec"]["clusterIP"] == "None"  # headless: DNS lists replicas
    assert services["traffic-detect"]["metadata"]["ownerReferences"][0]["uid"] == wf["metadata"]["uid"]

    # The Deployment controller finishes: the timer turns the workflow Ready.
    await c.finish_rollouts()

    async def ready() -> Any:
        obj = await c.get(_wf_path("traffic"))
        return obj if _condition(obj, "Ready").get("status") == "True" else None

    wf = await c.eventually("Ready=True", ready)
    assert wf["status"]["phase"] == "Running"

    # kubectl-style tables from the CRDs' printer columns.
    crds = {p.name: yaml.safe_load(p.read_text()) for p in (ROOT / "crds").glob("*.yaml")}
    print()
    print(printer.table(crds["workflows.faastube.io.yaml"], await c.items(_wf_path())))
    print(printer.table(crds["gpunodes.faastube.io.yaml"], await c.items(f"/apis/{WF}/gpunodes")))


    # A spec change (the API server would bump the generation) re-places and rolls.
    old_hash = detect["spec"]["template"]["metadata"]["annotations"]["faastube.io/spec-hash"]
    new = _workflow("traffic")
    new["spec"]["functions"][1]["replicas"] = 2
    new["spec"]["functions"].pop(2)
    new["spec"]["edges"].pop(1)
    await c.patch(_wf_path("traffic"), {"spec": new["spec"]})

    async def rolled() -> Any:
        dep = await c.get(f"/apis/apps/v1/namespaces/{NS}/deployments/traffic-detect")
        gone = await c.get(f"/apis/apps/v1/namespaces/{NS}/deployments/traffic-classify")
        gone = gone or await c.get(f"/api/v1/namespaces/{NS}/services/traffic-classify")
        obj = await c.get(_wf_path("traffic"))
        return (dep and dep["spec"]["replicas"] == 2 and gone is None
                and obj["status"].get("observedGeneration") == 2 and (dep, obj))

    detect, wf = await c.eventually("the update to roll out", rolled)
    assert detect["spec"]["template"]["metadata"]["annotations"]["faastube.io/spec-hash"] != old_hash
    assert set(wf["status"]["placement"]) == {"decode", "detect"}
    assert wf["status"]["phase"] == "Deploying"

    # The GPU under `detect` turns unhealthy: the workflow is re-placed elsewhere.
    lost = wf["status"]["placement"]["detect"]["gpu"]
    node = _gpunode("node-a", unhealthy=(lost,))
    await c.patch(f"/apis/{WF}/gpunodes/node-a", {"status": node["status"]})

    async def moved() -> Any:
        obj = await c.get(_wf_path("traffic"))
        where = obj["status"]["placement"]["detect"]
        return where.get("gpu") not in (None, lost) and obj

    wf = await c.eventually("re-placement off the unhealthy GPU", moved)
    detect = await c.get(f"/apis/apps/v1/namespaces/{NS}/deployments/traffic-detect")
    limits = detect["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    # Only the new GPU: the old one's limit went with the replaced container list.
    assert limits == {f"faastube.io/gpu-{wf['status']['placement']['detect']['gpu']}": "1", "memory": "8Gi"}

    async with c.session.get(c.metrics_url) as resp:  # type: ignore[attr-defined]
        text = await resp.text()
    assert 'faastube_operator_reconciliations_total{result="success"}' in text
    assert "faastube_operator_placement_cost_seconds_count" in text
    async with c.session.get(c.liveness_url) as resp:  # type: ignore[attr-defined]
        assert resp.status == 200

    # Deletion: the workflow goes at once; its children go with it by their owner references.
    status, _ = await c.request("DELETE", _wf_path("traffic"))
    assert status == 200
    assert await c.get(_wf_path("traffic")) is None
    gone = await c.collect_garbage()
    assert len(gone) == 6  # the detect and decode Deployments and Services, the gateway's two
    assert await c.items(f"/apis/apps/v1/namespaces/{NS}/deployments") == []
    assert await c.items(f"/api/v1/namespaces/{NS}/services") == []
    assert c.proc.returncode is None  # type: ignore[attr-defined]


async def test_operator_marks_an_invalid_workflow_degraded_and_keeps_running(
        cluster: Cluster) -> None:
    c = cluster
    await c.create(f"/apis/{WF}/gpunodes", _gpunode("node-a"))
    bad = _workflow("loop")
    bad["spec"]["edges"].append({"from": "classify", "to": "decode", "size": "1MB"})
    await c.create(_wf_path(), bad)

    async def degraded() -> Any:
        obj = await c.get(_wf_path("loop"))
        return obj if _condition(obj, "Degraded").get("status") == "True" else None

    wf = await c.eventually("Degraded=True on the invalid workflow", degraded)
    cond = _condition(wf, "Degraded")
    assert cond["reason"] == "InvalidSpec"
    assert "decode -> detect -> classify -> decode" in cond["message"]
    assert wf["status"]["phase"] == "Invalid"
    assert _condition(wf, "Ready")["status"] == "False"
    assert await c.items(f"/apis/apps/v1/namespaces/{NS}/deployments") == []

    async def warned() -> Any:
        return [r for r in list(c.emulator)
                if r.method == "POST" and str(r.url.path).endswith("/events")
                and (r.data or {}).get("reason") == "InvalidSpec"
                and (r.data or {}).get("type") == "Warning"]

    await c.eventually("an InvalidSpec event", warned)

    # Not a crash loop: the same operator still serves a valid workflow.
    await c.create(_wf_path(), _workflow("fine"))

    async def placed() -> Any:
        obj = await c.get(_wf_path("fine"))
        return ((obj or {}).get("status") or {}).get("placement")

    await c.eventually("the valid workflow to be placed", placed)
    # Fixing the spec clears Degraded.
    good = _workflow("loop")
    await c.patch(_wf_path("loop"), {"spec": {"edges": good["spec"]["edges"]}})

    async def fixed() -> Any:
        obj = await c.get(_wf_path("loop"))
        return obj if _condition(obj, "Degraded").get("status") == "False" else None

    wf = await c.eventually("Degraded=False after the fix", fixed)
    assert wf["status"]["phase"] == "Deploying"
    assert c.proc.returncode is None  # type: ignore[attr-defined]
