"""The GpuNode document: written by each node's sidecar, read by the operator.

``spec.topology`` is the node's part of a Topology document (``topology.dump_node``);
``status`` is what the sidecar reports every heartbeat. ``GpuNodeStatus`` is the
writer's typed view of ``status``; ``node_state`` is the reader's, tolerant of anything
a hand-edited or older object may hold, since a bad GpuNode must not fail placement
for the whole cluster.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Literal

from faastube_spec import api

ConditionStatus = Literal["True", "False", "Unknown"]
MANAGED_BY_LABEL = {"app.kubernetes.io/managed-by": "faastube-sidecar"}


@dataclasses.dataclass(frozen=True)
class GpuReport:
    """One GPU as the sidecar sees it at a heartbeat."""

    index: int
    uuid: str
    healthy: bool
    pool_reserved_bytes: int
    pool_used_bytes: int
    free_memory_bytes: int

    def to_body(self) -> dict[str, Any]:
        return {"index": self.index, "uuid": self.uuid, "healthy": self.healthy,
                "poolReservedBytes": self.pool_reserved_bytes, "poolUsedBytes": self.pool_used_bytes,
                "freeMemoryBytes": self.free_memory_bytes}


@dataclasses.dataclass(frozen=True)
class Condition:
    type: str
    status: ConditionStatus
    reason: str
    message: str
    last_transition_time: str  # RFC 3339

    def to_body(self) -> dict[str, Any]:
        return {"type": self.type, "status": self.status, "reason": self.reason,
                "message": self.message, "lastTransitionTime": self.last_transition_time}


@dataclasses.dataclass(frozen=True)
class GpuNodeStatus:
    gpus: tuple[GpuReport, ...]
    free_pool_bytes: int
    last_heartbeat_time: str  # RFC 3339; the operator only compares it with itself
    ready: Condition

    def to_body(self) -> dict[str, Any]:
        return {"gpus": [g.to_body() for g in self.gpus], "freePoolBytes": self.free_pool_bytes,
                "lastHeartbeatTime": self.last_heartbeat_time,
                "conditions": [self.ready.to_body()]}


def new_body(name: str, topology_doc: Mapping[str, Any], *,
             owner: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The GpuNode a sidecar creates for its node (status follows with the first heartbeat)."""
    metadata: dict[str, Any] = {"name": name, "labels": dict(MANAGED_BY_LABEL)}
    if owner is not None:
        metadata["ownerReferences"] = [dict(owner)]
    return {"apiVersion": api.API_VERSION, "kind": api.GPUNODE_KIND, "metadata": metadata,
            "spec": {"topology": dict(topology_doc)}}


@dataclasses.dataclass(frozen=True)
class NodeState:
    """What placement and re-placement read from a GpuNode: is it usable, which GPUs."""

    name: str
    ready: bool
    healthy_gpus: frozenset[int]


def ready_condition(body: Mapping[str, Any]) -> Mapping[str, Any] | None:
    for cond in (body.get("status") or {}).get("conditions") or []:
        if isinstance(cond, Mapping) and cond.get("type") == "Ready":
            return cond
    return None


def node_state(body: Mapping[str, Any]) -> NodeState:
    """A GpuNode object as the API server returns it, read leniently: a GPU counts unless
    the status says it is unhealthy, the node unless Ready is False."""
    name = str((body.get("metadata") or {}).get("name", ""))
    spec_gpus = ((body.get("spec") or {}).get("topology") or {}).get("gpus") or []
    status = body.get("status") or {}
    unhealthy = {g.get("index") for g in status.get("gpus") or []
                 if isinstance(g, Mapping) and g.get("healthy") is False}
    indices = frozenset(int(g["index"]) for g in spec_gpus
                        if isinstance(g, Mapping) and isinstance(g.get("index"), int)
                        and g["index"] not in unhealthy)
    ready = ready_condition(body)
    return NodeState(name=name, ready=not (ready is not None and ready.get("status") == "False"),
                     healthy_gpus=indices)


def heartbeat_of(body: Mapping[str, Any]) -> str | None:
    value = (body.get("status") or {}).get("lastHeartbeatTime")
    return str(value) if value is not None else None
