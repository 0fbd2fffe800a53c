"""An asyncio loop that busy-polls briefly before it sleeps.

A process sleeping in epoll_wait pays a wake-up on every request: tens of
microseconds in a VM, as much as the rest of a metadata round trip. With
`--spin-us N` the sidecar polls its sockets for up to N microseconds after each
burst of work before it blocks, trading a CPU core while busy for latency. Off by
default.
"""

from __future__ import annotations

import asyncio
import selectors
import time
from collections.abc import Callable


class SpinningSelector(selectors.EpollSelector):
    def __init__(self, spin_s: float) -> None:
        super().__init__()
        self._spin_s = spin_s

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is not None and timeout <= 0:
            return super().select(timeout)
        start = time.perf_counter()
        budget = self._spin_s if timeout is None else min(self._spin_s, timeout)
        while True:
            ready = super().select(0)
            if ready or time.perf_counter() - start >= budget:
                break
        if ready:
            return ready
        remaining = None if timeout is None else max(0.0, timeout - (time.perf_counter() - start))
        return super().select(remaining)


def spinning_loop_factory(spin_us: float) -> Callable[[], asyncio.AbstractEventLoop]:
    return lambda: asyncio.SelectorEventLoop(SpinningSelector(spin_us / 1e6))
