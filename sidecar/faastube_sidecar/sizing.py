"""Sizing pools from the traffic: how much memory each function's data needs, and for how long.

A static keep-alive pool holds its peak for a fixed idle period, up to 4x what the
traffic needs (FaaSTube, mechanism 5). Instead, per function (a workflow's function
at one location), we keep the 99th percentiles of three things the sidecar sees:

- ``R_window``: the interval between two executions (a publish, or a copy the sidecar
  made for the function's read), i.e. how long the function may stay quiet and still
  be about to run again;
- ``R_size``: the bytes one execution puts in the pool;
- ``R_con``: the function's objects alive in the pool at once, counting the new one
  (executions overlapping, and outputs waiting for their readers).

After each execution the function holds a reservation of ``R_size x R_con`` until
``R_window`` has passed without another one. The pool keeps empty memory only up to
the sum of its functions' reservations (``target``), and never more than its cap.

Pure statistics over a clock passed in: no pools, no I/O, so tests drive it with a
simulated clock.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


@dataclass(frozen=True, slots=True)
class SizingSettings:
    quantile: float = 0.99
    samples: int = 256                 # the last this many samples of each statistic count
    min_intervals: int = 3             # below this, the window is `default_window_s`
    default_window_s: float = 30.0     # before the traffic says otherwise: the static pool's idle period
    min_window_s: float = 0.5          # a reservation outlives its execution at least this long
    max_window_s: float = 600.0        # and at most this long, however sparse the calls
    forget_after_windows: float = 10.0  # a function silent this many windows is forgotten

    def problems(self) -> list[str]:
        out = []
        if not 0 < self.quantile <= 1:
            out.append(f"quantile must be in (0, 1], got {self.quantile}")
        if self.samples < 1 or self.min_intervals < 1:
            out.append("samples and min_intervals must be at least 1")
        if not 0 < self.min_window_s <= self.default_window_s <= self.max_window_s:
            out.append("need 0 < min_window_s <= default_window_s <= max_window_s")
        return out


class Samples:
    """The last `capacity` values of one statistic, with a quantile (nearest rank)."""

    __slots__ = ("_order", "_sorted")

    def __init__(self, capacity: int) -> None:
        self._order: deque[float] = deque(maxlen=capacity)
        self._sorted: list[float] = []

    def __len__(self) -> int:
        return len(self._order)

    def add(self, value: float) -> None:
        if len(self._order) == self._order.maxlen:
            old = self._order[0]
            del self._sorted[bisect.bisect_left(self._sorted, old)]
        self._order.append(value)
        bisect.insort(self._sorted, value)

    def quantile(self, q: float) -> float:
        """The smallest sample at or above a fraction `q` of them (0.0 with no samples)."""
        if not self._sorted:
            return 0.0
        rank = max(1, math.ceil(q * len(self._sorted)))
        return self._sorted[rank - 1]


@dataclass(frozen=True, slots=True)
class Reservation:
    """One function's current reservation and the statistics it came from."""

    size_bytes: int          # R_size
    concurrency: int         # R_con
    window_s: float          # R_window
    reserved_bytes: int      # R_size x R_con while the window is open, else 0
    idle_s: float            # since the last execution


@dataclass(eq=False)
class FunctionTraffic:
    settings: SizingSettings
    intervals: Samples = field(init=False)
    sizes: Samples = field(init=False)
    concurrency: Samples = field(init=False)
    last_s: float | None = None

    def __post_init__(self) -> None:
        n = self.settings.samples
        self.intervals, self.sizes, self.concurrency = Samples(n), Samples(n), Samples(n)

    def observe(self, now_s: float, nbytes: int, concurrency: int) -> None:
        if self.last_s is not None:
            self.intervals.add(max(0.0, now_s - self.last_s))
        self.last_s = now_s if self.last_s is None else max(self.last_s, now_s)
        self.sizes.add(float(nbytes))
        self.concurrency.add(float(max(1, concurrency)))

    def window_s(self) -> float:
        s = self.settings
        if len(self.intervals) < s.min_intervals:
            return s.default_window_s
        return min(s.max_window_s, max(s.min_window_s, self.intervals.quantile(s.quantile)))

    def reservation(self, now_s: float) -> Reservation:
        q = self.settings.quantile
        size = int(self.sizes.quantile(q))
        con = int(self.concurrency.quantile(q))
        window = self.window_s()
        idle = math.inf if self.last_s is None else max(0.0, now_s - self.last_s)
        return Reservation(size, con, window, size * con if idle <= window else 0, idle)


class TrafficSizing(Generic[K]):
    """Per-function traffic statistics and the reservations they imply.

    Keys are whatever names a function at a place (the data plane uses
    (domain, function, location)); `group` maps a key to the pool it reserves in.
    """

    def __init__(self, settings: SizingSettings = SizingSettings(), *,
                 clock: Callable[[], float]) -> None:
        problems = settings.problems()
        if problems:
            raise ValueError("sizing settings: " + "; ".join(problems))
        self.settings = settings
        self._clock = clock
        self._traffic: dict[K, FunctionTraffic] = {}

    def __len__(self) -> int:
        return len(self._traffic)

    def observe(self, key: K, nbytes: int, concurrency: int) -> None:
        """One execution of `key`'s function put `nbytes` in the pool, with `concurrency` of its objects alive."""
        traffic = self._traffic.get(key)
        if traffic is None:
            traffic = self._traffic[key] = FunctionTraffic(self.settings)
        traffic.observe(self._clock(), nbytes, concurrency)

    def reservation(self, key: K) -> Reservation | None:
        traffic = self._traffic.get(key)
        return None if traffic is None else traffic.reservation(self._clock())

    def reservations(self) -> Iterator[tuple[K, Reservation]]:
        now = self._clock()
        for key, traffic in self._traffic.items():
            yield key, traffic.reservation(now)

    def reserved_by(self, group: Callable[[K], Hashable]) -> dict[Hashable, int]:
        """Bytes reserved now, summed by `group(key)` (e.g. per pool)."""
        out: dict[Hashable, int] = {}
        for key, r in self.reservations():
            if r.reserved_bytes:
                g = group(key)
                out[g] = out.get(g, 0) + r.reserved_bytes
        return out

    def forget_idle(self) -> int:
        """Drop functions silent for many windows (bounded memory); returns how many."""
        now = self._clock()
        gone = [k for k, t in self._traffic.items()
                if t.last_s is not None and now - t.last_s > self.settings.forget_after_windows * t.window_s()]
        for key in gone:
            del self._traffic[key]
        return len(gone)
