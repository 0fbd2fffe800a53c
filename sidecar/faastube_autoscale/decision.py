"""The scaling decision for one function, from samples of its concurrency.

Concurrency is what a function's replicas are asked to carry: calls running on a replica
plus calls waiting for one. A caller measures it over an interval (the gateway integrates
its counters, so a burst between two samples still counts) and hands it in as a
``Sample``; ``FunctionAutoscaler.decide`` turns the samples into a replica count:

1. Average concurrency over the **stable window** (60 s) and the **panic window** (6 s),
   each weighted by the time each sample covers.
2. ``ceil(average / targetConcurrency)`` replicas for each window.
3. **Panic** when the panic window's load is at least ``panic_threshold`` (2x) what the
   ready replicas carry at their target: the panic window's count is used at once, the
   count never goes down while panicking, and panic ends a stable window after the last
   time the threshold was crossed. Otherwise the stable window's count is used.
4. **Scale from zero**: with no ready replica and a call waiting, at least one, at once.
5. **Scale to zero** only after ``scale_to_zero_grace_s`` without any load: until then a
   recommendation of zero is one, while there is a replica to keep (a function that
   starts at zero is not given one by the grace).
6. **Scale-down delay**: the highest recommendation of the last ``scale_down_delay_s``
   wins, so one quiet stretch does not shed replicas that come back a moment later
   (flapping), and the count a function started with holds for at least that long.
7. Clamped to ``[minReplicas, maxReplicas]``.

Every clock reading is passed in; ``decide`` keeps state between calls (panic, the recent
recommendations), so it is called once per evaluation, with ``now_s`` never going back.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from faastube_autoscale.settings import AutoscaleSettings

if TYPE_CHECKING:
    from faastube_spec.workflow import FunctionSpec, Workflow

__all__ = [
    "AutoscaleInputError",
    "Decision",
    "FunctionAutoscaler",
    "Reason",
    "Sample",
    "ScaleBounds",
    "autoscalers_for",
    "bounds_of",
]

# An average a hair above a whole number of targets (2.0000000001 from float sums) asks
# for that number, not one more.
_ROUNDING_SLACK = 1e-9

# What set the desired count (before clamping to the bounds):
#   stable: the stable window's average; panic: the panic window's, held while panicking;
#   from-zero: a call waits and no replica is ready; grace: zero was recommended but load
#   was seen within the scale-to-zero grace; scale-down-delay: a higher recommendation of
#   the last delay holds; no-data: no sample covers the stable window, the last count holds.
Reason = Literal["stable", "panic", "from-zero", "grace", "scale-down-delay", "no-data"]


class AutoscaleInputError(ValueError):
    """Impossible input (bad bounds or settings, samples going back in time); a caller's bug."""


@dataclass(frozen=True, slots=True)
class ScaleBounds:
    """What one function may scale between, and the concurrency one replica is meant to carry."""

    min_replicas: int
    max_replicas: int
    target_concurrency: float = 1.0

    def __post_init__(self) -> None:
        if not 0 <= self.min_replicas <= self.max_replicas or self.max_replicas < 1:
            raise AutoscaleInputError(f"bounds [{self.min_replicas}, {self.max_replicas}]: need "
                                      "0 <= min <= max and max >= 1")
        if not (math.isfinite(self.target_concurrency) and self.target_concurrency > 0):
            raise AutoscaleInputError(f"target_concurrency must be positive, got {self.target_concurrency}")

    def clamp(self, replicas: int) -> int:
        return min(self.max_replicas, max(self.min_replicas, replicas))


@dataclass(frozen=True, slots=True)
class Sample:
    """Average concurrency over ``(at_s - interval_s, at_s]``, and calls waiting at ``at_s``."""

    at_s: float
    interval_s: float
    concurrency: float
    waiting: int = 0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.at_s) and math.isfinite(self.interval_s) and self.interval_s > 0):
            raise AutoscaleInputError(f"sample at {self.at_s} over {self.interval_s} s: need a finite time "
                                      "and a positive interval")
        if not (math.isfinite(self.concurrency) and self.concurrency >= 0) or self.waiting < 0:
            raise AutoscaleInputError(f"sample concurrency {self.concurrency}, waiting {self.waiting}: "
                                      "must be finite and not negative")

    @property
    def loaded(self) -> bool:
        return self.concurrency > 0 or self.waiting > 0


@dataclass(frozen=True, slots=True)
class Decision:
    desired: int  # within the bounds
    reason: Reason
    stable_concurrency: float  # average over the stable window (0.0 with no data)
    panic_concurrency: float  # average over the panic window
    panicking: bool


class FunctionAutoscaler:
    """The replica count of one function; feed it ``observe`` and ask ``decide``."""

    def __init__(self, bounds: ScaleBounds, *, initial_replicas: int, now_s: float,
                 settings: AutoscaleSettings | None = None) -> None:
        self.bounds = bounds
        self.settings = settings if settings is not None else AutoscaleSettings()
        problems = self.settings.problems()
        if problems:
            raise AutoscaleInputError("autoscale settings: " + "; ".join(problems))
        start = bounds.clamp(initial_replicas)
        self._samples: deque[Sample] = deque()
        # (time, recommendation) of the last scale_down_delay_s; the start counts as one
        self._recommended: deque[tuple[float, int]] = deque([(now_s, start)])
        self._last_desired = start
        self._panic_until_s: float | None = None
        self._panic_peak = 0
        self._last_load_s = now_s  # the grace before zero runs from the start too
        self._now_s = now_s

    @property
    def panicking(self) -> bool:
        return self._panic_until_s is not None

    def observe(self, sample: Sample) -> None:
        """Add a sample; samples come in time order (``at_s`` never goes back)."""
        if self._samples and sample.at_s < self._samples[-1].at_s:
            raise AutoscaleInputError(f"sample at {sample.at_s} is older than the last one "
                                      f"({self._samples[-1].at_s})")
        self._samples.append(sample)
        if sample.loaded:
            self._last_load_s = max(self._last_load_s, sample.at_s)
        horizon = sample.at_s - self.settings.stable_window_s
        while self._samples and self._samples[0].at_s <= horizon:
            self._samples.popleft()

    def decide(self, *, now_s: float, ready: int) -> Decision:
        """The replicas wanted now, given ``ready`` replicas serving; call once per evaluation."""
        if now_s < self._now_s:
            raise AutoscaleInputError(f"decide at {now_s}: the clock went back (last {self._now_s})")
        if ready < 0:
            raise AutoscaleInputError(f"ready replicas must be 0 or more, got {ready}")
        self._now_s = now_s
        s, target = self.settings, self.bounds.target_concurrency
        stable = _average(self._samples, now_s=now_s, window_s=s.stable_window_s)
        panic = _average(self._samples, now_s=now_s, window_s=s.panic_window_s)
        if stable is None:
            return Decision(self._last_desired, "no-data", 0.0, panic or 0.0, self.panicking)
        panic_value = stable if panic is None else panic
        want_stable, want_panic = _replicas(stable, target), _replicas(panic_value, target)

        if panic_value >= s.panic_threshold * max(ready, 1) * target:
            self._panic_until_s = now_s + s.stable_window_s  # (re)armed by every crossing
        elif self._panic_until_s is not None and now_s >= self._panic_until_s:
            self._panic_until_s, self._panic_peak = None, 0
        reason: Reason
        if self._panic_until_s is not None:
            recommended = max(want_panic, want_stable, self._panic_peak)
            self._panic_peak = recommended
            reason = "panic"
        else:
            recommended, reason = want_stable, "stable"

        latest = self._samples[-1] if self._samples else None
        if ready == 0 and latest is not None and latest.waiting > 0 and recommended < 1:
            recommended, reason = 1, "from-zero"
        if (recommended == 0 and self._last_desired > 0
                and now_s - self._last_load_s < s.scale_to_zero_grace_s):
            # The grace keeps the last replica; it never starts one (a function that starts
            # at zero stays there until a call waits for it).
            recommended, reason = 1, "grace"

        self._recommended.append((now_s, recommended))
        while len(self._recommended) > 1 and self._recommended[0][0] <= now_s - s.scale_down_delay_s:
            self._recommended.popleft()
        held = max(r for _, r in self._recommended)
        if held > recommended:
            reason = "scale-down-delay"
        desired = self.bounds.clamp(held)
        self._last_desired = desired
        return Decision(desired, reason, stable, panic_value, self.panicking)


def _average(samples: Iterable[Sample], *, now_s: float, window_s: float) -> float | None:
    """Time-weighted average concurrency over ``(now_s - window_s, now_s]``; None if no sample covers it."""
    start = now_s - window_s
    covered = total = 0.0
    for sample in samples:
        begin = max(start, sample.at_s - sample.interval_s)
        end = min(now_s, sample.at_s)
        if end > begin:
            covered += end - begin
            total += sample.concurrency * (end - begin)
    return total / covered if covered > 0 else None


def _replicas(concurrency: float, target: float) -> int:
    return max(0, math.ceil(concurrency / target - _ROUNDING_SLACK))


def bounds_of(spec: FunctionSpec) -> ScaleBounds:
    """A function's bounds from its spec (a fixed function's are its replicas, both ways)."""
    low, high = spec.replica_range
    return ScaleBounds(min_replicas=low, max_replicas=max(1, high), target_concurrency=spec.target_concurrency)


def autoscalers_for(workflow: Workflow, *, now_s: float, settings: AutoscaleSettings | None = None,
                    initial: Mapping[str, int] | None = None) -> dict[str, FunctionAutoscaler]:
    """One autoscaler per function of ``workflow``, starting at ``initial`` (default: its ``replicas``)."""
    return {fn.name: FunctionAutoscaler(bounds_of(fn), now_s=now_s, settings=settings,
                                        initial_replicas=(initial or {}).get(fn.name, fn.replicas))
            for fn in workflow.functions}
