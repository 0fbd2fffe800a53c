"""What the operator's scaling loop decides, kept pure: no clock, no I/O.

Each workflow's gateway already decides how many replicas each of its functions needs
(``faastube_autoscale``, sampled in the gateway, served as ``GET /scale``): it sees every
call, running and waiting, which no metric pipeline sees as early. The operator acts on
those decisions as Knative's autoscaler acts on what its queue proxies report, and adds
only what the gateway cannot know: the Workflow's bounds as they are now (a gateway may
still run an older spec) and the Deployment's replica count as it is now.

- ``plan_round``: which gateways to ask this round, and which Deployments each answer
  concerns (Running or Deploying workflows whose gateway has an available replica and
  that have autoscaled functions; not ones whose annotation hands them to another scaler);
- ``parse_scale_answer``: the ``/scale`` document, validated;
- ``decide``: one function's new replica count, or nothing to do (the gateway has no
  data yet, does not know the function, or wants what there already is);
- ``Throttle``: at most one event or warning per key and interval, holding what comes
  meanwhile for a summary once the interval has passed.

``scaler`` does the asking and the writing.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any, Generic, Literal, TypeVar

from faastube_spec import workflow as wf

from faastube_operator import manifests, reconcile
from faastube_operator.settings import OperatorSettings

# A Workflow with this annotation set to "external" is scaled by someone else (a KEDA
# ScaledObject, an HPA): the scaling loop leaves its Deployments alone.
ANNOTATION_SCALER = "faastube.io/scaler"
EXTERNAL_SCALER = "external"
# The gateway's reason before its first sample: its "desired" is only the starting count.
NO_DATA = "no-data"
# Phases in which a workflow's children exist (a rollout may be under way).
DEPLOYED_PHASES = frozenset({"Running", "Deploying"})

Direction = Literal["up", "down"]
K = TypeVar("K", bound=Hashable)
T = TypeVar("T")


class InvalidScaleAnswer(ValueError):
    """A gateway's ``/scale`` answer is not the document the operator expects."""


@dataclasses.dataclass(frozen=True)
class GatewayDecision:
    """What one gateway's autoscaler decided for one function (one entry of ``/scale``)."""

    function: str
    desired: int
    current: int  # replicas the gateway sends calls to
    reason: str
    concurrency: float
    panicking: bool = False


@dataclasses.dataclass(frozen=True)
class ScaleTarget:
    """One autoscaled function's Deployment, with the Workflow's bounds as they are now."""

    namespace: str
    workflow: str
    function: str
    deployment: str
    min_replicas: int
    max_replicas: int
    replicas: int  # the Deployment's spec.replicas

    def clamp(self, replicas: int) -> int:
        return min(self.max_replicas, max(self.min_replicas, replicas))


@dataclasses.dataclass(frozen=True)
class ScaleAction:
    target: ScaleTarget
    replicas: int
    decision: GatewayDecision

    @property
    def direction(self) -> Direction:
        return "up" if self.replicas > self.target.replicas else "down"

    def describe(self) -> str:
        clamped = "" if self.replicas == self.decision.desired else (
            f", the gateway asked {self.decision.desired}, bounds "
            f"{self.target.min_replicas}..{self.target.max_replicas}")
        return (f"{self.target.function}: {self.target.replicas} -> {self.replicas} replicas "
                f"({self.decision.reason}, concurrency {self.decision.concurrency:.2f}{clamped})")


@dataclasses.dataclass(frozen=True)
class GatewayJob:
    """One gateway to ask this round, and the Deployments its answer concerns."""

    namespace: str
    workflow: str
    url: str  # of GET /scale
    targets: tuple[ScaleTarget, ...]
    body: Mapping[str, Any]  # the Workflow, for events about it


def _int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidScaleAnswer(f"{what}: {value!r} is not a replica count")
    return value


def parse_scale_answer(payload: Any) -> dict[str, GatewayDecision]:
    """The gateway's ``GET /scale`` document: ``{function: {desired, current, reason,
    concurrency, panicking, ...}}``; raises ``InvalidScaleAnswer``."""
    if not isinstance(payload, Mapping):
        raise InvalidScaleAnswer(f"expected an object of functions, got {type(payload).__name__}")
    out = {}
    for function, entry in payload.items():
        if not isinstance(entry, Mapping):
            raise InvalidScaleAnswer(f"{function}: expected an object, got {type(entry).__name__}")
        concurrency = entry.get("concurrency", 0.0)
        if (isinstance(concurrency, bool) or not isinstance(concurrency, int | float)
                or not math.isfinite(concurrency)):
            raise InvalidScaleAnswer(f"{function}.concurrency: {concurrency!r} is not a number")
        reason = entry.get("reason", "")
        if not isinstance(reason, str):
            raise InvalidScaleAnswer(f"{function}.reason: {reason!r} is not a string")
        out[str(function)] = GatewayDecision(
            function=str(function), desired=_int(entry.get("desired"), f"{function}.desired"),
            current=_int(entry.get("current", 0), f"{function}.current"), reason=reason,
            concurrency=float(concurrency), panicking=entry.get("panicking") is True)
    return out


def decide(target: ScaleTarget, decision: GatewayDecision | None) -> ScaleAction | None:
    """The replicas to set for ``target`` from its gateway's decision; None: leave it be.

    Nothing changes when the gateway did not report the function (it runs another spec),
    has no data yet (just started: its ``desired`` is only the starting count, and acting
    on it would undo the scaling a restarted gateway knows nothing of), or wants what the
    Deployment already has once clamped to the Workflow's bounds.
    """
    if decision is None or decision.reason == NO_DATA:
        return None
    replicas = target.clamp(decision.desired)
    if replicas == target.replicas:
        return None
    return ScaleAction(target, replicas, decision)


def gateway_available(deployment: Mapping[str, Any] | None) -> bool:
    """Whether a gateway Deployment has a replica that can answer."""
    status = (deployment or {}).get("status") or {}
    return int(status.get("availableReplicas", 0) or 0) >= 1


def plan_round(workflows: Sequence[Mapping[str, Any]], deployments: Sequence[Mapping[str, Any]], *,
               settings: OperatorSettings) -> list[GatewayJob]:
    """The gateways to ask this round (see the module docstring for which)."""
    by_key = {(str((d.get("metadata") or {}).get("namespace")), str((d.get("metadata") or {}).get("name"))): d
              for d in deployments}
    jobs = []
    for body in workflows:
        meta = body.get("metadata") or {}
        name, namespace = str(meta.get("name", "")), str(meta.get("namespace") or "default")
        if meta.get("deletionTimestamp") or not settings.serves(namespace):
            continue
        if (meta.get("annotations") or {}).get(ANNOTATION_SCALER) == EXTERNAL_SCALER:
            continue
        if ((body.get("status") or {}).get("phase")) not in DEPLOYED_PHASES:
            continue
        try:
            workflow = reconcile.parse(reconcile.WorkflowObject.from_body(body))
        except wf.WorkflowInvalid:
            continue
        targets = []
        for fn in workflow.functions:
            if not fn.autoscaled:
                continue
            deployment_name = manifests.function_deployment_name(name, fn.name)
            deployment = by_key.get((namespace, deployment_name))
            if deployment is None or ((deployment.get("metadata") or {}).get("labels") or {}).get(
                    manifests.LABEL_WORKFLOW) != name:
                continue  # not created yet (or not ours)
            low, high = fn.replica_range
            targets.append(ScaleTarget(
                namespace=namespace, workflow=name, function=fn.name, deployment=deployment_name,
                min_replicas=low, max_replicas=high,
                replicas=int((deployment.get("spec") or {}).get("replicas", 1))))
        gateway = manifests.gateway_name(name)
        if not targets or not gateway_available(by_key.get((namespace, gateway))):
            continue
        url = settings.autoscaling.gateway_url(service=gateway, namespace=namespace,
                                               port=settings.gateway_port, workflow=name)
        jobs.append(GatewayJob(namespace=namespace, workflow=name, url=f"{url}/scale",
                               targets=tuple(targets), body=body))
    return jobs


@dataclasses.dataclass(frozen=True)
class Held(Generic[T]):
    """What one emission stands for: the first and the latest item, and how many there were."""

    first: T
    last: T
    count: int


class Throttle(Generic[K, T]):
    """At most one emission per key every ``interval_s`` (of the caller's clock).

    ``offer`` emits at once when the key's interval has passed, else holds the item;
    ``due`` emits what was held once the interval has passed, so the last change is
    always told (late, and summarised), and nothing is told when nothing happened.
    """

    def __init__(self, interval_s: float) -> None:
        if not interval_s > 0:
            raise ValueError(f"interval_s: must be > 0, got {interval_s}")
        self.interval_s = interval_s
        self._last: dict[K, float] = {}
        self._held: dict[K, Held[T]] = {}

    def offer(self, key: K, item: T, *, now_s: float) -> Held[T] | None:
        held = self._held.pop(key, None)
        batch = Held(item, item, 1) if held is None else Held(held.first, item, held.count + 1)
        last = self._last.get(key)
        if last is None or now_s - last >= self.interval_s:
            self._last[key] = now_s
            return batch
        self._held[key] = batch
        return None

    def due(self, *, now_s: float) -> list[tuple[K, Held[T]]]:
        out = []
        for key, held in list(self._held.items()):
            if now_s - self._last.get(key, now_s - self.interval_s) >= self.interval_s:
                del self._held[key]
                self._last[key] = now_s
                out.append((key, held))
        return out

    def forget(self, key: K) -> None:
        """Drop the key's history: its next offer emits at once (held items are dropped)."""
        self._last.pop(key, None)
        self._held.pop(key, None)

    def holds(self, key: K) -> bool:
        return key in self._held or key in self._last
