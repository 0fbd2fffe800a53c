"""GPU health: is each GPU of this node usable right now?

The device plugin reports health to the kubelet (ListAndWatch) and the node publisher
reports it in the GpuNode status. Both read it from one :class:`HealthMonitor`, which
polls a :class:`GpuHealthSource` in a worker thread, because NVML calls block.

The NVML source never creates a CUDA context (every context costs hundreds of MB of
GPU memory, see gpu-facts.md pitfall 4). Unlike NVIDIA's plugin, a GPU marked
unhealthy by an XID error becomes healthy again once no critical XID has been seen for
``xid_hold_s`` and NVML still answers for it: a device that can never come back would
need a daemon restart after every transient fault.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

logger = logging.getLogger(__name__)

# XIDs caused by applications, not by the GPU (NVIDIA's plugin skips the same set):
# 13 graphics engine exception, 31 MMU fault, 43 reset channel, 45 preemptive cleanup,
# 68 video decoder exception, 109 context switch timeout.
APPLICATION_XIDS = frozenset({13, 31, 43, 45, 68, 109})


@dataclass(frozen=True)
class GpuHealth:
    """One GPU's state at the last poll; ``free_memory_bytes`` is None when unknown."""

    uuid: str
    healthy: bool
    reason: str = ""
    free_memory_bytes: int | None = None

    def same_health(self, other: GpuHealth) -> bool:
        """Whether the two differ only in memory figures (no health change to announce)."""
        return self.healthy == other.healthy and self.reason == other.reason


class GpuHealthSource(Protocol):
    """Where health comes from. ``poll`` blocks at most ``timeout_s`` (it may return early
    when something changed) and returns one entry per requested UUID."""

    def poll(self, uuids: Sequence[str], *, timeout_s: float) -> Mapping[str, GpuHealth]: ...

    def close(self) -> None: ...


class FixedHealthSource:
    """Health set by the caller: for nodes without NVML (host backend, simulated topologies)
    and for an administrator's manual override. GPUs start healthy."""

    def __init__(self, free_memory_bytes: Mapping[str, int] | None = None) -> None:
        self._lock = threading.Lock()
        self._changed = threading.Event()
        self._free = dict(free_memory_bytes or {})
        self._state: dict[str, GpuHealth] = {}

    def set_health(self, uuid: str, healthy: bool, reason: str = "") -> None:
        with self._lock:
            self._state[uuid] = GpuHealth(uuid, healthy, reason, self._free.get(uuid))
        self._changed.set()

    def poll(self, uuids: Sequence[str], *, timeout_s: float) -> Mapping[str, GpuHealth]:
        # Block like NVML's event wait does, but wake as soon as set_health() is called.
        self._changed.wait(timeout_s)
        self._changed.clear()
        with self._lock:
            return {
                u: self._state.get(u, GpuHealth(u, True, "", self._free.get(u))) for u in uuids
            }

    def close(self) -> None:
        self._changed.set()


class NvmlHealthSource:
    """Health from NVML: a GPU is unhealthy while NVML cannot find it by UUID, cannot read
    its memory, or reported a critical XID in the last ``xid_hold_s`` seconds."""

    def __init__(self, *, xid_hold_s: float = 60.0) -> None:
        import pynvml  # imported here: the sidecar runs without NVML on CPU-only nodes

        self._nvml: Any = pynvml
        pynvml.nvmlInit()
        self._xid_hold_s = xid_hold_s
        self._events: Any = pynvml.nvmlEventSetCreate()
        self._registered: set[str] = set()
        self._last_xid: dict[str, tuple[float, int]] = {}  # uuid -> (monotonic time, xid)
        self._closed = False

    def poll(self, uuids: Sequence[str], *, timeout_s: float) -> Mapping[str, GpuHealth]:
        nvml = self._nvml
        probe: dict[str, GpuHealth] = {}
        for uuid in uuids:
            try:
                handle = nvml.nvmlDeviceGetHandleByUUID(uuid)
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            except nvml.NVMLError as e:
                # Forget the registration: a GPU that comes back has a new handle.
                self._registered.discard(uuid)
                probe[uuid] = GpuHealth(uuid, False, f"NVML cannot reach the GPU: {e}")
                continue
            self._register_events(uuid, handle)
            probe[uuid] = GpuHealth(uuid, True, "", int(memory.free))
        self._wait_for_xids(timeout_s)
        now = time.monotonic()
        result: dict[str, GpuHealth] = {}
        for uuid, health in probe.items():
            last = self._last_xid.get(uuid)
            if health.healthy and last is not None and now - last[0] < self._xid_hold_s:
                health = replace(health, healthy=False, reason=f"critical XID {last[1]}")
            result[uuid] = health
        return result

    def _register_events(self, uuid: str, handle: Any) -> None:
        if uuid in self._registered:
            return
        nvml = self._nvml
        try:
            nvml.nvmlDeviceRegisterEvents(handle, nvml.nvmlEventTypeXidCriticalError, self._events)
        except nvml.NVMLError_NotSupported:
            logger.info("GPU %s does not report XID events; health uses NVML queries only", uuid)
        except nvml.NVMLError as e:
            logger.warning("cannot watch XID events of GPU %s: %s", uuid, e)
            return
        self._registered.add(uuid)

    def _wait_for_xids(self, timeout_s: float) -> None:
        nvml = self._nvml
        timeout_ms = max(0, int(timeout_s * 1000))
        while True:
            try:
                data = nvml.nvmlEventSetWait_v2(self._events, timeout_ms)
            except nvml.NVMLError_Timeout:
                return
            except nvml.NVMLError as e:
                logger.warning("waiting for NVML events failed: %s", e)
                return
            timeout_ms = 0  # drain whatever else is queued, then return
            xid = int(data.eventData)
            if data.eventType != nvml.nvmlEventTypeXidCriticalError or xid in APPLICATION_XIDS:
                continue
            try:
                uuid = str(nvml.nvmlDeviceGetUUID(data.device))
            except nvml.NVMLError:
                continue
            logger.warning("GPU %s reported critical XID %d", uuid, xid)
            self._last_xid[uuid] = (time.monotonic(), xid)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._nvml.nvmlEventSetFree(self._events)
            self._nvml.nvmlShutdown()
        except Exception as e:  # never raise from cleanup
            logger.debug("NVML shutdown failed: %s", e)


class HealthMonitor:
    """Polls a source in a worker thread and tells waiters when any GPU's health changes.

    ``version`` counts health changes; a waiter remembers the version it has seen and
    calls :meth:`wait_for_change` to sleep until a newer one exists.
    """

    def __init__(
        self, source: GpuHealthSource, uuids: Sequence[str], *, interval_s: float = 5.0
    ) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be positive, got {interval_s}")
        self._source = source
        self._uuids = tuple(uuids)
        self._interval_s = interval_s
        self._state: dict[str, GpuHealth] = {u: GpuHealth(u, True) for u in self._uuids}
        self._version = 0
        self._changed = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    @property
    def version(self) -> int:
        return self._version

    def current(self) -> Mapping[str, GpuHealth]:
        return dict(self._state)

    async def start(self) -> None:
        """Poll once (so the first answers are real), then keep polling in the background."""
        if self._task is not None:
            return
        self._stopping = False
        await self._apply(await asyncio.to_thread(self._source.poll, self._uuids, timeout_s=0.0))
        self._task = asyncio.create_task(self._run(), name="gpu-health-monitor")

    async def stop(self) -> None:
        self._stopping = True
        self._source.close()
        if self._task is not None:
            # The worker thread returns within one interval; wait for it so the source
            # is not used after stop() returns.
            await asyncio.wait({self._task}, timeout=self._interval_s + 1.0)
            self._task.cancel()
            self._task = None
        async with self._changed:
            self._changed.notify_all()

    async def wait_for_change(self, seen_version: int) -> int:
        """Return once ``version`` exceeds ``seen_version`` (or the monitor stops)."""
        async with self._changed:
            await self._changed.wait_for(lambda: self._version > seen_version or self._stopping)
            return self._version

    async def _run(self) -> None:
        while not self._stopping:
            try:
                reports = await asyncio.to_thread(
                    self._source.poll, self._uuids, timeout_s=self._interval_s
                )
            except Exception as e:  # a broken source must not stop health reporting
                logger.exception("GPU health poll failed")
                reports = {u: GpuHealth(u, False, f"health poll failed: {e}") for u in self._uuids}
                await asyncio.sleep(self._interval_s)  # back off before the next try
            if not self._stopping:
                await self._apply(reports)

    async def _apply(self, reports: Mapping[str, GpuHealth]) -> None:
        changed = False
        for uuid in self._uuids:
            new = reports.get(uuid, GpuHealth(uuid, False, "missing from the health report"))
            old = self._state[uuid]
            if not new.same_health(old):
                changed = True
                logger.info(
                    "GPU %s is now %s%s", uuid, "healthy" if new.healthy else "unhealthy",
                    f" ({new.reason})" if new.reason else "",
                )
            self._state[uuid] = new
        if changed:
            async with self._changed:
                self._version += 1
                self._changed.notify_all()
