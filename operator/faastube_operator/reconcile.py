"""Reconciliation of one Workflow: parse, place, write children, compute status.

The handlers module owns everything kopf-specific (adoption, events, error
translation); this module is plain Python over the ``k8s.KubeApi`` seam, so the
decisions read top to bottom: an invalid spec stops at parsing, an impossible
placement stops before touching children, otherwise every child is
server-side applied and stale ones are deleted. Deleting a Workflow needs nothing
from here: its children carry owner references and the garbage collector removes them.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import faastube_placement as placement
from faastube_placement import Where
from faastube_spec import api, gpunode
from faastube_spec import workflow as wf

from faastube_operator import cluster, conditions, k8s, manifests
from faastube_operator.conditions import Phase
from faastube_operator.metrics import OperatorMetrics
from faastube_operator.settings import OperatorSettings

logger = logging.getLogger(__name__)

ANNOTATION_REPLACE = "faastube.io/replace-requested"
EventType = Literal["Normal", "Warning"]


@dataclasses.dataclass(frozen=True)
class WorkflowObject:
    """The parts of a Workflow custom resource the reconciler reads."""

    name: str
    namespace: str
    generation: int | None
    spec: Mapping[str, Any]
    status: Mapping[str, Any]

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> WorkflowObject:
        meta = body.get("metadata") or {}
        generation = meta.get("generation")
        return cls(name=str(meta.get("name", "")), namespace=str(meta.get("namespace") or "default"),
                   generation=int(generation) if isinstance(generation, int) else None,
                   spec=dict(body.get("spec") or {}), status=dict(body.get("status") or {}))


@dataclasses.dataclass(frozen=True)
class Event:
    type: EventType
    reason: str
    message: str


@dataclasses.dataclass(frozen=True)
class Outcome:
    phase: Phase
    message: str
    status: dict[str, Any]  # merge patch for .status
    result: str  # metrics label
    events: tuple[Event, ...] = ()


def parse(obj: WorkflowObject) -> wf.Workflow:
    """The runtime's own validation, limits and reserved names included (the same as a
    file's); raises ``WorkflowInvalid`` naming every bad field."""
    return wf.parse_workflow({"apiVersion": api.API_VERSION, "kind": api.WORKFLOW_KIND,
                              "metadata": {"name": obj.name, "namespace": obj.namespace},
                              "spec": dict(obj.spec)})


def _status(obj: WorkflowObject, phase: Phase, message: str, *,
            now: datetime.datetime) -> dict[str, Any]:
    return conditions.status_patch(phase, message,
                                   existing_conditions=obj.status.get("conditions"),
                                   now=now, generation=obj.generation)


def _place(workflow: wf.Workflow, api: k8s.KubeApi, *, settings: OperatorSettings,
           metrics: OperatorMetrics) -> tuple[dict[str, Where], float]:
    """Assignments for every function and the placement's cost in seconds.

    Raises ``PlacementError`` (an InvalidRequest) when nothing fits.
    """
    usable = cluster.usable_cluster(
        api.list("GpuNode"),
        default_network_bandwidth_bytes_per_s=settings.default_network_bandwidth_bytes_per_s)
    if usable is None:
        gpu_functions = [fn.name for fn in workflow.functions if fn.gpu]
        if gpu_functions:
            raise placement.PlacementError(
                f"no ready GpuNode offers a healthy GPU for {', '.join(gpu_functions)}")
        return {fn.name: Where(node=None) for fn in workflow.functions}, 0.0
    usage = usage_by_others(api.list("Workflow"), exclude=(workflow.namespace or "default", workflow.name))
    started = time.perf_counter()
    placed, decided = placement.where_each_runs(workflow, usable.topology, usage=usage,
                                                cross_node=usable.cross_node)
    metrics.placement_duration.observe(time.perf_counter() - started)
    metrics.placement_cost.observe(decided.cost_s)
    return placed, float(decided.cost_s)


def usage_by_others(
    workflows: Sequence[Mapping[str, Any]],
    *,
    exclude: tuple[str | None, str],
) -> dict[tuple[str, int], placement.GpuUsage]:
    """GPU memory and sharing slots that other placed workflows take, per (node, GPU)."""
    totals: dict[tuple[str, int], list[int]] = {}
    for body in workflows:
        obj = WorkflowObject.from_body(body)
        if (obj.namespace, obj.name) == exclude:
            continue
        placed = obj.status.get("placement") or {}
        if not placed:
            continue
        try:
            other = parse(obj)
        except wf.WorkflowInvalid:
            continue  # its children were never (re)built from this spec
        for fn in other.functions:
            where = placed.get(fn.name)
            if not fn.gpu or not isinstance(where, Mapping) or where.get("gpu") is None:
                continue
            key = (str(where.get("node")), int(where["gpu"]))
            memory, slots = totals.setdefault(key, [0, 0])
            # What placement reserved for it: maxReplicas of an autoscaled function.
            totals[key] = [memory + fn.reserved_replicas * fn.gpu_memory_bytes, slots + fn.reserved_replicas]
    return {key: placement.GpuUsage(memory_used_bytes=m, slots_used=s) for key, (m, s) in totals.items()}


def _describe(placed: Mapping[str, Where]) -> str:
    parts = []
    for name, where in placed.items():
        spot = "anywhere" if where.node is None else (
            where.node if where.gpu is None else f"{where.node}/gpu-{where.gpu}")
        parts.append(f"{name}->{spot}")
    return ", ".join(parts)


def reconcile(
    api: k8s.KubeApi,
    obj: WorkflowObject,
    *,
    settings: OperatorSettings,
    metrics: OperatorMetrics,
    adopt: Callable[[dict[str, Any]], None],
    now: datetime.datetime,
) -> Outcome:
    """Bring the children in line with the spec; never raises for a bad spec or no fit."""
    try:
        workflow = parse(obj)
    except wf.WorkflowInvalid as e:
        message = f"invalid spec: {e}"
        return Outcome(Phase.INVALID, message, _status(obj, Phase.INVALID, message, now=now),
                       "invalid", (Event("Warning", "InvalidSpec", message),))
    try:
        placed, cost_s = _place(workflow, api, settings=settings, metrics=metrics)
    except placement.PlacementError as e:
        message = f"cannot place the workflow: {e}"
        status = _status(obj, Phase.UNSCHEDULABLE, message, now=now)
        status["functionCount"] = len(workflow.functions)
        return Outcome(Phase.UNSCHEDULABLE, message, status, "unschedulable",
                       (Event("Warning", "PlacementFailed", message),))

    children = manifests.workflow_children(workflow, namespace=obj.namespace, spec=obj.spec,
                                           placement=placed, settings=settings)
    autoscaled = autoscaled_deployments(workflow)
    changed = []
    for child in children:
        adopt(child)
        fn = autoscaled.get(child["metadata"]["name"]) if child["kind"] == "Deployment" else None
        result = api.apply(child) if fn is None else apply_autoscaled(api, child, fn)
        if result != "unchanged":
            changed.append(f"{child['kind']}/{child['metadata']['name']}")
    removed = delete_stale_children(api, obj, keep={c["metadata"]["name"] for c in children})

    deployments = [c["metadata"]["name"] for c in children if c["kind"] == "Deployment"]
    phase, message = rollout_phase(api, obj, deployments, minimum_available=minimum_available(workflow))
    status = _status(obj, phase, message, now=now)
    old_placement = obj.status.get("placement") or {}
    new_placement: dict[str, Any] = {name: None for name in old_placement if name not in placed}
    # Absent, not null: a null in a merge patch deletes the key.
    new_placement.update({name: {k: v for k, v in (("node", w.node), ("gpu", w.gpu)) if v is not None}
                          for name, w in placed.items()})
    status.update({
        "placement": new_placement,
        "placementCostSeconds": cost_s,
        "functionCount": len(workflow.functions),
        "gateway": f"{manifests.gateway_name(workflow.name)}.{obj.namespace}.svc:"
                   f"{settings.gateway_port}",
    })
    events: list[Event] = []
    if old_placement != {n: p for n, p in new_placement.items() if p is not None}:
        events.append(Event("Normal", "Placed",
                            f"{_describe(placed)} (estimated data passing {cost_s * 1e3:.3f} ms)"))
    if changed or removed:
        events.append(Event("Normal", "Applied",
                            f"{len(changed)} objects created or updated, {removed} removed"))
    return Outcome(phase, message, status, "success", tuple(events))


def autoscaled_deployments(workflow: wf.Workflow) -> dict[str, wf.FunctionSpec]:
    """Deployment name -> function, for the functions whose replicas follow load."""
    return {manifests.function_deployment_name(workflow.name, fn.name): fn
            for fn in workflow.functions if fn.autoscaled}


def minimum_available(workflow: wf.Workflow) -> dict[str, int]:
    """Deployment name -> the replicas that must be available for an autoscaled function to
    count as available: its ``minReplicas`` (a scale-up in progress is not a rollout)."""
    return {name: fn.replica_range[0] for name, fn in autoscaled_deployments(workflow).items()}


def apply_autoscaled(api: k8s.KubeApi, deployment: Mapping[str, Any],
                     fn: wf.FunctionSpec) -> k8s.ApplyResult:
    """Apply an autoscaled function's Deployment, whose replicas are the autoscaler's.

    The configuration carries no ``spec.replicas``. Created, the Deployment starts with
    the function's ``replicas``; the same count is then applied by the autoscaler's
    field manager, which from then on owns the field (Kubernetes' documented hand-over
    of replicas to an autoscaler: had nobody else owned it, an apply leaving it out would
    remove it, and the Deployment would fall back to 1). An existing Deployment whose
    replicas nobody but this operator holds (one that was fixed until now, or written by
    an earlier version) is handed over the same way first, and a count outside the
    bounds (they changed) is brought within them.
    """
    ref = k8s.ref_of(deployment)
    live = api.get(ref)
    if live is None:
        result = api.apply(deployment, initial={"spec": {"replicas": fn.replicas}})
        api.apply_replicas(ref, fn.replicas, field_manager=k8s.AUTOSCALER_FIELD_MANAGER)
        return result
    low, high = fn.replica_range
    current = int((live.get("spec") or {}).get("replicas", 1))
    wanted = min(high, max(low, current))
    held = k8s.replicas_owners(live) - {k8s.FIELD_MANAGER} - k8s.LEGACY_MANAGERS
    handed_over = not held or wanted != current
    if handed_over:
        api.apply_replicas(ref, wanted, field_manager=k8s.AUTOSCALER_FIELD_MANAGER)
        logger.info("replicas of %s %s/%s held by %s at %d (bounds %d..%d)", ref.kind,
                    ref.namespace, ref.name, k8s.AUTOSCALER_FIELD_MANAGER, wanted, low, high)
    result = api.apply(deployment)
    return "patched" if handed_over and result == "unchanged" else result


def rollout_phase(api: k8s.KubeApi, obj: WorkflowObject, deployment_names: Sequence[str], *,
                  minimum_available: Mapping[str, int] | None = None) -> tuple[Phase, str]:
    found = api.list("Deployment", namespace=obj.namespace,
                     labels={manifests.LABEL_WORKFLOW: obj.name})
    return conditions.rollout_phase(found, expected_names=deployment_names,
                                    minimum_available=minimum_available)


def expected_deployments(obj: WorkflowObject) -> list[str]:
    """Names of the Deployments a successfully placed workflow owns, from its status."""
    names = [manifests.function_deployment_name(obj.name, fn)
             for fn in (obj.status.get("placement") or {})]
    return names + [manifests.gateway_name(obj.name)]


def refresh(api: k8s.KubeApi, obj: WorkflowObject, *,
            now: datetime.datetime) -> tuple[dict[str, Any], Event] | None:
    """A status patch and event when a deployed workflow became (or stopped being) Ready.

    Only while the status describes the current spec: after a spec change the
    placement (hence the expected Deployments) is stale until the reconcile
    handler has run, and that handler writes the status then.
    """
    current = obj.status.get("phase")
    if current not in (Phase.DEPLOYING.value, Phase.RUNNING.value):
        return None
    observed = obj.status.get("observedGeneration")
    if obj.generation is not None and observed != obj.generation:
        return None
    try:
        minimum = minimum_available(parse(obj))
    except wf.WorkflowInvalid:
        minimum = {}  # (the reconcile handler marks it Invalid) every replica counts
    phase, message = rollout_phase(api, obj, expected_deployments(obj), minimum_available=minimum)
    if phase.value == current:
        return None
    event = (Event("Normal", "Ready", message) if phase is Phase.RUNNING
             else Event("Warning", "NotReady", message))
    status = _status(obj, phase, message, now=now)
    # Only the reconcile handler acts on a generation: a refresh racing with it must
    # never move observedGeneration (back or forth).
    status.pop("observedGeneration", None)
    return status, event


def event_object(involved: Mapping[str, Any], event: Event, *, now: datetime.datetime,
                 reporter: str) -> dict[str, Any]:
    """A core/v1 Event about ``involved``, for writers outside kopf's handlers (kopf's
    ``kopf.event`` only works inside them). Named uniquely, as generateName would."""
    meta = involved.get("metadata") or {}
    stamp = conditions.format_time(now)
    return {
        "apiVersion": "v1", "kind": "Event",
        "metadata": {"name": f"{meta.get('name', 'unknown')}.{uuid.uuid4().hex[:16]}",
                     "namespace": meta.get("namespace") or "default"},
        "involvedObject": {"apiVersion": involved.get("apiVersion"), "kind": involved.get("kind"),
                           "name": meta.get("name"), "namespace": meta.get("namespace"),
                           "uid": meta.get("uid")},
        "type": event.type, "reason": event.reason, "message": event.message[:1024],
        "source": {"component": "faastube-operator"},
        "reportingComponent": "faastube-operator", "reportingInstance": reporter or "",
        "firstTimestamp": stamp, "lastTimestamp": stamp, "count": 1,
    }


def delete_stale_children(api: k8s.KubeApi, obj: WorkflowObject, *, keep: set[str]) -> int:
    removed = 0
    for kind in ("Deployment", "Service"):
        for child in api.list(kind, namespace=obj.namespace,
                              labels={manifests.LABEL_WORKFLOW: obj.name}):
            name = str((child.get("metadata") or {}).get("name"))
            if name not in keep and api.delete(k8s.ObjectRef(kind, name, obj.namespace)):
                logger.info("deleted stale %s %s/%s", kind, obj.namespace, name)
                removed += 1
    return removed


def workflows_to_replace(
    workflows: Sequence[Mapping[str, Any]],
    before: gpunode.NodeState | None,
    after: gpunode.NodeState | None,
) -> list[k8s.ObjectRef]:
    """Workflows a GpuNode change concerns.

    Lost capacity (node gone or not ready, GPU gone or unhealthy) concerns the
    workflows placed there, and a node that stops serving cross-node reads concerns
    the workflows it shares with other nodes; new capacity (a node that starts serving
    them included) concerns only the unschedulable ones.
    """
    known = after or before
    node = known.name if known is not None else ""
    old_gpus = before.healthy_gpus if before and before.ready else frozenset()
    new_gpus = after.healthy_gpus if after and after.ready else frozenset()
    node_lost = before is not None and before.ready and (after is None or not after.ready)
    lost_gpus = old_gpus - new_gpus
    gained = bool(new_gpus - old_gpus) or (after is not None and after.ready
                                          and (before is None or not before.ready))
    cut_off = before is not None and before.cross_node and not (after is not None and after.cross_node)
    gained = gained or (after is not None and after.ready and after.cross_node
                        and not (before is not None and before.cross_node))
    refs = []
    for body in workflows:
        obj = WorkflowObject.from_body(body)
        if (body.get("metadata") or {}).get("deletionTimestamp"):
            continue
        everywhere = [p for p in (obj.status.get("placement") or {}).values() if isinstance(p, Mapping)]
        placed = [p for p in everywhere if p.get("node") == node]
        spans = len({p.get("node") for p in everywhere if p.get("node") is not None}) > 1
        hit = (node_lost and bool(placed) or any(p.get("gpu") in lost_gpus for p in placed)
               or cut_off and bool(placed) and spans)
        if hit or (gained and obj.status.get("phase") == Phase.UNSCHEDULABLE.value):
            refs.append(k8s.ObjectRef("Workflow", obj.name, obj.namespace))
    return refs
