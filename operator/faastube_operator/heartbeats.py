"""GpuNodes whose sidecar stopped heartbeating: noticed, and marked NotReady.

A sidecar patches its GpuNode's ``status.lastHeartbeatTime`` every few seconds. When
the node dies (or the sidecar does), nothing writes any more, nothing changes, and no
watch event arrives: only a clock can tell. The operator does what the node lifecycle
controller does for Nodes: it notes, on its own monotonic clock, when it last saw each
heartbeat *change*, and calls a node stale once that is ``stale_after_s`` ago. The
sidecar's timestamp is only compared with itself, so clock skew between nodes and
the operator does not matter; a fresh operator (or a new active replica) starts every
node's clock at its first sight, so it waits one full period before it judges.

Marking writes the GpuNode's Ready condition (False, ``HeartbeatStale``). That is a
change like any other to the operator's GpuNode handler, which places the workflows
on that node again; the sidecar's next heartbeat, if it comes back, writes Ready again.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Iterable, Mapping
from typing import Any

from faastube_spec import gpunode as gpunode_doc

from faastube_operator import conditions

STALE_REASON = "HeartbeatStale"


@dataclasses.dataclass(frozen=True)
class Sighting:
    heartbeat: str | None  # status.lastHeartbeatTime as the sidecar wrote it
    changed_at_s: float  # monotonic time when this value was first seen


class HeartbeatTracker:
    """When each GpuNode's heartbeat last changed, by this process's monotonic clock."""

    def __init__(self) -> None:
        self._seen: dict[str, Sighting] = {}

    def observe(self, name: str, heartbeat: str | None, *, now_s: float) -> float:
        """Record the heartbeat seen now; return for how long it has not changed."""
        last = self._seen.get(name)
        if last is None or last.heartbeat != heartbeat:
            last = Sighting(heartbeat, now_s)
            self._seen[name] = last
        return now_s - last.changed_at_s

    def forget_others(self, names: Iterable[str]) -> None:
        """Drop nodes no longer listed (deleted GpuNodes)."""
        keep = set(names)
        for name in [n for n in self._seen if n not in keep]:
            del self._seen[name]


def stale_status_patch(
    gpunode: Mapping[str, Any],
    *,
    silent_s: float,
    stale_after_s: float,
    heartbeat_s: float,
    now: datetime.datetime,
) -> dict[str, Any] | None:
    """The merge patch that marks ``gpunode`` NotReady, or None when there is nothing to do.

    Nothing to do while the heartbeat is fresh, or when the node is already marked
    stale (the message would only say a larger number). The patch carries the
    resourceVersion it was computed from: if a heartbeat lands in between, the API
    server refuses it (409) and the next sweep judges again.
    """
    if silent_s < stale_after_s:
        return None
    ready = gpunode_doc.ready_condition(gpunode)
    if ready is not None and ready.get("status") == "False" and ready.get("reason") == STALE_REASON:
        return None
    last = gpunode_doc.heartbeat_of(gpunode) or "never"
    message = (f"no heartbeat from the node's sidecar for {silent_s:.0f}s (expected every "
               f"{heartbeat_s:g}s; last {last}): the node or its sidecar is gone")
    existing = (gpunode.get("status") or {}).get("conditions")
    updated = conditions.merge_conditions(
        existing, [conditions.Condition("Ready", "False", STALE_REASON, message)],
        now=now, generation=None)
    meta = gpunode.get("metadata") or {}
    patch: dict[str, Any] = {"status": {"conditions": updated}}
    if meta.get("resourceVersion") is not None:
        patch["metadata"] = {"resourceVersion": str(meta["resourceVersion"])}
    return patch
