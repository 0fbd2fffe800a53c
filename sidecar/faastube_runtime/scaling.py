"""The gateway's view of scaling: sample each function's load, decide, and say so.

``ScaleMonitor`` reads the worker pool's load counters every ``interval_s`` (and at once
when a call waits for a function with no replica), feeds the average concurrency since
the last reading to one ``faastube_autoscale.FunctionAutoscaler`` per function, and
keeps the decisions: for ``GET /scale`` (what a controller polls), for the gauges
``faastube_gateway_function_concurrency`` / ``_desired_replicas`` / ``_function_replicas``,
and for listeners that act on them (local mode starting and stopping worker processes).
The monitor itself changes nothing: the decision is pure, acting is someone else's job.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, Self

from faastube_autoscale import (
    AutoscaleSettings,
    Decision,
    FunctionAutoscaler,
    Sample,
    autoscalers_for,
)
from faastube_spec.workflow import Workflow

from faastube_runtime import errors
from faastube_runtime.load import Clock, LoadReading
from faastube_runtime.metrics import GatewayMetrics

logger = logging.getLogger(__name__)

DEFAULT_INTERVAL_S = 1.0


class LoadSource(Protocol):
    """What the monitor reads: the pool's counters and replica sets."""

    def load(self, function: str) -> LoadReading: ...

    def replicas(self, function: str) -> tuple[Any, ...]: ...

    def watch_starvation(self, callback: Callable[[str], None] | None) -> None: ...


@dataclass(frozen=True, slots=True)
class FunctionScale:
    """The last decision for one function, as ``GET /scale`` reports it."""

    desired: int
    current: int  # replicas serving (members of the pool)
    concurrency: float  # stable-window average the decision used (calls running + waiting)
    panic_concurrency: float
    panicking: bool
    reason: str
    min_replicas: int
    max_replicas: int

    def as_json(self) -> dict[str, Any]:
        return {"desired": self.desired, "current": self.current, "concurrency": round(self.concurrency, 6),
                "panicConcurrency": round(self.panic_concurrency, 6), "panicking": self.panicking,
                "reason": self.reason, "minReplicas": self.min_replicas, "maxReplicas": self.max_replicas}


Listener = Callable[[Mapping[str, FunctionScale]], None]


class ScaleMonitor:
    """Samples ``source`` into the autoscaler; ``async with`` runs it, ``tick`` is one round."""

    def __init__(self, workflow: Workflow, source: LoadSource, *, settings: AutoscaleSettings | None = None,
                 interval_s: float = DEFAULT_INTERVAL_S, metrics: GatewayMetrics | None = None,
                 clock: Clock = time.monotonic) -> None:
        if not interval_s > 0:
            raise errors.BadInput(f"scale sampling interval: must be positive, got {interval_s}")
        self.workflow = workflow
        self.settings = settings if settings is not None else AutoscaleSettings()
        self.interval_s = interval_s
        self._source = source
        self._metrics = metrics
        self._clock = clock
        now = clock()
        self._scalers: dict[str, FunctionAutoscaler] = autoscalers_for(workflow, now_s=now, settings=self.settings)
        self._readings = {fn.name: source.load(fn.name) for fn in workflow.functions}
        self._latest: dict[str, FunctionScale] = {}
        self._listeners: list[Listener] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        for fn in workflow.functions:
            self._latest[fn.name] = self._scale(fn.name, Decision(fn.replicas, "no-data", 0.0, 0.0, False),
                                                current=len(source.replicas(fn.name)))

    def subscribe(self, listener: Listener) -> None:
        """Call ``listener(decisions)`` after every round (errors are logged, not raised)."""
        self._listeners.append(listener)

    def snapshot(self) -> dict[str, FunctionScale]:
        return dict(self._latest)

    def poke(self, _function: str | None = None) -> None:
        """Run a round now instead of at the next interval (a call waits and no replica exists)."""
        self._wake.set()

    def tick(self) -> dict[str, FunctionScale]:
        """Sample every function once, decide, publish; returns the decisions."""
        for name, scaler in self._scalers.items():
            reading = self._source.load(name)
            previous = self._readings[name]
            if reading.at_s > previous.at_s:
                scaler.observe(Sample(at_s=reading.at_s, interval_s=reading.at_s - previous.at_s,
                                      concurrency=reading.average_since(previous), waiting=reading.waiting))
                self._readings[name] = reading
            current = len(self._source.replicas(name))
            decision = scaler.decide(now_s=max(reading.at_s, previous.at_s), ready=current)
            before = self._latest[name]
            self._latest[name] = scale = self._scale(name, decision, current=current)
            if scale.desired != before.desired:
                logger.info("autoscaler: %s wants %d replica(s) (was %d, %d serving): %s, concurrency "
                            "%.2f (panic window %.2f)", name, scale.desired, before.desired, current,
                            decision.reason, decision.stable_concurrency, decision.panic_concurrency)
            if self._metrics is not None:
                self._metrics.observe_scale(self.workflow.name, name, concurrency=reading.average_since(previous),
                                            desired=scale.desired, current=current)
        decisions = self.snapshot()
        for listener in list(self._listeners):
            try:
                listener(decisions)
            except Exception:  # noqa: BLE001 - one listener's bug must not stop sampling
                logger.exception("scale listener failed")
        return decisions

    def _scale(self, name: str, decision: Decision, *, current: int) -> FunctionScale:
        bounds = self._scalers[name].bounds
        return FunctionScale(desired=decision.desired, current=current, concurrency=decision.stable_concurrency,
                             panic_concurrency=decision.panic_concurrency, panicking=decision.panicking,
                             reason=decision.reason, min_replicas=bounds.min_replicas,
                             max_replicas=bounds.max_replicas)

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.interval_s):
                    await self._wake.wait()
            self._wake.clear()
            self.tick()

    async def __aenter__(self) -> Self:
        self._source.watch_starvation(self.poke)
        self._task = asyncio.create_task(self._run(), name="scale-monitor")
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._source.watch_starvation(None)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
