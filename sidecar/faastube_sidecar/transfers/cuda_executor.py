"""Executes the scheduler's chunk copies on CUDA streams (CuPy, imported lazily).

One stream per directional link, on the device that drives it (H2D/D2H: that
GPU; P2P: the source GPU), so copies of one link stay in order and copies of
different links overlap. A multi-hop chunk (host -> relay GPU -> target, or
GPU -> relay -> GPU, or GPU -> relay -> host) lands in a preallocated staging slot
on each relay; an event recorded after each hop makes the next hop's stream wait,
and the slot is reused only after an event says its forwarding hop finished.
Everything works on raw pointers, so buffers may come from any allocator (CuPy,
torch, cuda.core pools, the pinned host ring).

The link streams are non-blocking, so on their own they would not wait for work
the caller queued on the default stream (e.g. the kernel that fills the source):
a copy could read the source before it is written. So each transfer's first chunk
records an event on the legacy default stream of its source and destination GPUs
(which also covers the blocking and per-thread default streams), and every chunk's
first hop waits on it. Work on the caller's own non-blocking streams must be
finished (or synchronized) before submitting; the executor cannot see it.

Completion is found by polling each in-flight chunk's last event (``poll``), from
the one thread that drives the scheduler (``CudaTransferEngine``). Host callbacks
(``cudaLaunchHostFunc``) would need the GIL on a driver thread, which risks
deadlocks with Python threads inside CUDA calls; polling cannot deadlock.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Sequence
from typing import Any

from faastube_sidecar.transfers.scheduler import (
    HOST,
    Chunk,
    ChunkDone,
    Hop,
    LinkId,
    LinkKind,
    LinkSpec,
    SchedulerSettings,
    TransferError,
    TransferRequest,
    TransferResult,
    TransferScheduler,
)

logger = logging.getLogger(__name__)

_H2D = 1  # cudaMemcpyHostToDevice
_D2H = 2  # cudaMemcpyDeviceToHost
_STREAM_LEGACY = 1  # cudaStreamLegacy: the current device's implicit default stream


@dataclasses.dataclass(frozen=True)
class StagingSettings:
    # 3 slots of 16 MiB per relay reached 144 GB/s over 3 paths in the probe.
    slots_per_relay: int = 3
    slot_bytes: int = 16 << 20


class MonotonicClock:
    def now_s(self) -> float:
        return time.perf_counter()


def node_links(gpus: Sequence[int], *, pcie_bandwidth_bytes_per_s: float,
               p2p_bandwidth_bytes_per_s: float, p2p_kind: LinkKind = "nvlink",
               chunk_bytes: int | None = None) -> list[LinkSpec]:
    """Links of a node whose GPU pairs all share one kind of link (e.g. 4x H100 NV18)."""
    links: list[LinkSpec] = []
    for g in gpus:
        links.append(LinkSpec(LinkId(f"h2d:{g}"), pcie_bandwidth_bytes_per_s, "pcie", chunk_bytes))
        links.append(LinkSpec(LinkId(f"d2h:{g}"), pcie_bandwidth_bytes_per_s, "pcie", chunk_bytes))
        for h in gpus:
            if h != g:
                links.append(LinkSpec(LinkId(f"p2p:{g}->{h}"), p2p_bandwidth_bytes_per_s, p2p_kind,
                                      chunk_bytes))
    return links


@dataclasses.dataclass(eq=False)
class _Slot:
    ptr: int
    free_event: Any = None  # the event after which the slot's last reader is done


@dataclasses.dataclass(eq=False)
class _InFlight:
    chunk: Chunk
    done_event: Any
    on_done: ChunkDone


class CudaChunkExecutor:
    """The scheduler's ``ChunkExecutor`` on CUDA streams; call ``close()`` when done."""

    def __init__(self, gpus: Sequence[int], *, staging: StagingSettings | None = None) -> None:
        import cupy

        self._cp = cupy
        self._rt = cupy.cuda.runtime
        self._gpus = tuple(gpus)
        count = self._rt.getDeviceCount()
        for i, g in enumerate(self._gpus):
            if not 0 <= g < count:
                raise TransferError(f"gpus[{i}]: GPU {g} does not exist ({count} visible)")
        self._staging = staging or StagingSettings()
        self._streams: dict[LinkId, Any] = {}
        self._slots: dict[int, list[_Slot]] = {}
        self._slot_next: dict[int, int] = {}
        self._staging_mem: list[Any] = []
        self._inflight: list[_InFlight] = []
        # transfer id -> events after the work queued on its GPUs' default streams
        # before its first chunk; dropped once done (later chunks then need no wait).
        self._ready: dict[str, list[Any]] = {}
        for a in self._gpus:
            for b in self._gpus:
                if a != b and self._rt.deviceCanAccessPeer(a, b):
                    with cupy.cuda.Device(a):
                        try:
                            self._rt.deviceEnablePeerAccess(b)
                        except cupy.cuda.runtime.CUDARuntimeError as e:
                            if "AlreadyEnabled" not in str(e):
                                raise

    @property
    def max_relay_chunk_bytes(self) -> int:
        return self._staging.slot_bytes

    def _device_of(self, hop: Hop) -> int:
        return int(hop.dst) if hop.src == HOST else int(hop.src)

    def _stream(self, hop: Hop) -> Any:
        stream = self._streams.get(hop.link)
        if stream is None:
            with self._cp.cuda.Device(self._device_of(hop)):
                stream = self._cp.cuda.Stream(non_blocking=True)
            self._streams[hop.link] = stream
        return stream

    def _slot(self, gpu: int) -> _Slot:
        slots = self._slots.get(gpu)
        if slots is None:
            if gpu not in self._gpus:
                raise TransferError(f"relay GPU {gpu} is not managed by this executor")
            with self._cp.cuda.Device(gpu):
                mem = self._cp.cuda.alloc(self._staging.slots_per_relay * self._staging.slot_bytes)
            self._staging_mem.append(mem)
            slots = [_Slot(mem.ptr + i * self._staging.slot_bytes)
                     for i in range(self._staging.slots_per_relay)]
            self._slots[gpu] = slots
            self._slot_next[gpu] = 0
        i = self._slot_next[gpu]
        self._slot_next[gpu] = (i + 1) % len(slots)
        return slots[i]

    def preallocate_staging(self, relays: Sequence[int]) -> None:
        """Allocate relays' slots now, outside any timed or latency-critical path."""
        for r in relays:
            if r not in self._slots:
                self._slot(r)
                self._slot_next[r] = 0

    def _record(self, stream: Any) -> Any:
        event = self._cp.cuda.Event(block=False, disable_timing=True)
        event.record(stream)
        return event

    def _ready_events(self, chunk: Chunk) -> list[Any]:
        """Events the chunk's first hop waits on: its transfer's buffers are written."""
        if chunk.seq == 0:  # the scheduler numbers a transfer's chunks in issue order
            events = []
            gpus = {chunk.hops[0].src, chunk.hops[-1].dst} - {HOST}
            for gpu in sorted(int(g) for g in gpus):
                with self._cp.cuda.Device(gpu):
                    event = self._cp.cuda.Event(block=False, disable_timing=True)
                    self._rt.eventRecord(event.ptr, _STREAM_LEGACY)
                events.append(event)
            self._ready[chunk.transfer_id] = events
            return events
        events = self._ready.get(chunk.transfer_id, [])
        if events and all(e.done for e in events):
            del self._ready[chunk.transfer_id]
            return []
        return events

    def issue(self, chunk: Chunk, on_done: ChunkDone) -> None:
        if len(chunk.hops) > 1 and chunk.size_bytes > self._staging.slot_bytes:
            raise TransferError(f"chunk {chunk.transfer_id}#{chunk.seq}: {chunk.size_bytes} bytes "
                                f"exceed the staging slot ({self._staging.slot_bytes}); "
                                f"lower the relay links' chunk_bytes")
        src_ptr = chunk.src_address + chunk.offset_bytes
        ready = self._ready_events(chunk)
        prev_event: Any = None
        src_slot: _Slot | None = None
        n = chunk.size_bytes
        for i, hop in enumerate(chunk.hops):
            last = i == len(chunk.hops) - 1
            stream = self._stream(hop)
            dst_slot = None if last else self._slot(int(hop.dst))
            dst_ptr = chunk.dst_address + chunk.offset_bytes if dst_slot is None else dst_slot.ptr
            with self._cp.cuda.Device(self._device_of(hop)):
                if i == 0:
                    for event in ready:
                        stream.wait_event(event)
                if prev_event is not None:
                    stream.wait_event(prev_event)
                if dst_slot is not None and dst_slot.free_event is not None:
                    stream.wait_event(dst_slot.free_event)
                if hop.src == HOST:
                    self._rt.memcpyAsync(dst_ptr, src_ptr, n, _H2D, stream.ptr)
                elif hop.dst == HOST:
                    self._rt.memcpyAsync(dst_ptr, src_ptr, n, _D2H, stream.ptr)
                else:
                    self._rt.memcpyPeerAsync(dst_ptr, int(hop.dst), src_ptr, int(hop.src), n,
                                             stream.ptr)
                prev_event = self._record(stream)
            if src_slot is not None:
                src_slot.free_event = prev_event  # its data has been forwarded
            src_slot, src_ptr = dst_slot, dst_ptr
        self._inflight.append(_InFlight(chunk, prev_event, on_done))

    @property
    def inflight_chunks(self) -> int:
        return len(self._inflight)

    def poll(self) -> int:
        """Report finished chunks to their ``on_done``; returns how many finished."""
        if not self._inflight:
            return 0
        finished = [f for f in self._inflight if f.done_event.done]
        if finished:
            done_ids = {id(f) for f in finished}
            self._inflight = [f for f in self._inflight if id(f) not in done_ids]
            for tid in [t for t, events in self._ready.items() if all(e.done for e in events)]:
                del self._ready[tid]
            for f in finished:
                f.on_done(f.chunk)  # may issue more chunks
        return len(finished)

    def synchronize(self) -> None:
        for stream in self._streams.values():
            stream.synchronize()

    def close(self) -> None:
        try:
            self.synchronize()
        except Exception:  # cleanup must not raise; the context may already be gone
            logger.exception("cuda executor: synchronize at close failed")
        self._inflight.clear()
        self._ready.clear()
        self._slots.clear()
        self._staging_mem.clear()
        self._streams.clear()


def run_to_completion(scheduler: TransferScheduler, executor: CudaChunkExecutor) -> None:
    """Drive ``scheduler`` on this thread until no transfer is left."""
    while scheduler.busy:
        if executor.poll() == 0:
            time.sleep(0)  # let other Python threads run; the copies run on the GPU


class CudaTransferEngine:
    """Scheduler + CUDA executor on one driver thread; ``submit`` from any thread."""

    def __init__(self, gpus: Sequence[int], links: Sequence[LinkSpec], *,
                 settings: SchedulerSettings | None = None,
                 staging: StagingSettings | None = None) -> None:
        self._executor = CudaChunkExecutor(gpus, staging=staging)
        self._scheduler = TransferScheduler(links, executor=self._executor, clock=MonotonicClock(),
                                            settings=settings)
        self._requests: queue.SimpleQueue[
            tuple[TransferRequest, concurrent.futures.Future[TransferResult]] | None
        ] = queue.SimpleQueue()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="faastube-transfers", daemon=True)
        self._thread.start()

    @property
    def scheduler(self) -> TransferScheduler:
        return self._scheduler

    @property
    def executor(self) -> CudaChunkExecutor:
        return self._executor

    def submit(self, request: TransferRequest) -> concurrent.futures.Future[TransferResult]:
        if self._stopping:
            raise TransferError("transfer engine is closed")
        future: concurrent.futures.Future[TransferResult] = concurrent.futures.Future()
        self._requests.put((request, future))
        return future

    def _accept(self, item: tuple[TransferRequest, concurrent.futures.Future[TransferResult]]) -> None:
        request, future = item
        try:
            self._scheduler.submit(request, future.set_result)
        except Exception as e:  # reported to the caller through its future
            future.set_exception(e)

    def _loop(self) -> None:
        while True:
            if not self._scheduler.busy:
                item = self._requests.get()  # idle: block until work or close
                if item is None:
                    return
                self._accept(item)
                continue
            while True:
                try:
                    item = self._requests.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self._requests.put(None)  # finish in-flight work first, then stop
                    break
                self._accept(item)
            try:
                if self._executor.poll() == 0:
                    time.sleep(0)
            except Exception:
                logger.exception("transfer engine: polling CUDA events failed")
                raise

    def close(self, timeout_s: float = 30.0) -> None:
        self._stopping = True
        self._requests.put(None)
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            logger.warning("transfer engine: still busy after %.1fs at close", timeout_s)
            return
        self._executor.close()

    def __enter__(self) -> CudaTransferEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
