"""kopf handlers: translate Kubernetes causes into reconciler calls and back.

Every handler has an explicit ``id``: kopf keeps progress in annotations named
after it, and a default id (``register.<locals>.fn``) is not a valid annotation key.

Registered into an explicit ``kopf.OperatorRegistry`` by ``register()`` (nothing
happens at import). Errors are translated here and only here: a bad spec or a
workflow that fits nowhere is written into status and surfaced as an event;
API trouble becomes ``kopf.TemporaryError`` so kopf retries later.

No handler needs a finalizer, so kopf puts none on a Workflow: deleting one (or its
namespace) never waits for the operator, which may be gone (uninstalled, scaled to
zero). Its children go with it through their owner references (the garbage
collector's job). Periodic work runs on the active replica in one sweep
(``housekeeping``) and in the scaling loop (``scaler``) instead of kopf timers, which
would each hold a finalizer.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
from collections.abc import Callable
from typing import Any

import kopf
from faastube_spec import api, gpunode

from faastube_operator import conditions, errors, housekeeping, k8s, leadership, reconcile, scaler
from faastube_operator.conditions import Phase
from faastube_operator.metrics import OperatorMetrics
from faastube_operator.settings import OperatorSettings

logger = logging.getLogger(__name__)

GROUP, VERSION = api.GROUP, api.VERSION
# Earlier versions held every Workflow with this finalizer until a delete handler had
# run. kopf is told its name so that, finding it on a Workflow with no handler needing
# it any more, kopf removes it (on the first event after an upgrade).
FINALIZER = "faastube.io/cleanup"


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _post(body: kopf.Body, events: tuple[reconcile.Event, ...]) -> None:
    for event in events:
        kopf.event(body, type=event.type, reason=event.reason, message=event.message)


def ensure_peering_object(api: k8s.KubeApi, name: str) -> None:
    """kopf waits, paused, for a peering object it never creates: create it if missing."""
    try:
        api.create(leadership.peering_object(name))
        logger.info("created ClusterKopfPeering %s", name)
    except errors.KubeConflict:
        pass  # there already


def register(
    registry: kopf.OperatorRegistry,
    *,
    settings: OperatorSettings,
    metrics: OperatorMetrics,
    api_factory: Callable[[], k8s.KubeClient] = k8s.KubeClient.from_environment,
) -> None:
    """Register every handler of the operator into ``registry``."""

    # An explicit registry gets none of kopf's default login handlers: use the same
    # sources as k8s.KubeClient (service account first, then $KUBECONFIG).
    @kopf.on.login(id="login", registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)

    @kopf.on.startup(id="startup", registry=registry)
    async def startup(memo: kopf.Memo, **kwargs: Any) -> None:
        kopf_settings: kopf.OperatorSettings = kwargs["settings"]
        kopf_settings.persistence.finalizer = FINALIZER
        kopf_settings.posting.level = logging.INFO
        if settings.peering.enabled:
            # One peering object for the whole release, also when serving some namespaces.
            kopf_settings.peering.clusterwide = True
            kopf_settings.peering.lifetime = settings.peering.lifetime_s
        if getattr(memo, "api", None) is None:  # kopf retries a startup handler that failed
            memo.api = api_factory()
        memo.nodes = {}  # GpuNode name -> gpunode.NodeState last seen
        if settings.peering.name is not None:
            await asyncio.to_thread(ensure_peering_object, memo.api, settings.peering.name)
        memo.housekeeper = housekeeping.Housekeeper(memo.api, settings=settings, metrics=metrics)
        memo.sweep = asyncio.create_task(memo.housekeeper.run(), name="faastube-sweep")
        if settings.autoscaling.enabled and getattr(memo, "scaling", None) is None:
            memo.fetcher = await scaler.HttpScaleFetcher(
                timeout_s=settings.autoscaling.timeout_s).__aenter__()
            memo.scaler = scaler.Scaler(memo.api, settings=settings, metrics=metrics,
                                        fetcher=memo.fetcher, is_active=memo.housekeeper.is_active)
            memo.scaling = asyncio.create_task(memo.scaler.run(), name="faastube-scaler")

    @kopf.on.cleanup(id="shutdown", registry=registry)
    async def shutdown(memo: kopf.Memo, **_: Any) -> None:
        for name in ("sweep", "scaling"):
            task = getattr(memo, name, None)
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        fetcher = getattr(memo, "fetcher", None)
        if fetcher is not None:
            await fetcher.__aexit__(None, None, None)
        api = getattr(memo, "api", None)
        if api is not None:
            api.close()

    # Served at the liveness/readiness endpoint (kopf's /healthz), for people looking.
    @kopf.on.probe(id="role", registry=registry)
    def role(memo: kopf.Memo, **_: Any) -> str:
        keeper = getattr(memo, "housekeeper", None)
        return keeper.role if keeper is not None else "unknown"

    @kopf.on.resume(GROUP, VERSION, api.WORKFLOW_PLURAL, id="reconcile", registry=registry)
    @kopf.on.create(GROUP, VERSION, api.WORKFLOW_PLURAL, id="reconcile", registry=registry)
    @kopf.on.update(GROUP, VERSION, api.WORKFLOW_PLURAL, id="reconcile", registry=registry)
    def reconcile_workflow(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo,
                           **_: Any) -> None:
        obj = reconcile.WorkflowObject.from_body(body)
        try:
            outcome = reconcile.reconcile(memo.api, obj, settings=settings, metrics=metrics,
                                          adopt=lambda child: kopf.adopt(child, owner=body),
                                          now=_now())
        except errors.KubeApiError as e:
            metrics.reconciled("error")
            raise kopf.TemporaryError(str(e), delay=settings.retry_delay_s) from e
        metrics.reconciled(outcome.result)
        if not k8s.is_subset(outcome.status, body.get("status") or {}):
            patch.status.update(outcome.status)  # else nothing to write
        _post(body, outcome.events)
        if outcome.phase is Phase.INVALID:
            # Nothing to retry until the user edits the spec (that is a new cause).
            raise kopf.PermanentError(outcome.message)
        if outcome.phase is Phase.UNSCHEDULABLE:
            raise kopf.TemporaryError(outcome.message, delay=settings.retry_delay_s)
        logger.info("workflow %s/%s reconciled: %s", obj.namespace, obj.name, outcome.message)

    @kopf.on.event(GROUP, VERSION, api.GPUNODE_PLURAL, id="gpunode-changes", registry=registry)
    def gpunode_changed(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
        name = str(body.get("metadata", {}).get("name", ""))
        after = None if type == "DELETED" else gpunode.node_state(body)
        before = memo.nodes.get(name)
        if after is None:
            memo.nodes.pop(name, None)
        else:
            memo.nodes[name] = after
        if type is None or before == after:
            return  # the initial listing, or only usage/heartbeat changed
        try:
            workflows = memo.api.list("Workflow")
            refs = reconcile.workflows_to_replace(workflows, before, after)
            stamp = f"{conditions.format_time(_now())} gpunode/{name} {type.lower()}"
            for ref in refs:
                memo.api.merge_patch(ref, {"metadata": {"annotations": {
                    reconcile.ANNOTATION_REPLACE: stamp}}})
                metrics.replacements.inc()
                logger.info("re-placing workflow %s/%s after %s", ref.namespace, ref.name, stamp)
        except errors.KubeApiError as e:
            memo.nodes.pop(name, None)  # forget it so the next event retries the comparison
            raise kopf.TemporaryError(str(e), delay=settings.retry_delay_s) from e
