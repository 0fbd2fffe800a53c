"""How much memory each GPU has free right now, for the pools' cap.

The pools may hold at most a share of what the GPU could give them: its free memory
plus what they hold already. Other processes on the GPU (a model loading next to us)
change that at any time, so it is read again on every sweep, through NVML: NVML
creates no CUDA context and a query costs tens of microseconds.

`DeviceMemory` is the seam: `NvmlMemory` on GPU nodes, `SimulatedMemory` for the
host backend's simulated GPUs and for tests, which set what "other processes" hold.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class MemoryInfo:
    free_bytes: int       # what the device could still give anyone
    total_bytes: int


class DeviceMemory(Protocol):
    def info(self, gpu: int) -> MemoryInfo | None:
        """The GPU's memory now; None when it can't be read (the cap then stays at the pool limit)."""

    def close(self) -> None: ...


class SimulatedMemory:
    """GPUs of `total_bytes` each, where other processes hold `others_bytes[gpu]`.

    `used_by_us(gpu)` is what the pools themselves hold there (the data plane's
    reserved bytes), so free memory shrinks as the pools grow, as it does on a GPU.
    """

    def __init__(self, gpus: int, total_bytes: int, *, others_bytes: Mapping[int, int] | None = None,
                 used_by_us: Callable[[int], int] | None = None) -> None:
        self.gpus = gpus
        self.total_bytes = total_bytes
        self.others_bytes = dict(others_bytes or {})
        self.used_by_us = used_by_us or (lambda gpu: 0)

    def hold(self, gpu: int, nbytes: int) -> None:
        """Another process now holds `nbytes` of the GPU (a model loaded, a pressure test)."""
        self.others_bytes[gpu] = max(0, nbytes)

    def info(self, gpu: int) -> MemoryInfo | None:
        if not 0 <= gpu < self.gpus:
            return None
        used = self.others_bytes.get(gpu, 0) + self.used_by_us(gpu)
        return MemoryInfo(max(0, self.total_bytes - used), self.total_bytes)

    def close(self) -> None:
        pass


class NvmlMemory:
    """Free memory of the sidecar's GPUs, by PCI bus id (the sidecar's index -> NVML handle)."""

    def __init__(self, bus_ids: Mapping[int, str]) -> None:
        import pynvml

        self._nvml = pynvml
        pynvml.nvmlInit()
        self._handles = {}
        try:
            for gpu, bus in bus_ids.items():
                self._handles[gpu] = pynvml.nvmlDeviceGetHandleByPciBusId(bus.upper())
        except Exception:
            pynvml.nvmlShutdown()
            raise
        self._warned = False

    def info(self, gpu: int) -> MemoryInfo | None:
        handle = self._handles.get(gpu)
        if handle is None:
            return None
        try:
            mem = self._nvml.nvmlDeviceGetMemoryInfo(handle)
        except Exception as e:  # noqa: BLE001 - a GPU NVML can't read: keep the last cap, say so once
            if not self._warned:
                logger.warning("NVML cannot read GPU %d's memory (%s): its pool is capped by its limit only", gpu, e)
                self._warned = True
            return None
        return MemoryInfo(int(mem.free), int(mem.total))

    def close(self) -> None:
        try:
            self._nvml.nvmlShutdown()
        except Exception:  # noqa: BLE001 - shutting down anyway
            pass
