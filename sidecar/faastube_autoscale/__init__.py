"""How many replicas a function should run: a concurrency autoscaler in the style of Knative's KPA.

Pure, like ``faastube_placement``: a function of the samples and the clock readings passed
in (no clock, no I/O, no asyncio inside), so the gateway (which samples its own load and
serves ``GET /scale``), ``faastube run`` (which starts and stops worker processes) and the
operator (which will scale Deployments) all decide the same way, and tests drive it on a
simulated clock. ``settings`` holds the knobs and their defaults, ``decision`` the
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
