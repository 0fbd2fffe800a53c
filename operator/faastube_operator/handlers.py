"""kopf handlers: translate Kubernetes causes into reconciler calls and back.

Every handler has an explicit ``id``: kopf keeps progress in annotations named
after it, and a default id (``register.<locals>.fn``) is not a valid annotation key.

Registered into an explicit ``kopf.OperatorRegistry`` by ``register()`` (nothing
happens at import). Errors are translated here and only here: a bad spec or a
workflow that fits nowhere is written into status and surfaced as an event;
API trouble becomes ``kopf.TemporaryError`` so kopf retries later.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Callable
from typing import Any

import kopf
from faastube_spec import api, gpunode

from faastube_operator import conditions, errors, k8s, reconcile
from faastube_operator.conditions import Phase
from faastube_operator.metrics import OperatorMetrics
from faastube_operator.settings import OperatorSettings

logger = logging.getLogger(__name__)

GROUP, VERSION = api.GROUP, api.VERSION
FINALIZER = "faastube.io/cleanup"
# How often kopf re-checks a timer that was mid-call when its workflow got deleted.
# The finalizer stays until the timer has exited, and kopf's default (60 s) holds a
# deleted workflow that long after a refresh merely overlapped the delete.
TIMER_EXIT_POLLING_S = 0.5


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _post(body: kopf.Body, events: tuple[reconcile.Event, ...]) -> None:
    for event in events:
        kopf.event(body, type=event.type, reason=event.reason, message=event.message)


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
    def startup(memo: kopf.Memo, settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.persistence.finalizer = FINALIZER
        settings.posting.level = logging.INFO
        settings.background.cancellation_polling = TIMER_EXIT_POLLING_S
        memo.api = api_factory()
        memo.nodes = {}  # GpuNode name -> gpunode.NodeState last seen

    @kopf.on.cleanup(id="shutdown", registry=registry)
    def shutdown(memo: kopf.Memo, **_: Any) -> None:
        api = getattr(memo, "api", None)
        if api is not None:
            api.close()

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
        patch.status.update(outcome.status)
        _post(body, outcome.events)
        if outcome.phase is Phase.INVALID:
            # Nothing to retry until the user edits the spec (that is a new cause).
            raise kopf.PermanentError(outcome.message)
        if outcome.phase is Phase.UNSCHEDULABLE:
            raise kopf.TemporaryError(outcome.message, delay=settings.retry_delay_s)
        logger.info("workflow %s/%s reconciled: %s", obj.namespace, obj.name, outcome.message)

    @kopf.on.delete(GROUP, VERSION, api.WORKFLOW_PLURAL, id="cleanup", registry=registry)
    def delete_workflow(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
        obj = reconcile.WorkflowObject.from_body(body)
        try:
            removed = reconcile.cleanup(memo.api, obj)
        except errors.KubeApiError as e:
            raise kopf.TemporaryError(str(e), delay=settings.retry_delay_s) from e
        logger.info("workflow %s/%s deleted with %d children", obj.namespace, obj.name, removed)

    @kopf.timer(GROUP, VERSION, api.WORKFLOW_PLURAL, id="status", interval=settings.status_interval_s,
                initial_delay=settings.status_interval_s, registry=registry)
    def refresh_status(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, **_: Any) -> None:
        obj = reconcile.WorkflowObject.from_body(body)
        if (body.get("metadata") or {}).get("deletionTimestamp"):
            return
        try:
            change = reconcile.refresh(memo.api, obj, now=_now())
        except errors.KubeApiError as e:
            logger.warning("status refresh of %s/%s failed: %s", obj.namespace, obj.name, e)
            return
        if change is not None:
            status, event = change
            patch.status.update(status)
            _post(body, (event,))

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
