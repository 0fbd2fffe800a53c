"""How many replicas a function should run: a concurrency autoscaler in the style of Knative's KPA.

Pure, like ``faastube_placement``: a function of the samples and the clock readings passed
in (no clock, no I/O, no asyncio inside). The gateway samples its own load, decides with
it and serves the decisions at ``GET /scale``; ``faastube run`` starts and stops worker
processes on them, and the operator scales Deployments on them (clamped to the
Workflow's bounds); tests drive it on a simulated clock. ``settings`` holds the knobs and their defaults, ``decision`` the
algorithm. Design: docs/runtime.md, "Autoscaling".
"""

from faastube_autoscale.decision import (
    Decision,
    FunctionAutoscaler,
    Reason,
    Sample,
    ScaleBounds,
    autoscalers_for,
    bounds_of,
)
from faastube_autoscale.settings import AutoscaleSettings

__all__ = [
    "AutoscaleSettings",
    "Decision",
    "FunctionAutoscaler",
    "Reason",
    "Sample",
    "ScaleBounds",
    "autoscalers_for",
    "bounds_of",
]
