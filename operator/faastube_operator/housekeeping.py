"""The operator's periodic sweep, on the active replica only.

Two things need a clock rather than an event: a Workflow's Ready condition follows its
Deployments' rollout, and a GpuNode whose sidecar died sends no more events at all.
kopf timers would do the first, but a kopf timer puts a finalizer on every object it
runs for, and a finalizer held by an operator that is gone blocks deletion (a
Workflow, its namespace, a GpuNode the garbage collector removes with its Node). So
one sweep does both, every ``status_interval_s``:

1. asks the ClusterKopfPeering whether this replica is the active one (``leadership``),
   and does nothing else on a standby;
2. marks GpuNodes whose heartbeat stopped NotReady (``heartbeats``): the GpuNode
   handler sees the change and places their workflows again;
3. refreshes Deploying/Running Workflows' Ready from their Deployments
   (``reconcile.refresh``), posting a Ready/NotReady event on a transition.

Every write carries the resourceVersion it was computed from, so a sweep racing a
reconciliation or a heartbeat loses (HTTP 409) and the next sweep looks again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import logging
import time
from collections.abc import Callable
from typing import Literal

from faastube_spec import gpunode

from faastube_operator import errors, heartbeats, k8s, leadership, reconcile
from faastube_operator.metrics import OperatorMetrics
from faastube_operator.settings import OperatorSettings

logger = logging.getLogger(__name__)

Role = Literal["active", "standby", "unknown"]


@dataclasses.dataclass(frozen=True)
class SweepReport:
    role: Role
    marked_stale: tuple[str, ...] = ()
    refreshed: tuple[str, ...] = ()


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


class Housekeeper:
    """One sweep at a time (``sweep_once`` is synchronous: it runs in a worker thread)."""

    def __init__(
        self,
        api: k8s.KubeApi,
        *,
        settings: OperatorSettings,
        metrics: OperatorMetrics,
        clock: Callable[[], datetime.datetime] = _utcnow,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._api = api
        self._settings = settings
        self._metrics = metrics
        self._clock = clock
        self._monotonic = monotonic
        self._tracker = heartbeats.HeartbeatTracker()
        self.role: Role = "unknown"

    def is_active(self) -> bool:
        peering = self._settings.peering
        if not peering.enabled or peering.name is None:
            return True
        obj = self._api.get(k8s.ObjectRef(leadership.PEERING_KIND, peering.name))
        if obj is None:
            return False  # kopf, too, stays paused without its peering object
        return leadership.is_active(obj.get("status"), identity=peering.identity,
                                    priority=peering.priority, now=self._clock())

    def sweep_once(self) -> SweepReport:
        if not self.is_active():
            if self.role != "standby":
                logger.info("standing by: another replica is active")
            self.role = "standby"
            # A later turn as the active replica starts every node's clock afresh.
            self._tracker = heartbeats.HeartbeatTracker()
            return SweepReport("standby")
        if self.role != "active":
            logger.info("this replica is the active one")
        self.role = "active"
        marked = self.mark_stale_nodes()
        refreshed = self.refresh_workflows()
        return SweepReport("active", tuple(marked), tuple(refreshed))

    def mark_stale_nodes(self) -> list[str]:
        health = self._settings.node_health
        nodes = self._api.list("GpuNode")
        now_s = self._monotonic()
        names = []
        marked = []
        for node in nodes:
            name = str((node.get("metadata") or {}).get("name", ""))
            names.append(name)
            silent_s = self._tracker.observe(name, gpunode.heartbeat_of(node), now_s=now_s)
            patch = heartbeats.stale_status_patch(
                node, silent_s=silent_s, stale_after_s=health.stale_after_s,
                heartbeat_s=health.heartbeat_s, now=self._clock())
            if patch is None:
                continue
            try:
                self._api.merge_patch(k8s.ObjectRef("GpuNode", name), patch, subresource="status")
            except errors.KubeConflict:
                logger.debug("GpuNode %s changed while being marked stale; next sweep", name)
                continue
            except errors.KubeApiError as e:
                if e.status == 404:
                    continue  # deleted meanwhile
                raise
            self._metrics.stale_gpunodes.inc()
            logger.warning("GpuNode %s marked NotReady: no heartbeat for %.0fs", name, silent_s)
            marked.append(name)
        self._tracker.forget_others(names)
        return marked

    def refresh_workflows(self) -> list[str]:
        refreshed = []
        for body in self._api.list("Workflow"):
            meta = body.get("metadata") or {}
            if meta.get("deletionTimestamp"):
                continue
            obj = reconcile.WorkflowObject.from_body(body)
            if not self._settings.serves(obj.namespace):
                continue
            change = reconcile.refresh(self._api, obj, now=self._clock())
            if change is None:
                continue
            status, event = change
            ref = k8s.ObjectRef("Workflow", obj.name, obj.namespace)
            patch: dict[str, object] = {"status": status}
            if meta.get("resourceVersion") is not None:
                patch["metadata"] = {"resourceVersion": str(meta["resourceVersion"])}
            try:
                self._api.merge_patch(ref, patch, subresource="status")
            except errors.KubeConflict:
                continue  # reconciled or edited meanwhile: judged again next sweep
            except errors.KubeApiError as e:
                if e.status == 404:
                    continue
                raise
            refreshed.append(f"{obj.namespace}/{obj.name}")
            try:
                self._api.create(reconcile.event_object(
                    body, event, now=self._clock(), reporter=self._settings.peering.identity))
            except errors.KubeApiError as e:  # an event is worth a warning, not a failed sweep
                logger.warning("posting the %s event of %s/%s failed: %s",
                               event.reason, obj.namespace, obj.name, e)
        return refreshed

    async def run(self) -> None:
        """Sweep every ``status_interval_s`` until cancelled."""
        interval_s = self._settings.status_interval_s
        while True:
            try:
                await asyncio.to_thread(self.sweep_once)
            except errors.KubeApiError as e:
                logger.warning("sweep failed (next in %.3gs): %s", interval_s, e)
            except Exception:  # a bug in one sweep must not end staleness checks for good
                logger.exception("sweep failed (next in %.3gs)", interval_s)
            await asyncio.sleep(interval_s)
