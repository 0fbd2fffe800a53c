"""Progress of ``faastube run``'s requests: a bar where a person watches, lines where a log does.

On a terminal, a tqdm bar with the rate and the ETA, and a live latency figure (p50/p99 of
the recent answered requests) so that a run drifting past its SLO shows before it ends.
Anywhere else (CI, a file, a pipe) a carriage-return bar is noise: ten plain lines instead.
"""

from __future__ import annotations

import collections
import sys
from typing import Any, TextIO

import numpy as np

from faastube_runtime.loadgen import RequestResult

# Latencies the live figure is taken over: recent enough to show a drift, enough for a p99.
RECENT_REQUESTS = 200


class Progress:
    """Called with each request's result; ``close()`` when the run ends."""

    def __init__(self, total: int, *, stream: TextIO | None = None, bar: bool | None = None) -> None:
        self.total = total
        self.done = 0
        self.failed = 0
        self.stream = stream if stream is not None else sys.stderr
        self.step = max(1, total // 10)
        self.recent_s: collections.deque[float] = collections.deque(maxlen=RECENT_REQUESTS)
        self._bar: Any = None
        if self.stream.isatty() if bar is None else bar:
            try:
                from tqdm import tqdm
            except ImportError:  # the runtime extra brings it; without it, plain lines
                pass
            else:
                self._bar = tqdm(total=total, file=self.stream, unit="req", dynamic_ncols=True,
                                 desc="requests", leave=True)

    def latency_text(self) -> str:
        if not self.recent_s:
            return "no answer yet"
        p50, p99 = np.percentile(np.fromiter(self.recent_s, float), (50, 99))
        return f"p50 {p50 * 1e3:.1f} ms, p99 {p99 * 1e3:.1f} ms"

    def __call__(self, result: RequestResult) -> None:
        self.done += 1
        if result.ok:
            self.recent_s.append(result.latency_s)
        else:
            self.failed += 1
        if self._bar is not None:
            self._bar.set_postfix_str(f"{self.failed} failed, {self.latency_text()}", refresh=False)
            self._bar.update(1)
        elif self.done % self.step == 0 or self.done == self.total:
            print(f"  {self.done}/{self.total} requests done, {self.failed} failed; {self.latency_text()}",
                  file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
