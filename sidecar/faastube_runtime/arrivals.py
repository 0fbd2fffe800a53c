"""Request arrival times in the shapes of the Azure Functions traces.

The paper drives its workflows with load shaped like the Azure Functions 2019
trace (Shahrad et al., "Serverless in the Wild", USENIX ATC '20), which shows three
kinds of behaviour that matter for a GPU memory pool that grows and shrinks:

* **sporadic**: most applications are invoked rarely (the paper reports that about
  45% of applications are invoked at most once per hour on average, and about 81%
  at most once per minute) and their inter-arrival times (IATs) are far more
  variable than a Poisson process: long idle gaps with occasional close calls. We
  draw IATs from a log-normal (heavy-tailed) distribution with a coefficient of
  variation (CV) well above 1 (default 3).
* **periodic**: timer-triggered functions fire on a fixed period; their IAT CV is
  near 0 in the trace. We emit one arrival per period with a small Gaussian jitter
  (default CV ~0.05).
* **bursty**: many HTTP- and queue-triggered applications alternate between busy
  and idle phases (IAT CV > 1). We use a two-state Markov-modulated Poisson process:
  exponential ON periods with a high rate and exponential OFF periods with none.

Each generator takes a mean rate (requests per second) and a duration and is
deterministic for a given seed; the realised mean rate matches the asked rate up
to sampling noise. ``from_minute_counts`` replays the trace's own format (one
count of invocations per minute) by spreading each minute's calls uniformly.
A Poisson process (CV = 1) is included as the usual reference point.

``paced`` turns a trace into an async iterator that wakes at each arrival time, for
a load generator that sends requests open-loop.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from faastube.errors import InvalidRequest

logger = logging.getLogger(__name__)


class ArrivalsInvalid(InvalidRequest, ValueError):
    """A generator's parameters are out of range; the message names the parameter."""


@dataclass(frozen=True)
class ArrivalTrace:
    """Arrival times in seconds from the start, sorted, all within ``[0, duration_s)``."""

    shape: str
    times_s: tuple[float, ...]
    duration_s: float

    def __len__(self) -> int:
        return len(self.times_s)

    def inter_arrivals_s(self) -> np.ndarray:
        return np.diff(np.asarray(self.times_s, dtype=np.float64))

    @property
    def mean_rate_per_s(self) -> float:
        return len(self.times_s) / self.duration_s

    @property
    def inter_arrival_cv(self) -> float:
        """Standard deviation over mean of the gaps (0: periodic, 1: Poisson, >1: bursty)."""
        gaps = self.inter_arrivals_s()
        if len(gaps) < 2 or gaps.mean() == 0:
            return math.nan
        return float(gaps.std() / gaps.mean())

    def per_window_counts(self, window_s: float) -> np.ndarray:
        """Arrivals per consecutive window (e.g. 60 s, to compare with the trace's minutes)."""
        _positive("window_s", window_s)
        bins = max(1, math.ceil(self.duration_s / window_s))
        counts, _ = np.histogram(self.times_s, bins=bins, range=(0.0, bins * window_s))
        return counts


class ArrivalProcess(Protocol):
    """A request arrival process; ``generate`` is deterministic for a given seed."""

    @property
    def shape(self) -> str: ...

    def generate(self, duration_s: float, *, seed: int) -> ArrivalTrace: ...


def _positive(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        raise ArrivalsInvalid(f"{name} must be a positive number, got {value!r}")


def _from_gaps(shape: str, duration_s: float, rng: np.random.Generator,
               draw: Callable[[np.random.Generator, int], np.ndarray], mean_gap_s: float) -> ArrivalTrace:
    """Cumulate gaps from ``draw`` until the duration is covered; the first gap starts at 0."""
    _positive("duration_s", duration_s)
    times: list[np.ndarray] = []
    t = 0.0
    batch = max(16, int(duration_s / mean_gap_s * 1.2) + 16)
    while t < duration_s:
        gaps = draw(rng, batch)
        stamps = t + np.cumsum(gaps)
        times.append(stamps)
        t = float(stamps[-1])
    all_times = np.concatenate(times)
    return ArrivalTrace(shape, tuple(float(x) for x in all_times[all_times < duration_s]), float(duration_s))


@dataclass(frozen=True)
class Poisson:
    """Exponential gaps: CV = 1, the memoryless reference."""

    mean_rate_per_s: float
    shape: str = "poisson"

    def __post_init__(self) -> None:
        _positive("mean_rate_per_s", self.mean_rate_per_s)

    def generate(self, duration_s: float, *, seed: int) -> ArrivalTrace:
        mean_gap = 1.0 / self.mean_rate_per_s
        return _from_gaps(self.shape, duration_s, np.random.default_rng(seed),
                          lambda rng, n: rng.exponential(mean_gap, n), mean_gap)


@dataclass(frozen=True)
class Sporadic:
    """Heavy-tailed (log-normal) gaps with mean ``1 / mean_rate_per_s`` and CV ``cv``.

    The log-normal keeps every moment finite, so the realised rate and CV converge,
    while most gaps are short and a few are very long idle periods (the median gap
    is ``mean / sqrt(1 + cv**2)``).
    """

    mean_rate_per_s: float
    cv: float = 3.0
    shape: str = "sporadic"

    def __post_init__(self) -> None:
        _positive("mean_rate_per_s", self.mean_rate_per_s)
        _positive("cv", self.cv)

    def generate(self, duration_s: float, *, seed: int) -> ArrivalTrace:
        mean_gap = 1.0 / self.mean_rate_per_s
        sigma = math.sqrt(math.log1p(self.cv**2))
        mu = math.log(mean_gap) - sigma**2 / 2
        return _from_gaps(self.shape, duration_s, np.random.default_rng(seed),
                          lambda rng, n: rng.lognormal(mu, sigma, n), mean_gap)


@dataclass(frozen=True)
class Periodic:
    """Timer-like: one arrival per period ``1 / mean_rate_per_s``, each late or early by jitter.

    The phase of the first tick is random; each tick moves by a Gaussian of standard
    deviation ``jitter_fraction * period`` (clipped to half a period, so order is kept).
    """

    mean_rate_per_s: float
    jitter_fraction: float = 0.05
    shape: str = "periodic"

    def __post_init__(self) -> None:
        _positive("mean_rate_per_s", self.mean_rate_per_s)
        if not 0 <= self.jitter_fraction < 0.5:
            raise ArrivalsInvalid(f"jitter_fraction must be in [0, 0.5), got {self.jitter_fraction!r}")

    def generate(self, duration_s: float, *, seed: int) -> ArrivalTrace:
        _positive("duration_s", duration_s)
        rng = np.random.default_rng(seed)
        period = 1.0 / self.mean_rate_per_s
        ticks = np.arange(rng.uniform(0, period), duration_s, period)
        jitter = np.clip(rng.normal(0.0, self.jitter_fraction * period, len(ticks)), -period / 2, period / 2)
        times = np.sort(ticks + jitter)
        times = times[(times >= 0) & (times < duration_s)]
        return ArrivalTrace(self.shape, tuple(float(x) for x in times), float(duration_s))


@dataclass(frozen=True)
class Bursty:
    """Markov-modulated Poisson: ON phases at rate ``mean_rate * (on + off) / on``, OFF phases silent.

    ON and OFF durations are exponential with means ``mean_on_s`` and ``mean_off_s``,
    so the long-run mean rate is ``mean_rate_per_s``. The gaps' CV grows with the
    peak-to-mean ratio and the length of the phases.
    """

    mean_rate_per_s: float
    mean_on_s: float = 5.0
    mean_off_s: float = 20.0
    shape: str = "bursty"

    def __post_init__(self) -> None:
        _positive("mean_rate_per_s", self.mean_rate_per_s)
        _positive("mean_on_s", self.mean_on_s)
        _positive("mean_off_s", self.mean_off_s)

    @property
    def peak_rate_per_s(self) -> float:
        return self.mean_rate_per_s * (self.mean_on_s + self.mean_off_s) / self.mean_on_s

    def generate(self, duration_s: float, *, seed: int) -> ArrivalTrace:
        _positive("duration_s", duration_s)
        rng = np.random.default_rng(seed)
        on_fraction = self.mean_on_s / (self.mean_on_s + self.mean_off_s)
        times: list[np.ndarray] = []
        # Start in the stationary distribution, so the rate is right from t = 0.
        on = bool(rng.random() < on_fraction)
        t = 0.0
        while t < duration_s:
            length = rng.exponential(self.mean_on_s if on else self.mean_off_s)
            end = min(t + length, duration_s)
            if on:
                count = rng.poisson(self.peak_rate_per_s * (end - t))
                times.append(np.sort(rng.uniform(t, end, count)))
            t, on = t + length, not on
        merged = np.concatenate(times) if times else np.empty(0)
        return ArrivalTrace(self.shape, tuple(float(x) for x in merged), float(duration_s))


SHAPES: dict[str, type[Poisson | Sporadic | Periodic | Bursty]] = {
    "poisson": Poisson, "sporadic": Sporadic, "periodic": Periodic, "bursty": Bursty,
}


def make_process(shape: str, mean_rate_per_s: float) -> ArrivalProcess:
    """The generator of one of ``SHAPES`` with its default shape parameters."""
    try:
        cls = SHAPES[shape]
    except KeyError:
        raise ArrivalsInvalid(f"unknown arrival shape {shape!r}; use one of {', '.join(SHAPES)}") from None
    return cls(mean_rate_per_s)


def from_minute_counts(counts: Sequence[int], *, seed: int, shape: str = "trace") -> ArrivalTrace:
    """Replay per-minute invocation counts (the Azure trace's columns ``1`` .. ``1440``).

    The trace only says how many calls fell in each minute; they are spread uniformly
    at random within it.
    """
    rng = np.random.default_rng(seed)
    chunks: list[np.ndarray] = []
    for minute, count in enumerate(counts):
        if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 0:
            raise ArrivalsInvalid(f"counts[{minute}] must be a non-negative integer, got {count!r}")
        chunks.append(np.sort(rng.uniform(60.0 * minute, 60.0 * (minute + 1), int(count))))
    if not chunks:
        raise ArrivalsInvalid("counts must cover at least one minute")
    merged = np.concatenate(chunks)
    return ArrivalTrace(shape, tuple(float(x) for x in merged), 60.0 * len(counts))


async def paced(trace: ArrivalTrace, *, time_scale: float = 1.0) -> AsyncIterator[tuple[int, float]]:
    """Yield ``(index, scheduled time)`` as each arrival falls due on the event loop's clock.

    Open-loop: a slow consumer does not delay later arrivals' schedule, it only
    receives them late (the caller can measure that lag against the scheduled time).
    ``time_scale`` < 1 replays faster than real time.
    """
    _positive("time_scale", time_scale)
    loop = asyncio.get_running_loop()
    start = loop.time()
    for index, at_s in enumerate(trace.times_s):
        delay = start + at_s * time_scale - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        yield index, at_s * time_scale


def offsets(shape: str, *, count: int, rate_per_s: float, seed: int) -> list[float]:
    """Send times of the first ``count`` arrivals of ``shape``, shifted so the first is at 0.

    For a load generator that sends a fixed number of requests (``faastube run
    --requests N --arrival SHAPE --rate R``) rather than running for a fixed time.
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ArrivalsInvalid(f"count must be a non-negative integer, got {count!r}")
    if count == 0:
        return []
    process = make_process(shape, rate_per_s)
    # Long enough for `count` arrivals on average, plus slack; grow until it is.
    duration_s = (count + 10) / rate_per_s * 1.5
    while True:
        trace = process.generate(duration_s, seed=seed)
        if len(trace) >= count:
            first = trace.times_s[0]
            return [t - first for t in trace.times_s[:count]]
        duration_s *= 2
