"""Executes the scheduler's chunk copies on CUDA streams (CuPy, imported lazily).

Three ways a copy runs, cheapest first:

- ``DirectCopier``: a transfer whose plan is one direct link is one ``cudaMemcpyAsync``
  issued by the caller's own thread, on a *blocking* stream of the GPU that drives it.
  Nothing else: no engine thread, no chunks, no staging, so it costs what a user's own
  pinned copy costs (the 1 MiB copy that took 225 us through the scheduler takes ~30 us).
- A direct chunk (one hop) goes on its link's stream: one stream per directional link, on
  the device that drives it (H2D/D2H: that GPU; P2P: the source GPU), so copies of one
  link stay in order and copies of different links overlap.
- A chunk over one relay GPU (host -> relay -> target, target -> relay -> host, GPU ->
  relay -> GPU) goes through a *lane* of that relay: a staging slot with its own stream
  on the relay, which runs both hops. The relay does its path's work with its own copy
  engines (for GPU -> host it pulls over NVLink rather than the source pushing, so the
  source's engines serve only its own PCIe link, as in the host -> GPU direction), a
  stream's order is all the ordering the two hops and the slot's reuse need (no events
  between hops), and successive chunks take successive lanes, so one lane's forward hop
  overlaps the next lane's PCIe hop. Lanes are per (relay, direction) so that host -> GPU
  and GPU -> host relays through one GPU do not queue behind each other.
- Longer paths (two relays) land in round-robin staging slots, one per relay; an event
  recorded after each hop makes the next hop's stream wait, and a slot is reused only
  after an event says its forwarding hop finished.
Everything works on raw pointers, so buffers may come from any allocator (CuPy, torch,
cuda.core pools, the pinned host ring).

Ordering after the caller's work. The link and lane streams are non-blocking, so on their
own they would not wait for work the caller queued on the default stream (e.g. the kernel
that fills the source): a copy could read the source before it is written. So each
transfer's first chunk records an event on the legacy default stream of its source and
destination GPUs (which also covers the blocking and per-thread default streams), and
every chunk's first hop waits on it until it has fired. A direct copy gets the same order
from its blocking stream (and, for a peer copy, an event on the other GPU's legacy
stream). Work on the caller's own non-blocking streams must be finished (or synchronized)
before submitting; the executor cannot see it.

Completion is found by polling each in-flight chunk's last event (``poll``), from the
engine's thread. Host callbacks (``cudaLaunchHostFunc``) would need the GIL on a driver
thread, which risks deadlocks with Python threads inside CUDA calls; polling cannot
deadlock. ``CudaTransferEngine`` lets the submitting thread issue a transfer's first
chunks itself, under the engine's lock, so bytes start moving without waiting for the
engine thread to wake up; that thread then issues the rest as chunks complete.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import threading
import time
from collections.abc import Sequence
from typing import Any, Literal

from faastube_sidecar.transfers.scheduler import (
    HOST,
    Chunk,
    ChunkDone,
    Endpoint,
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

LaneKind = Literal["h2d", "d2h", "p2p"]


@dataclasses.dataclass(frozen=True)
class StagingSettings:
    """Staging on relay GPUs: ``slots_per_relay`` lanes of ``slot_bytes`` per direction.

    A relayed chunk must fit a slot. 3 slots of 16 MiB per relay reached 144 GB/s over 3
    paths in the H100 probe; two chunks in flight per link need 2 lanes, the third lets a
    new chunk start while the oldest lane still forwards.
    """

    slots_per_relay: int = 3
    slot_bytes: int = 16 << 20
    # False: one-relay chunks take the event-chained path too (each hop on its link's
    # stream, GPU -> host pushed by the source), as before lanes; kept to compare them.
    relay_lanes: bool = True

    def __post_init__(self) -> None:
        if self.slots_per_relay < 1:
            raise TransferError(f"slots_per_relay: must be >= 1, got {self.slots_per_relay}")
        if self.slot_bytes < 1:
            raise TransferError(f"slot_bytes: must be >= 1, got {self.slot_bytes}")


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


def _driving_device(hop: Hop) -> int:
    """The GPU whose stream runs a single-hop copy: the GPU end, or the source of a peer copy."""
    return int(hop.dst) if hop.src == HOST else int(hop.src)


def _copy(rt: Any, hop: Hop, dst_ptr: int, src_ptr: int, nbytes: int, stream_ptr: int) -> None:
    if hop.src == HOST:
        rt.memcpyAsync(dst_ptr, src_ptr, nbytes, _H2D, stream_ptr)
    elif hop.dst == HOST:
        rt.memcpyAsync(dst_ptr, src_ptr, nbytes, _D2H, stream_ptr)
    else:
        rt.memcpyPeerAsync(dst_ptr, int(hop.dst), src_ptr, int(hop.src), nbytes, stream_ptr)


def _lane_kind(hops: Sequence[Hop]) -> LaneKind:
    if hops[0].src == HOST:
        return "h2d"
    if hops[-1].dst == HOST:
        return "d2h"
    return "p2p"


@dataclasses.dataclass(eq=False)
class _Slot:
    ptr: int
    free_event: Any = None  # the event after which the slot's last reader is done


@dataclasses.dataclass(eq=False)
class _Lane:
    """A staging slot on a relay GPU and the stream that runs both hops through it."""

    ptr: int
    stream: Any


@dataclasses.dataclass(eq=False)
class _InFlight:
    chunk: Chunk
    done_event: Any
    on_done: ChunkDone


class CudaChunkExecutor:
    """The scheduler's ``ChunkExecutor`` on CUDA streams; call ``close()`` when done.

    Not thread-safe: one thread at a time issues and polls (``CudaTransferEngine`` holds
    its lock around both).
    """

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
        self._lanes: dict[tuple[int, LaneKind], list[_Lane]] = {}
        self._lane_next: dict[tuple[int, LaneKind], int] = {}
        self._slots: dict[int, list[_Slot]] = {}
        self._slot_next: dict[int, int] = {}
        self._staging_mem: list[Any] = []
        self._inflight: list[_InFlight] = []
        # transfer id -> events after the work queued on its GPUs' default streams
        # before its first chunk; dropped once done (later chunks then need no wait).
        self._ready: dict[str, list[Any]] = {}
        _enable_peer_access(cupy, self._gpus)

    @property
    def max_relay_chunk_bytes(self) -> int:
        return self._staging.slot_bytes

    def _stream(self, hop: Hop) -> Any:
        stream = self._streams.get(hop.link)
        if stream is None:
            with self._cp.cuda.Device(_driving_device(hop)):
                stream = self._cp.cuda.Stream(non_blocking=True)
            self._streams[hop.link] = stream
        return stream

    def _check_relay(self, gpu: int) -> None:
        if gpu not in self._gpus:
            raise TransferError(f"relay GPU {gpu} is not managed by this executor")

    def _lane(self, relay: int, kind: LaneKind) -> _Lane:
        key = (relay, kind)
        lanes = self._lanes.get(key)
        if lanes is None:
            self._check_relay(relay)
            n, size = self._staging.slots_per_relay, self._staging.slot_bytes
            with self._cp.cuda.Device(relay):
                mem = self._cp.cuda.alloc(n * size)
                lanes = [_Lane(mem.ptr + i * size, self._cp.cuda.Stream(non_blocking=True))
                         for i in range(n)]
            self._staging_mem.append(mem)
            self._lanes[key] = lanes
            self._lane_next[key] = 0
        i = self._lane_next[key]
        self._lane_next[key] = (i + 1) % len(lanes)
        return lanes[i]

    def _slot(self, gpu: int) -> _Slot:
        slots = self._slots.get(gpu)
        if slots is None:
            self._check_relay(gpu)
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

    def preallocate_staging(self, relays: Sequence[int],
                            kinds: Sequence[LaneKind] = ("h2d", "d2h")) -> None:
        """Allocate relays' lanes now, outside any timed or latency-critical path."""
        for r in relays:
            for kind in kinds:
                if (r, kind) not in self._lanes:
                    self._lane(r, kind)
                    self._lane_next[(r, kind)] = 0

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
        ready = self._ready_events(chunk)
        if len(chunk.hops) == 1:
            done = self._issue_direct(chunk, ready)
        elif len(chunk.hops) == 2 and self._staging.relay_lanes:
            done = self._issue_lane(chunk, ready)
        else:
            done = self._issue_chained(chunk, ready)
        self._inflight.append(_InFlight(chunk, done, on_done))

    def _issue_direct(self, chunk: Chunk, ready: list[Any]) -> Any:
        hop = chunk.hops[0]
        stream = self._stream(hop)
        with self._cp.cuda.Device(_driving_device(hop)):
            for event in ready:
                stream.wait_event(event)
            _copy(self._rt, hop, chunk.dst_address + chunk.offset_bytes,
                  chunk.src_address + chunk.offset_bytes, chunk.size_bytes, stream.ptr)
            return self._record(stream)

    def _issue_lane(self, chunk: Chunk, ready: list[Any]) -> Any:
        first, second = chunk.hops
        relay = int(first.dst)
        lane = self._lane(relay, _lane_kind(chunk.hops))
        with self._cp.cuda.Device(relay):
            for event in ready:
                lane.stream.wait_event(event)
            _copy(self._rt, first, lane.ptr, chunk.src_address + chunk.offset_bytes,
                  chunk.size_bytes, lane.stream.ptr)
            _copy(self._rt, second, chunk.dst_address + chunk.offset_bytes, lane.ptr,
                  chunk.size_bytes, lane.stream.ptr)
            return self._record(lane.stream)

    def _issue_chained(self, chunk: Chunk, ready: list[Any]) -> Any:
        src_ptr = chunk.src_address + chunk.offset_bytes
        prev_event: Any = None
        src_slot: _Slot | None = None
        n = chunk.size_bytes
        for i, hop in enumerate(chunk.hops):
            last = i == len(chunk.hops) - 1
            stream = self._stream(hop)
            dst_slot = None if last else self._slot(int(hop.dst))
            dst_ptr = chunk.dst_address + chunk.offset_bytes if dst_slot is None else dst_slot.ptr
            with self._cp.cuda.Device(_driving_device(hop)):
                if i == 0:
                    for event in ready:
                        stream.wait_event(event)
                if prev_event is not None:
                    stream.wait_event(prev_event)
                if dst_slot is not None and dst_slot.free_event is not None:
                    stream.wait_event(dst_slot.free_event)
                _copy(self._rt, hop, dst_ptr, src_ptr, n, stream.ptr)
                prev_event = self._record(stream)
            if src_slot is not None:
                src_slot.free_event = prev_event  # its data has been forwarded
            src_slot, src_ptr = dst_slot, dst_ptr
        return prev_event

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
        for lanes in self._lanes.values():
            for lane in lanes:
                lane.stream.synchronize()

    def close(self) -> None:
        try:
            self.synchronize()
        except Exception:  # cleanup must not raise; the context may already be gone
            logger.exception("cuda executor: synchronize at close failed")
        self._inflight.clear()
        self._ready.clear()
        self._slots.clear()
        self._lanes.clear()
        self._staging_mem.clear()
        self._streams.clear()


def _enable_peer_access(cupy: Any, gpus: Sequence[int]) -> None:
    rt = cupy.cuda.runtime
    for a in gpus:
        for b in gpus:
            if a != b and rt.deviceCanAccessPeer(a, b):
                with cupy.cuda.Device(a):
                    try:
                        rt.deviceEnablePeerAccess(b)
                    except rt.CUDARuntimeError as e:
                        if "AlreadyEnabled" not in str(e) and "ALREADY" not in str(e).upper():
                            raise


@dataclasses.dataclass(frozen=True)
class _DirectLink:
    device: int   # the GPU whose stream runs the copy
    stream: Any
    kind: int     # cudaMemcpyKind for host copies; 0 for a peer copy
    src: int      # peer copies: the source GPU
    dst: int      # peer copies: the destination GPU


class DirectCopier:
    """One ``cudaMemcpyAsync`` per copy, issued on the caller's thread; thread-safe.

    For transfers whose plan is a single direct link (``planner.Plan.direct``). The copy
    runs on a blocking stream of the driving GPU (one per endpoint pair), which orders it
    after the work queued on that GPU's legacy default stream without any extra call; a
    peer copy also waits on an event recorded on the other GPU's legacy stream.
    ``issue`` returns the stream: synchronizing it waits for this copy (and for copies
    other threads issued on the same pair after it), like a user's own copy on their
    stream. ``copy`` also records an event after the copy, for waiting on exactly it.
    Everything else is looked up once per endpoint pair.
    """

    def __init__(self, gpus: Sequence[int]) -> None:
        import cupy

        self._cp = cupy
        self._rt = cupy.cuda.runtime
        self._gpus = tuple(gpus)
        self._links: dict[tuple[Endpoint, Endpoint], _DirectLink] = {}
        self._lock = threading.Lock()  # guards lazily created peer links
        for g in self._gpus:
            self._link(HOST, g)
            self._link(g, HOST)

    def _link(self, src: Endpoint, dst: Endpoint) -> _DirectLink:
        link = self._links.get((src, dst))
        if link is not None:
            return link
        hop = Hop(src, dst)
        _ = hop.link  # validates the pair
        for end in (src, dst):
            if end != HOST and end not in self._gpus:
                raise TransferError(f"GPU {end} is not managed by this copier")
        with self._lock:
            link = self._links.get((src, dst))
            if link is None:
                device = _driving_device(hop)
                with self._cp.cuda.Device(device):
                    stream = self._cp.cuda.Stream(non_blocking=False)
                kind = _H2D if src == HOST else _D2H if dst == HOST else 0
                link = _DirectLink(device, stream, kind, -1 if src == HOST else int(src),
                                   -1 if dst == HOST else int(dst))
                self._links[(src, dst)] = link
        return link

    def link(self, src: Endpoint, dst: Endpoint) -> _DirectLink:
        """The stream and copy kind for ``src -> dst`` (created on first use)."""
        return self._links.get((src, dst)) or self._link(src, dst)

    def issue(self, link: _DirectLink, *, src_address: int, dst_address: int, nbytes: int) -> Any:
        """Issue one copy over ``link``; returns its stream."""
        if nbytes <= 0:
            raise TransferError(f"nbytes: must be > 0, got {nbytes}")
        cp, rt = self._cp, self._rt
        if link.kind:
            with cp.cuda.Device(link.device):
                rt.memcpyAsync(dst_address, src_address, nbytes, link.kind, link.stream.ptr)
            return link.stream
        # The destination GPU's default-stream work (e.g. a kernel still reading the old
        # contents) is not covered by the source's blocking stream.
        with cp.cuda.Device(link.dst):
            other = cp.cuda.Event(block=False, disable_timing=True)
            rt.eventRecord(other.ptr, _STREAM_LEGACY)
        with cp.cuda.Device(link.device):
            link.stream.wait_event(other)
            rt.memcpyPeerAsync(dst_address, link.dst, src_address, link.src, nbytes, link.stream.ptr)
        return link.stream

    def copy(self, *, src: Endpoint, dst: Endpoint, src_address: int, dst_address: int,
             nbytes: int) -> Any:
        """Issue the copy and return an event recorded right after it."""
        link = self.link(src, dst)
        stream = self.issue(link, src_address=src_address, dst_address=dst_address, nbytes=nbytes)
        with self._cp.cuda.Device(link.device):
            event = self._cp.cuda.Event(block=False, disable_timing=True)
            self._rt.eventRecord(event.ptr, stream.ptr)
        return event

    def synchronize(self) -> None:
        for link in list(self._links.values()):
            link.stream.synchronize()


def run_to_completion(scheduler: TransferScheduler, executor: CudaChunkExecutor) -> None:
    """Drive ``scheduler`` on this thread until no transfer is left."""
    while scheduler.busy:
        if executor.poll() == 0:
            time.sleep(0)  # let other Python threads run; the copies run on the GPU


class EngineClosed(TransferError):
    """The transfer engine was closed (or failed) before this transfer could run."""


class CudaTransferEngine:
    """Scheduler + CUDA executor; ``submit`` from any thread.

    ``submit`` hands the transfer to the scheduler under the engine's lock, so its first
    chunks are issued by the submitting thread at once; the engine's thread polls
    completions, issues the following chunks and completes the futures outside the lock
    (so a future's callbacks may submit again). ``watch`` completes a future when a CUDA
    event fires (for copies issued outside the scheduler, e.g. by ``DirectCopier``).
    """

    def __init__(self, gpus: Sequence[int], links: Sequence[LinkSpec], *,
                 settings: SchedulerSettings | None = None,
                 staging: StagingSettings | None = None) -> None:
        self._executor = CudaChunkExecutor(gpus, staging=staging)
        self._scheduler = TransferScheduler(links, executor=self._executor, clock=MonotonicClock(),
                                            settings=settings)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._pending: dict[str, concurrent.futures.Future[TransferResult]] = {}
        self._finished: list[tuple[concurrent.futures.Future[TransferResult], TransferResult]] = []
        self._watched: list[tuple[Any, concurrent.futures.Future[None]]] = []
        self._failure: BaseException | None = None
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="faastube-transfers", daemon=True)
        self._thread.start()

    @property
    def scheduler(self) -> TransferScheduler:
        return self._scheduler

    @property
    def executor(self) -> CudaChunkExecutor:
        return self._executor

    def _check_open(self) -> None:
        if self._failure is not None:
            raise EngineClosed(f"transfer engine failed: {self._failure}") from self._failure
        if self._stopping:
            raise EngineClosed("transfer engine is closed")

    def submit(self, request: TransferRequest) -> concurrent.futures.Future[TransferResult]:
        """Queue ``request`` and issue its first chunks now; the future gets its result."""
        future: concurrent.futures.Future[TransferResult] = concurrent.futures.Future()
        with self._lock:
            self._check_open()
            if request.transfer_id not in self._pending:  # a duplicate id fails in the scheduler
                self._pending[request.transfer_id] = future
            try:
                self._scheduler.submit(request, self._finished_one)
                failure = None
            except TransferError as e:  # a bad request: reported to the caller through its future
                if self._pending.get(request.transfer_id) is future:
                    del self._pending[request.transfer_id]
                future.set_exception(e)
                return future
            except Exception as e:  # a CUDA error while issuing: the engine cannot go on
                logger.exception("transfer engine: issuing %s failed", request.transfer_id)
                failure = e
        if failure is not None:
            self._fail(failure)  # fails this future too: it is pending
            self._wake.set()  # the engine thread sees the failure and ends
            return future
        self._wake.set()
        return future

    def _finished_one(self, result: TransferResult) -> None:
        # Called by the scheduler under the lock; futures are completed after it is released.
        future = self._pending.pop(result.transfer_id, None)
        if future is not None:
            self._finished.append((future, result))

    def watch(self, event: Any, future: concurrent.futures.Future[None]) -> None:
        """Complete ``future`` (with None) once the CUDA ``event`` has fired."""
        with self._lock:
            self._check_open()
            self._watched.append((event, future))
        self._wake.set()

    def _loop(self) -> None:
        while True:
            self._wake.clear()
            with self._lock:
                busy = self._scheduler.busy or bool(self._watched)
                if (not busy and self._stopping) or self._failure is not None:
                    return
            if not busy:
                self._wake.wait()
                continue
            try:
                with self._lock:
                    progressed = self._executor.poll()
                    fired: list[tuple[Any, concurrent.futures.Future[None]]] = []
                    if self._watched:
                        waiting: list[tuple[Any, concurrent.futures.Future[None]]] = []
                        for item in self._watched:
                            (fired if item[0].done else waiting).append(item)
                        self._watched = waiting
                    finished, self._finished = self._finished, []
            except Exception as e:  # a CUDA error: fail everything waiting rather than hang it
                logger.exception("transfer engine: polling CUDA events failed")
                self._fail(e)
                return
            for future, result in finished:
                _settle(future, result)
            for _event, watched in fired:
                _settle(watched, None)
            if not progressed and not fired:
                time.sleep(0)  # let other Python threads run; the copies run on the GPU

    def _fail(self, error: BaseException) -> None:
        with self._lock:
            self._failure = error
            waiting: list[concurrent.futures.Future[Any]] = list(self._pending.values())
            waiting += [f for _e, f in self._watched]
            finished, self._finished = self._finished, []
            self._pending.clear()
            self._watched.clear()
        for done, result in finished:  # these completed before the failure
            _settle(done, result)
        for future in waiting:
            if not future.done():
                future.set_exception(EngineClosed(f"transfer engine failed: {error}"))

    def close(self, timeout_s: float = 30.0) -> None:
        with self._lock:
            self._stopping = True
        self._wake.set()
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            logger.warning("transfer engine: still busy after %.1fs at close", timeout_s)
            return
        self._executor.close()

    def __enter__(self) -> CudaTransferEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _settle(future: concurrent.futures.Future[Any], result: Any) -> None:
    if future.done():
        return
    try:
        future.set_result(result)
    except Exception:  # a caller's done-callback must not stop the engine
        logger.exception("transfer engine: completing a future failed")
