"""The GpuNode publisher against kmock's Kubernetes emulator over real HTTP."""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import Mapping
from pathlib import Path

import pytest
import yaml
from faastube_sidecar.gpuhealth import FixedHealthSource, GpuHealth, HealthMonitor
from faastube_sidecar.nodepublisher import (
    CoreV1NodeUids,
    GpuPoolStats,
    NodePublisher,
    PublisherSettings,
    build_status,
    pool_free_bytes,
    replacing_merge_patch,
)
from faastube_spec import gpunode, topology
from faastube_spec.gpunode import Nic, PeerNetwork
from kubernetes import client as k8s

GIB = 1 << 30
RESOURCE = "faastube.io/v1alpha1/gpunodes"
CRD = Path(__file__).resolve().parents[2] / "crds" / "gpunodes.faastube.io.yaml"


class Pools:
    """Pool figures as the sidecar's pool would report them (data, not behaviour)."""

    def __init__(self, stats: Mapping[int, GpuPoolStats]) -> None:
        self.stats = dict(stats)

    def pool_stats(self) -> Mapping[int, GpuPoolStats]:
        return dict(self.stats)


class Clock:
    def __init__(self) -> None:
        self.now = datetime.datetime(2026, 11, 27, 18, 0, 0, tzinfo=datetime.UTC)

    def __call__(self) -> datetime.datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += datetime.timedelta(seconds=seconds)


@pytest.fixture
def node() -> topology.NodeTopology:
    n = topology.builtin_node("lent-4xh100")
    return n


@pytest.fixture
def custom_api(kmock):
    kmock.resources[RESOURCE] = kmock.ResourceInfo(
        namespaced=False, kind="GpuNode", singular="gpunode", shortnames={"ftnode"}, subresources={"status"})
    cfg = k8s.Configuration()
    cfg.host = str(kmock.url).rstrip("/")
    api_client = k8s.ApiClient(cfg)
    yield k8s.CustomObjectsApi(api_client)
    api_client.close()


@pytest.fixture
async def health(node):
    source = FixedHealthSource({g.uuid: 70 * GIB for g in node.gpus})
    monitor = HealthMonitor(source, [g.uuid for g in node.gpus], interval_s=5.0)
    await monitor.start()
    yield source, monitor
    await monitor.stop()


def stored(kmock, name: str) -> dict:
    return dict(kmock.objects[RESOURCE, None, name].raw)


def crd_schema() -> dict:
    doc = yaml.safe_load(CRD.read_text())
    return doc["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


async def test_publisher_creates_the_gpunode_with_topology_and_status(kmock, custom_api, node, health):
    _, monitor = health
    pools = Pools({0: GpuPoolStats(8 * GIB, 3 * GIB), 1: GpuPoolStats(4 * GIB, 4 * GIB, limit_bytes=6 * GIB)})
    publisher = NodePublisher(custom_api, node, health=monitor, pools=pools, clock=Clock())
    await publisher.publish_once()

    obj = stored(kmock, node.name)
    assert obj["kind"] == "GpuNode"
    assert obj["spec"]["topology"] == topology.dump_node(node)
    status = obj["status"]
    assert [g["index"] for g in status["gpus"]] == [g.index for g in node.gpus]
    assert status["gpus"][0] == {
        "index": 0, "uuid": node.gpus[0].uuid, "healthy": True,
        "poolReservedBytes": 8 * GIB, "poolUsedBytes": 3 * GIB, "freeMemoryBytes": 70 * GIB}
    # gpu0: 5 unused + 70 growable; gpu1: 0 unused + 2 up to its limit; gpu2, gpu3: 70 each.
    assert status["freePoolBytes"] == (5 + 70) * GIB + 2 * GIB + 2 * 70 * GIB
    assert status["lastHeartbeatTime"] == "2026-11-27T18:00:00Z"
    ready = status["conditions"][0]
    assert (ready["type"], ready["status"], ready["reason"]) == ("Ready", "True", "Heartbeat")


async def test_the_published_object_matches_the_crd_schema(kmock, custom_api, node, health):
    validator = pytest.importorskip("openapi_schema_validator")
    _, monitor = health
    publisher = NodePublisher(custom_api, node, health=monitor, pools=Pools({}), clock=Clock())
    await publisher.publish_once()
    validator.validate(stored(kmock, node.name), crd_schema())


async def test_heartbeats_update_status_and_keep_the_transition_time(kmock, custom_api, node, health):
    source, monitor = health
    clock = Clock()
    publisher = NodePublisher(custom_api, node, health=monitor, pools=Pools({}), clock=clock)
    await publisher.publish_once()

    clock.advance(10)
    await publisher.publish_once()
    status = stored(kmock, node.name)["status"]
    assert status["lastHeartbeatTime"] == "2026-11-27T18:00:10Z"
    assert status["conditions"][0]["lastTransitionTime"] == "2026-11-27T18:00:00Z"

    # One GPU fails: still Ready, the message names it, the flag flips.
    seen = monitor.version
    source.set_health(node.gpus[2].uuid, False, "critical XID 79")
    await asyncio.wait_for(monitor.wait_for_change(seen), 5)
    clock.advance(10)
    await publisher.publish_once()
    status = stored(kmock, node.name)["status"]
    assert status["gpus"][2]["healthy"] is False
    assert "gpu2 (critical XID 79)" in status["conditions"][0]["message"]
    assert status["conditions"][0]["status"] == "True"

    # All fail: not Ready, and the transition time moves.
    for g in node.gpus:
        source.set_health(g.uuid, False, "gone")
    seen = monitor.version
    while not all(not h.healthy for h in monitor.current().values()):
        seen = await asyncio.wait_for(monitor.wait_for_change(seen), 5)
    clock.advance(10)
    await publisher.publish_once()
    ready = stored(kmock, node.name)["status"]["conditions"][0]
    assert (ready["status"], ready["reason"]) == ("False", "NoHealthyGpus")
    assert ready["lastTransitionTime"] == "2026-11-27T18:00:30Z"
    assert stored(kmock, node.name)["status"]["freePoolBytes"] == 0


async def test_an_existing_gpunode_with_a_stale_topology_is_corrected(kmock, custom_api, node, health):
    _, monitor = health
    stale = topology.dump_node(node)
    stale["gpus"][0]["pcie"]["switch"] = "sw-old"
    stale["hostMemoryBytes"] = 1
    kmock.objects[RESOURCE, None, node.name] = {
        "apiVersion": "faastube.io/v1alpha1", "kind": "GpuNode",
        "metadata": {"name": node.name, "uid": "u-1", "resourceVersion": "1"},
        "spec": {"topology": stale},
    }
    publisher = NodePublisher(custom_api, node, health=monitor, pools=Pools({}), clock=Clock())
    await publisher.publish_once()
    published = stored(kmock, node.name)["spec"]["topology"]
    want = topology.dump_node(node)
    assert published["gpus"][0]["pcie"].get("switch") == want["gpus"][0]["pcie"].get("switch")
    assert published.get("hostMemoryBytes") == want.get("hostMemoryBytes")


async def test_a_deleted_gpunode_is_recreated_and_shutdown_deletes_nothing(kmock, custom_api, node, health):
    _, monitor = health
    publisher = NodePublisher(custom_api, node, health=monitor, pools=Pools({}),
                              settings=PublisherSettings(interval_s=0.05), clock=Clock())
    await publisher.publish_once()
    await asyncio.to_thread(custom_api.delete_cluster_custom_object, "faastube.io", "v1alpha1", "gpunodes", node.name)
    await publisher.publish_once()
    assert stored(kmock, node.name)["spec"]["topology"]["name"] == node.name

    await publisher.start()
    before = publisher.published

    async def two_more_heartbeats() -> None:
        while publisher.published < before + 2:  # the background loop keeps heartbeating
            await asyncio.sleep(0.02)

    await asyncio.wait_for(two_more_heartbeats(), 5)
    await publisher.stop()
    assert stored(kmock, node.name)["status"]["conditions"][0]["status"] == "True"


def test_pool_free_bytes_counts_unused_reservation_and_room_to_grow():
    assert pool_free_bytes(GpuPoolStats(10, 4), 100) == 106
    assert pool_free_bytes(GpuPoolStats(10, 4, limit_bytes=12), 100) == 8
    assert pool_free_bytes(GpuPoolStats(10, 12), None) == 0


def test_a_node_without_gpus_is_not_ready(node):
    empty = topology.NodeTopology(name="cpu-only", gpus=())
    status = build_status(empty, {}, {}, now=datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC))
    assert status["conditions"][0]["reason"] == "NoGpus"
    assert status["gpus"] == [] and status["freePoolBytes"] == 0


def test_a_gpu_without_a_health_report_counts_as_unhealthy(node):
    health = {g.uuid: GpuHealth(g.uuid, True, "", 1) for g in node.gpus[1:]}
    status = build_status(node, health, {}, now=datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC))
    assert status["gpus"][0]["healthy"] is False
    assert "gpu0 (no health report)" in status["conditions"][0]["message"]


def test_the_merge_patch_nulls_fields_that_disappeared():
    old = {"a": 1, "b": {"c": 2, "d": 3}, "gone": True}
    new = {"a": 1, "b": {"c": 5}}
    assert replacing_merge_patch(old, new) == {"a": 1, "b": {"c": 5, "d": None}, "gone": None}


NODE_UID = "3f1c2b9e-1d2a-4c5b-8e7f-0a1b2c3d4e5f"


@pytest.fixture
def node_uids(kmock):
    kmock.resources["v1/nodes"] = kmock.ResourceInfo(namespaced=False, kind="Node", singular="node")
    cfg = k8s.Configuration()
    cfg.host = str(kmock.url).rstrip("/")
    api_client = k8s.ApiClient(cfg)
    yield CoreV1NodeUids(k8s.CoreV1Api(api_client))
    api_client.close()


def _add_node(kmock, name: str, uid: str) -> None:
    kmock.objects["v1/nodes", None, name] = {
        "apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "uid": uid}}


async def test_the_gpunode_is_owned_by_its_node_so_it_goes_with_it(
        kmock, custom_api, node_uids, node, health):
    _, monitor = health
    _add_node(kmock, node.name, NODE_UID)
    publisher = NodePublisher(custom_api, node, health=monitor, pools=Pools({}),
                              nodes=node_uids, clock=Clock())
    await publisher.publish_once()
    owners = stored(kmock, node.name)["metadata"]["ownerReferences"]
    assert owners == [{"apiVersion": "v1", "kind": "Node", "name": node.name, "uid": NODE_UID}]


async def test_an_existing_gpunode_gets_its_owner_and_a_new_one_after_the_node_came_back(
        kmock, custom_api, node_uids, node, health):
    _, monitor = health
    kmock.objects[RESOURCE, None, node.name] = {  # published by an earlier sidecar version
        "apiVersion": "faastube.io/v1alpha1", "kind": "GpuNode",
        "metadata": {"name": node.name, "uid": "u-1", "resourceVersion": "1"},
        "spec": {"topology": topology.dump_node(node)},
    }
    _add_node(kmock, node.name, NODE_UID)
    publisher = NodePublisher(custom_api, node, health=monitor, pools=Pools({}),
                              nodes=node_uids, clock=Clock())
    await publisher.publish_once()
    assert stored(kmock, node.name)["metadata"]["ownerReferences"][0]["uid"] == NODE_UID

    # The Node was deleted and registered again: the garbage collector removed the GpuNode
    # (its owner's uid is gone); the publisher recreates it, owned by the new Node.
    _add_node(kmock, node.name, "new-uid")
    await asyncio.to_thread(custom_api.delete_cluster_custom_object, "faastube.io", "v1alpha1",
                            "gpunodes", node.name)
    await publisher.publish_once()
    assert stored(kmock, node.name)["metadata"]["ownerReferences"][0]["uid"] == "new-uid"


class FlakyNodeUids:
    def __init__(self) -> None:
        self.calls = 0

    def node_uid(self, name: str) -> str | None:
        self.calls += 1
        if self.calls == 1:
            raise PermissionError("nodes is forbidden")  # say, RBAC not updated yet
        return NODE_UID


async def test_without_its_node_the_gpunode_is_published_and_the_owner_added_later(
        kmock, custom_api, node_uids, node, health):
    _, monitor = health
    # No Node of that name (a sidecar outside Kubernetes): published all the same.
    publisher = NodePublisher(custom_api, node, health=monitor, pools=Pools({}),
                              nodes=node_uids, clock=Clock())
    await publisher.publish_once()
    assert "ownerReferences" not in stored(kmock, node.name)["metadata"]
    assert stored(kmock, node.name)["status"]["conditions"][0]["status"] == "True"

    # A failed look-up is tried again on the next heartbeat.
    flaky = FlakyNodeUids()
    other = topology.NodeTopology(name="node-x", gpus=node.gpus, links=node.links)
    publisher = NodePublisher(custom_api, other, health=monitor, pools=Pools({}),
                              nodes=flaky, clock=Clock())
    await publisher.publish_once()
    assert "ownerReferences" not in stored(kmock, "node-x")["metadata"]
    await publisher.publish_once()
    await publisher.publish_once()
    assert flaky.calls == 2  # once settled, not looked up again
    assert stored(kmock, "node-x")["metadata"]["ownerReferences"][0]["uid"] == NODE_UID


# --- NICs and the network block ---------------------------------------------------------------

NICS = (Nic("eno1", 3_125_000_000), Nic("ibp24s0", 50_000_000_000, "mlx5_0"))
PEER = PeerNetwork(address="10.1.2.3", peer_port=7400, agent="gpu-node-1")


async def test_the_nics_and_the_network_block_are_published_and_match_the_crd(kmock, custom_api, node, health):
    validator = pytest.importorskip("openapi_schema_validator")
    _, monitor = health
    publisher = NodePublisher(custom_api, node, health=monitor, pools=Pools({}), clock=Clock(),
                              nics=NICS, network=PEER)
    await publisher.publish_once()
    status = stored(kmock, node.name)["status"]
    assert status["nics"] == [{"name": "eno1", "rdma": False, "speedBytesPerSecond": 3_125_000_000},
                              {"name": "ibp24s0", "rdma": True, "speedBytesPerSecond": 50_000_000_000,
                               "rdmaDevice": "mlx5_0"}]
    assert status["network"] == {"address": "10.1.2.3", "peerPort": 7400, "agent": "gpu-node-1",
                                 "nicsPerTransfer": 2}
    validator.validate(stored(kmock, node.name), crd_schema())
    # What the operator reads back is what was published.
    assert gpunode.parse_nics(status["nics"]) == NICS
    assert gpunode.parse_network(status["network"]) == PEER
    assert gpunode.node_state(stored(kmock, node.name)).cross_node


async def test_a_sidecar_that_serves_no_cross_node_reads_removes_an_old_network_block(
        kmock, custom_api, node, health):
    _, monitor = health
    await NodePublisher(custom_api, node, health=monitor, pools=Pools({}), clock=Clock(),
                        network=PEER).publish_once()
    assert "network" in stored(kmock, node.name)["status"]
    # The next sidecar on this node runs without cross-node passing.
    await NodePublisher(custom_api, node, health=monitor, pools=Pools({}), clock=Clock()).publish_once()
    status = stored(kmock, node.name)["status"]
    assert "network" not in status and status["nics"] == []
    assert not gpunode.node_state(stored(kmock, node.name)).cross_node


def test_the_status_without_nics_or_network_says_so_explicitly(node):
    status = build_status(node, {}, {}, now=Clock().now)
    assert status["nics"] == [] and "network" not in status
