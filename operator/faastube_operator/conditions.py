"""A Workflow's status as a small state machine, kept pure.

``status.phase`` is one of a few states; each state fixes the three
conditions users and tools read (Ready, Progressing, Degraded, in the
metav1.Condition shape). A condition keeps its ``lastTransitionTime`` while its
status does not change, so re-running a reconciliation rewrites nothing.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
from collections.abc import Mapping, Sequence
from typing import Any, Literal

ConditionStatus = Literal["True", "False", "Unknown"]


class Phase(str, enum.Enum):
    PENDING = "Pending"
    INVALID = "Invalid"
    UNSCHEDULABLE = "Unschedulable"
    DEPLOYING = "Deploying"
    RUNNING = "Running"


@dataclasses.dataclass(frozen=True)
class Condition:
    type: str
    status: ConditionStatus
    reason: str  # CamelCase, machine-readable
    message: str


# phase -> (Ready, Progressing, Degraded) as (status, reason)
_TABLE: dict[Phase, tuple[tuple[ConditionStatus, str], ...]] = {
    Phase.PENDING: (("Unknown", "Reconciling"), ("True", "Reconciling"), ("False", "AsExpected")),
    Phase.INVALID: (("False", "InvalidSpec"), ("False", "InvalidSpec"), ("True", "InvalidSpec")),
    Phase.UNSCHEDULABLE: (("False", "PlacementFailed"), ("False", "PlacementFailed"),
                          ("True", "PlacementFailed")),
    Phase.DEPLOYING: (("False", "FunctionsNotAvailable"), ("True", "RollingOut"),
                      ("False", "AsExpected")),
    Phase.RUNNING: (("True", "AllFunctionsAvailable"), ("False", "RolloutComplete"),
                    ("False", "AsExpected")),
}
CONDITION_TYPES = ("Ready", "Progressing", "Degraded")


def conditions_for(phase: Phase, message: str) -> tuple[Condition, ...]:
    return tuple(Condition(type=kind, status=status, reason=reason, message=message)
                 for kind, (status, reason) in zip(CONDITION_TYPES, _TABLE[phase], strict=True))


def format_time(when: datetime.datetime) -> str:
    return when.astimezone(datetime.UTC).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def merge_conditions(
    existing: Sequence[Mapping[str, Any]] | None,
    updates: Sequence[Condition],
    *,
    now: datetime.datetime,
    generation: int | None,
) -> list[dict[str, Any]]:
    """The new conditions list: updated types replaced, others kept as they were."""
    by_type = {str(c.get("type")): dict(c) for c in (existing or ()) if isinstance(c, Mapping)}
    for cond in updates:
        old = by_type.get(cond.type)
        changed = old is None or old.get("status") != cond.status
        entry: dict[str, Any] = {
            "type": cond.type,
            "status": cond.status,
            "reason": cond.reason,
            "message": cond.message,
            "lastTransitionTime": format_time(now) if changed or old is None
            else old.get("lastTransitionTime", format_time(now)),
        }
        if generation is not None:
            entry["observedGeneration"] = generation
        by_type[cond.type] = entry
    ordered = [by_type.pop(kind) for kind in CONDITION_TYPES if kind in by_type]
    return ordered + [by_type[kind] for kind in sorted(by_type)]


def status_patch(
    phase: Phase,
    message: str,
    *,
    existing_conditions: Sequence[Mapping[str, Any]] | None,
    now: datetime.datetime,
    generation: int | None,
) -> dict[str, Any]:
    """The status fields every phase sets (placement and counts are added by the caller)."""
    patch: dict[str, Any] = {
        "phase": phase.value,
        "conditions": merge_conditions(existing_conditions, conditions_for(phase, message),
                                       now=now, generation=generation),
    }
    if generation is not None:
        patch["observedGeneration"] = generation
    return patch


def deployment_available(deployment: Mapping[str, Any], *, minimum: int | None = None) -> bool:
    """Whether a Deployment finished rolling out its current template and is available.

    Available means every wanted replica, or, with ``minimum`` (an autoscaled function:
    its ``minReplicas``), at least that many of them: replicas an autoscaler just added
    and that are still starting do not make a running workflow "not ready", and a
    function scaled to zero is available (a call waits for its replica).
    """
    spec = deployment.get("spec") or {}
    status = deployment.get("status") or {}
    meta = deployment.get("metadata") or {}
    wanted = int(spec.get("replicas", 1))
    observed = status.get("observedGeneration")
    generation = meta.get("generation")
    if observed is not None and generation is not None and int(observed) < int(generation):
        return False
    enough = wanted if minimum is None else min(wanted, minimum)
    return (int(status.get("updatedReplicas", 0) or 0) >= enough
            and int(status.get("availableReplicas", 0) or 0) >= enough)


def rollout_phase(deployments: Sequence[Mapping[str, Any]], *, expected_names: Sequence[str],
                  minimum_available: Mapping[str, int] | None = None) -> tuple[Phase, str]:
    """Deploying or Running, with a message naming what is not available yet.

    ``minimum_available`` names the Deployments of autoscaled functions, with the
    replicas they need available (``deployment_available``'s ``minimum``).
    """
    found = {str((d.get("metadata") or {}).get("name")): d for d in deployments}
    minimum = minimum_available or {}
    waiting = [name for name in expected_names
               if name not in found or not deployment_available(found[name], minimum=minimum.get(name))]
    if not waiting:
        return Phase.RUNNING, f"all {len(expected_names)} deployments are available"
    return Phase.DEPLOYING, "waiting for deployments: " + ", ".join(sorted(waiting))
