"""Per-function load at the gateway: calls running on a replica and calls waiting for one.

Autoscaling needs the *average* concurrency between two samples, not just the count at
the instant a sample is taken: a burst that starts and ends between two samples would
otherwise be missed. So the counter keeps the time integral of ``in_flight + waiting``
(call-seconds), updated at every change; two readings give the exact average between
them. Updating is a few additions on the call path, no lock (one event loop).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

Clock = Callable[[], float]


@dataclass(frozen=True, slots=True)
class LoadReading:
    at_s: float
    in_flight: int  # calls running on a replica (including ones the gateway gave up on)
    waiting: int  # calls waiting for a free replica
    call_seconds: float  # integral of in_flight + waiting over time, since the counter started

    @property
    def concurrency(self) -> int:
        return self.in_flight + self.waiting

    def average_since(self, earlier: LoadReading) -> float:
        """Average concurrency between ``earlier`` and this reading (the current count if no time passed)."""
        elapsed = self.at_s - earlier.at_s
        if elapsed <= 0:
            return float(self.concurrency)
        return max(0.0, (self.call_seconds - earlier.call_seconds) / elapsed)


class LoadCounter:
    """In-flight and waiting calls of one function, and their integral over time."""

    def __init__(self, clock: Clock = time.monotonic) -> None:
        self._clock = clock
        self.in_flight = 0
        self.waiting = 0
        self._call_seconds = 0.0
        self._changed_s = clock()

    def _advance(self) -> None:
        now = self._clock()
        self._call_seconds += (self.in_flight + self.waiting) * (now - self._changed_s)
        self._changed_s = now

    def wait_started(self) -> None:
        self._advance()
        self.waiting += 1

    def wait_ended(self) -> None:
        self._advance()
        self.waiting -= 1

    def call_started(self) -> None:
        self._advance()
        self.in_flight += 1

    def call_ended(self) -> None:
        self._advance()
        self.in_flight -= 1

    def read(self) -> LoadReading:
        self._advance()
        return LoadReading(at_s=self._changed_s, in_flight=self.in_flight, waiting=self.waiting,
                           call_seconds=self._call_seconds)
