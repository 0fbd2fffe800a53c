"""GPU utilisation while a benchmark point runs, sampled through NVML.

NVML's ``utilization.gpu`` is the share of the last sample period (1/6 s to 1 s,
by driver) in which a kernel ran: coarse, but it is what ``nvidia-smi`` and DCGM
report, so the numbers compare with a platform team's dashboards. No NVML (no
driver, no GPU): ``Sampler.mean`` is None.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from types import TracebackType
from typing import Any, Self


class Sampler:
    """Samples every GPU's utilisation every ``period_s`` while in its ``with`` block."""

    def __init__(self, period_s: float = 0.1) -> None:
        self._period_s = period_s
        self._stop = threading.Event()
        self._samples: list[list[int]] = []
        self._thread: threading.Thread | None = None
        self._handles: Sequence[Any] = ()
        self._nvml: Any = None

    def __enter__(self) -> Self:
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        except Exception:  # noqa: BLE001 - no NVML: nothing to sample, mean stays None
            self._handles = ()
        if self._handles:
            self._thread = threading.Thread(target=self._run, name="gpu-util", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self._period_s):
            try:
                self._samples.append([int(self._nvml.nvmlDeviceGetUtilizationRates(h).gpu)
                                      for h in self._handles])
            except Exception:  # noqa: BLE001 - a failed sample is skipped, not fatal to the benchmark
                continue

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except Exception:  # noqa: BLE001 - shutting NVML down is best effort
                pass

    def per_gpu(self) -> list[float] | None:
        """Mean utilisation (percent) of each GPU over the block; None without samples."""
        if not self._samples:
            return None
        count = len(self._samples)
        return [sum(s[i] for s in self._samples) / count for i in range(len(self._handles))]

    def busiest(self) -> float | None:
        """The mean utilisation of the busiest GPU (where a workflow's GPU functions sit)."""
        per_gpu = self.per_gpu()
        return max(per_gpu) if per_gpu else None
