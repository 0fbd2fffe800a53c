"""Keeps this node's GpuNode resource (cluster-scoped, named after the node) current.

The operator places functions from GpuNode objects: ``spec.topology`` says what GPUs and
links the node has, ``status`` says which GPUs are healthy and how much pool memory is
free, ``status.nics`` which network interfaces it can pass data over and
``status.network`` whether (and where) its sidecar serves reads from other nodes. The
publisher creates the object if missing, corrects ``spec.topology`` if it drifted, and
patches ``status`` every ``interval_s`` (that patch is also the heartbeat).
It deletes nothing on shutdown: a GpuNode whose heartbeat went stale tells the operator
more than a vanished one (it marks it NotReady), and the next sidecar start takes it
over again. The GpuNode is owned by its Node (an owner reference with the Node's uid,
looked up through the API), so when the Node object is deleted the garbage collector
deletes the GpuNode too, even with no sidecar left to do it.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from faastube_spec import api, gpunode, topology

from faastube_sidecar.gpuhealth import GpuHealth

logger = logging.getLogger(__name__)

GROUP, VERSION = api.GROUP, api.VERSION
PLURAL, KIND = api.GPUNODE_PLURAL, api.GPUNODE_KIND


@dataclass(frozen=True)
class GpuPoolStats:
    """One GPU's pool: bytes reserved from the device, bytes handed to objects, and the
    most the pool may ever reserve (None: as much as the device has free)."""

    reserved_bytes: int
    used_bytes: int
    limit_bytes: int | None = None


class PoolStatsSource(Protocol):
    def pool_stats(self) -> Mapping[int, GpuPoolStats]:
        """Stats by GPU index; a GPU without a pool yet may be left out."""
        ...


class HealthView(Protocol):
    def current(self) -> Mapping[str, GpuHealth]: ...


class NodeUids(Protocol):
    def node_uid(self, name: str) -> str | None:
        """The uid of the Node called ``name``; None when there is no such Node."""
        ...


class CoreV1NodeUids:
    """``NodeUids`` through a ``kubernetes.client.CoreV1Api`` (needs ``get`` on nodes)."""

    def __init__(self, core_api: Any, *, timeout_s: float = 10.0) -> None:
        self._core = core_api
        self._timeout_s = timeout_s

    def node_uid(self, name: str) -> str | None:
        try:
            node = self._core.read_node(name, _request_timeout=self._timeout_s)
        except Exception as e:
            if _is_not_found(e):
                return None
            raise
        uid = getattr(getattr(node, "metadata", None), "uid", None)
        return str(uid) if uid else None


def node_owner_reference(name: str, uid: str) -> dict[str, Any]:
    """An owner reference to a Node: the GpuNode is garbage-collected with it. Not a
    controller reference and no blockOwnerDeletion (that needs rights on the Node)."""
    return {"apiVersion": "v1", "kind": "Node", "name": name, "uid": uid}


@dataclass(frozen=True)
class PublisherSettings:
    interval_s: float = 10.0
    request_timeout_s: float = 10.0


def pool_free_bytes(stats: GpuPoolStats, free_memory_bytes: int | None) -> int:
    """What the pool can still hand out: its unused reservation, plus what it may still
    reserve from the device's free memory (up to its limit)."""
    unused = max(0, stats.reserved_bytes - stats.used_bytes)
    growth = free_memory_bytes or 0
    if stats.limit_bytes is not None:
        growth = min(growth, max(0, stats.limit_bytes - stats.reserved_bytes))
    return unused + growth


def _rfc3339(t: datetime.datetime) -> str:
    return t.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def build_status(
    node: topology.NodeTopology,
    health: Mapping[str, GpuHealth],
    pools: Mapping[int, GpuPoolStats],
    *,
    now: datetime.datetime,
    previous_ready: Mapping[str, Any] | None = None,
    nics: tuple[gpunode.Nic, ...] = (),
    network: gpunode.PeerNetwork | None = None,
) -> dict[str, Any]:
    """The GpuNode ``status``. Pure: a function of its inputs."""
    gpus: list[gpunode.GpuReport] = []
    unhealthy: list[str] = []
    free_pool = 0
    for g in node.gpus:
        h = health.get(g.uuid, GpuHealth(g.uuid, False, "no health report"))
        stats = pools.get(g.index, GpuPoolStats(0, 0))
        free_memory = h.free_memory_bytes
        gpus.append(gpunode.GpuReport(
            index=g.index, uuid=g.uuid, healthy=h.healthy, pool_reserved_bytes=stats.reserved_bytes,
            pool_used_bytes=stats.used_bytes, free_memory_bytes=free_memory or 0))
        if h.healthy:
            free_pool += pool_free_bytes(stats, free_memory)
        else:
            unhealthy.append(f"gpu{g.index} ({h.reason or 'unhealthy'})")
    healthy_count = len(node.gpus) - len(unhealthy)
    ready: gpunode.ConditionStatus
    if not node.gpus:
        ready, reason, message = "False", "NoGpus", "the node's topology lists no GPUs"
    elif healthy_count == 0:
        ready, reason, message = "False", "NoHealthyGpus", "unhealthy: " + ", ".join(unhealthy)
    else:
        ready, reason = "True", "Heartbeat"
        message = f"{healthy_count}/{len(node.gpus)} GPUs healthy"
        if unhealthy:
            message += "; unhealthy: " + ", ".join(unhealthy)
    transition = _rfc3339(now)
    if previous_ready is not None and previous_ready.get("status") == ready \
            and previous_ready.get("lastTransitionTime"):
        transition = str(previous_ready["lastTransitionTime"])
    return gpunode.GpuNodeStatus(
        gpus=tuple(gpus), free_pool_bytes=free_pool, last_heartbeat_time=_rfc3339(now),
        ready=gpunode.Condition("Ready", ready, reason, message, transition),
        nics=nics, network=network).to_body()


def replacing_merge_patch(old: Any, new: Any) -> Any:
    """A JSON merge patch turning ``old`` into ``new``: keys that ``new`` lacks are nulled,
    so a field that disappeared from the topology does not linger on the server."""
    if not isinstance(old, Mapping) or not isinstance(new, Mapping):
        return new
    patch = {k: replacing_merge_patch(old.get(k), v) for k, v in new.items()}
    patch.update({k: None for k in old if k not in new})
    return patch


def _is_not_found(e: Exception) -> bool:
    return getattr(e, "status", None) == 404


class NodePublisher:
    """Publishes one node's GpuNode through ``api`` (a ``kubernetes.client.CustomObjectsApi``)."""

    def __init__(
        self,
        api: Any,
        node: topology.NodeTopology,
        *,
        health: HealthView,
        pools: PoolStatsSource,
        nodes: NodeUids | None = None,
        settings: PublisherSettings = PublisherSettings(),
        clock: Callable[[], datetime.datetime] = lambda: datetime.datetime.now(datetime.UTC),
        nics: tuple[gpunode.Nic, ...] = (),
        network: gpunode.PeerNetwork | None = None,
    ) -> None:
        """``nics``: the interfaces found at start (``nics.discover_nics``); ``network``:
        where this sidecar serves cross-node reads, None when it serves none."""
        if settings.interval_s <= 0:
            raise ValueError(f"interval_s must be positive, got {settings.interval_s}")
        self._api = api
        self._node = node
        self._health = health
        self._pools = pools
        self._nodes = nodes
        # True while the Node's uid could not be looked up (and should be, again).
        self._owner_pending = nodes is not None
        self._settings = settings
        self._clock = clock
        self._nics = tuple(nics)
        self._network = network
        self._spec_synced = False
        self._ready: Mapping[str, Any] | None = None
        self._task: asyncio.Task[None] | None = None
        self._published = 0

    @property
    def name(self) -> str:
        return self._node.name

    @property
    def published(self) -> int:
        """Status patches that succeeded."""
        return self._published

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="gpunode-publisher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            try:
                await self.publish_once()
            except Exception as e:  # the API server may be down; the next tick retries
                logger.warning("publishing GpuNode %s failed: %s", self.name, e)
            await asyncio.sleep(self._settings.interval_s)

    async def publish_once(self) -> None:
        """Make sure the object exists with the right spec, then patch its status."""
        if not self._spec_synced or self._owner_pending:
            await self._sync_spec()
        status = build_status(
            self._node, self._health.current(), self._pools.pool_stats(),
            now=self._clock(), previous_ready=self._ready, nics=self._nics, network=self._network,
        )
        # A merge patch keeps what it does not mention: null removes the network block
        # an earlier sidecar (one that served cross-node reads) published.
        patch = {"status": {"network": None, **status}}
        try:
            await self._call(
                self._api.patch_cluster_custom_object_status, GROUP, VERSION, PLURAL, self.name, patch,
            )
        except Exception as e:
            if not _is_not_found(e):
                raise
            # Someone deleted the object under us: recreate it and try once more.
            logger.info("GpuNode %s was deleted; creating it again", self.name)
            self._spec_synced = False
            await self._sync_spec()
            await self._call(
                self._api.patch_cluster_custom_object_status, GROUP, VERSION, PLURAL, self.name, patch,
            )
        self._ready = status["conditions"][0]
        self._published += 1

    async def _owner_reference(self) -> dict[str, Any] | None:
        """The reference to this node's Node, or None when unknown (no Node, lookup failed)."""
        if self._nodes is None:
            return None
        try:
            uid = await asyncio.to_thread(self._nodes.node_uid, self.name)
        except Exception as e:  # RBAC or the API server: keep publishing, look again later
            if not self._owner_pending or self._published == 0:
                logger.warning("cannot look up Node %s for the GpuNode's owner: %s", self.name, e)
            self._owner_pending = True
            return None
        self._owner_pending = False
        if uid is None:
            logger.warning("there is no Node called %s: its GpuNode will not be deleted with it",
                           self.name)
            return None
        return node_owner_reference(self.name, uid)

    async def _sync_spec(self) -> None:
        desired = topology.dump_node(self._node)
        owner = await self._owner_reference()
        try:
            current = await self._call(self._api.get_cluster_custom_object, GROUP, VERSION, PLURAL, self.name)
        except Exception as e:
            if not _is_not_found(e):
                raise
            body = gpunode.new_body(self.name, desired, owner=owner)
            await self._call(self._api.create_cluster_custom_object, GROUP, VERSION, PLURAL, body)
            logger.info("created GpuNode %s with %d GPUs", self.name, len(self._node.gpus))
        else:
            old = (current.get("spec") or {}).get("topology")
            patch: dict[str, Any] = {}
            if old != desired:
                patch["spec"] = {"topology": replacing_merge_patch(old, desired)}
            owners = (current.get("metadata") or {}).get("ownerReferences") or []
            if owner is not None and owner not in owners:
                # Exactly one owner: a reference to a Node of the same name that was deleted
                # and registered again would have the old uid.
                patch["metadata"] = {"ownerReferences": [owner]}
            if patch:
                await self._call(self._api.patch_cluster_custom_object, GROUP, VERSION, PLURAL,
                                 self.name, patch)
                logger.info("updated GpuNode %s: %s", self.name,
                            " and ".join(f for f, k in (("topology", "spec"), ("owner", "metadata"))
                                         if k in patch))
            conditions = (current.get("status") or {}).get("conditions") or []
            self._ready = next((c for c in conditions if c.get("type") == "Ready"), None)
        self._spec_synced = True

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        # The kubernetes client blocks; keep the event loop free for the data path.
        return await asyncio.to_thread(fn, *args, _request_timeout=self._settings.request_timeout_s)
