"""The real operator process places a workflow across nodes whose sidecars serve
cross-node reads, and keeps it whole where a node does not (API server emulator)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

kmock = pytest.importorskip("kmock")
aiohttp = pytest.importorskip("aiohttp")
pytest.importorskip("kopf")

from faastube_spec import gpunode
from kube_emulator import NS, WF, Cluster, OperatorProcess, emulated_cluster
from kube_emulator import gpunode as _gpunode
from kube_emulator import wf_path as _wf_path
from kube_emulator import workflow as _workflow

pytestmark = pytest.mark.timeout(120)

# Five functions of 20 GiB: one per 24 GB GPU, four GPUs a node (4x-a10).
FIVE = [{"name": f"f{i}", "handler": "functions:f", "image": "example/fn:1", "gpu": {"memory": "20Gi"}}
        for i in range(5)]
CHAIN = [{"from": f"f{i}", "to": f"f{i + 1}", "size": "10MB"} for i in range(4)]


def _serving(name: str) -> dict[str, Any]:
    node = _gpunode(name)
    node["status"]["nics"] = [gpunode.Nic("ib0", 50 * 10**9, "mlx5_0").to_body()]
    node["status"]["network"] = gpunode.PeerNetwork(f"{name}.example", 7400, name).to_body()
    return node


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    async with emulated_cluster(tmp_path) as c:
        operator = await OperatorProcess(c, "operator").start()
        try:
            yield c
        finally:
            await operator.stop()


async def _phase(c: Cluster, name: str, phase: str) -> dict[str, Any]:
    async def reached() -> Any:
        obj = await c.get(_wf_path(name))
        return obj if (obj or {}).get("status", {}).get("phase") == phase else None

    return dict(await c.eventually(f"workflow {name} {phase}", reached))


async def test_the_operator_spreads_a_workflow_over_serving_nodes_and_pins_each_function(
        cluster: Cluster) -> None:
    c = cluster
    await c.create(f"/apis/{WF}/gpunodes", _serving("node-a"))
    await c.create(f"/apis/{WF}/gpunodes", _serving("node-b"))
    await c.create(_wf_path(), _workflow("wide", functions=FIVE, edges=CHAIN))
    wf = await _phase(c, "wide", "Deploying")
    placed = wf["status"]["placement"]
    assert {p["node"] for p in placed.values()} == {"node-a", "node-b"}
    deployments = {d["metadata"]["name"]: d for d in await c.items(f"/apis/apps/v1/namespaces/{NS}/deployments")}
    for fn, where in placed.items():
        affinity = deployments[f"wide-{fn}"]["spec"]["template"]["spec"]["affinity"]
        terms = affinity["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
        assert terms[0]["matchExpressions"][0]["values"] == [where["node"]]


async def test_a_node_without_the_network_block_keeps_the_workflow_unschedulable_until_it_serves(
        cluster: Cluster) -> None:
    c = cluster
    await c.create(f"/apis/{WF}/gpunodes", _serving("node-a"))
    await c.create(f"/apis/{WF}/gpunodes", _gpunode("node-b"))
    await c.create(_wf_path(), _workflow("wide", functions=FIVE, edges=CHAIN))
    wf = await _phase(c, "wide", "Unschedulable")
    assert "only nodes whose sidecars serve reads from other nodes" in str(wf["status"]["conditions"])
    # node-b's sidecar starts serving cross-node reads: the workflow is placed again.
    await c.patch(f"/apis/{WF}/gpunodes/node-b", {"status": {"network": _serving("node-b")["status"]["network"]}})
    wf = await _phase(c, "wide", "Deploying")
    assert {p["node"] for p in wf["status"]["placement"].values()} == {"node-a", "node-b"}
