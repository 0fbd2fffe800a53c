"""The CUDA executor's ordering logic (hops, staging slots, events) on a simulated CUDA runtime.

The GPU test of a relayed GPU -> GPU copy once found the destination's first bytes
equal to the source's *initial* fill: the source was still being written by a
kernel on the default stream when the copies, on non-blocking streams, read it.
These tests run the real scheduler and the real ``CudaChunkExecutor`` against a
small model of the CUDA semantics the executor relies on: FIFO streams, events
(a wait sees the event's latest record), the legacy default stream, and copies
that move bytes only when they run. Runnable work is executed in a seeded random
order, so any ordering the events do not enforce eventually goes wrong.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import random
import sys
import types
from collections.abc import Iterator
from typing import Any, Self

import pytest
from faastube_sidecar.transfers.cuda_executor import (
    CudaChunkExecutor,
    MonotonicClock,
    StagingSettings,
    node_links,
    run_to_completion,
)
from faastube_sidecar.transfers.scheduler import (
    HOST,
    FunctionIdentity,
    SchedulerSettings,
    TransferRequest,
    TransferScheduler,
    make_route,
)

GB = 1e9
GPUS = [0, 1, 2, 3]
SLOT_BYTES = 64 << 10
SETTINGS = SchedulerSettings(chunk_bytes=SLOT_BYTES, max_inflight_chunks_per_link=4)
STAGING = StagingSettings(slots_per_relay=3, slot_bytes=SLOT_BYTES)
SIZE = 37 * SLOT_BYTES + 12345  # many chunks per relay (slot reuse), a partial last chunk
LEGACY = 1  # cudaStreamLegacy


@dataclasses.dataclass(eq=False)
class _Region:
    base: int
    data: bytearray
    device: int | None  # None: host memory


@dataclasses.dataclass(eq=False)
class _Record:
    """One record of an event: done once the stream reaches it."""

    done: bool = False


class SimCuda:
    """What the executor uses of ``cupy``: devices, streams, events, memory, copies."""

    def __init__(self, gpus: int, seed: int) -> None:
        self.rng = random.Random(seed)
        self.gpus = gpus
        self.regions: list[_Region] = []
        self.next_address = 1 << 32
        self.current = [0]
        self.streams: dict[int, SimStream] = {}
        self.events: dict[int, SimEvent] = {}
        self.legacy = {g: self._new_stream(g) for g in range(gpus)}
        sim = self

        class Device:
            def __init__(self, index: int) -> None:
                self.index = index

            def __enter__(self) -> Self:
                sim.current.append(self.index)
                return self

            def __exit__(self, *exc: object) -> None:
                sim.current.pop()

        class Stream:
            def __new__(cls, non_blocking: bool = False) -> Any:  # type: ignore[misc]
                assert non_blocking, "the executor's link streams must not serialize with others"
                return sim._new_stream(sim.current[-1])

        class Event:
            def __new__(cls, block: bool = False, disable_timing: bool = False) -> Any:  # type: ignore[misc]
                return SimEvent(sim, sim.current[-1])

        class CUDARuntimeError(RuntimeError):
            pass

        runtime = types.SimpleNamespace(
            CUDARuntimeError=CUDARuntimeError,
            getDeviceCount=lambda: gpus,
            deviceCanAccessPeer=lambda a, b: True,
            deviceEnablePeerAccess=lambda peer: None,
            memcpyAsync=self._memcpy_async,
            memcpyPeerAsync=self._memcpy_peer_async,
            eventRecord=self._event_record,
        )
        self.module = types.SimpleNamespace(cuda=types.SimpleNamespace(
            runtime=runtime, Device=Device, Stream=Stream, Event=Event,
            alloc=lambda n: types.SimpleNamespace(ptr=self.alloc(n, sim.current[-1])),
        ))

    # -- memory -----------------------------------------------------------------
    def alloc(self, size: int, device: int | None, fill: int = 0) -> int:
        base = self.next_address
        self.next_address += size + (1 << 20)
        self.regions.append(_Region(base, bytearray([fill]) * size, device))
        return base

    def _find(self, ptr: int, size: int) -> tuple[_Region, int]:
        for r in self.regions:
            if r.base <= ptr and ptr + size <= r.base + len(r.data):
                return r, ptr - r.base
        raise AssertionError(f"[{ptr:#x}, +{size}) is not inside one allocation")

    def read(self, ptr: int, size: int) -> bytes:
        region, off = self._find(ptr, size)
        return bytes(region.data[off:off + size])

    def write(self, ptr: int, data: bytes) -> None:
        region, off = self._find(ptr, len(data))
        region.data[off:off + len(data)] = data

    # -- streams and events ------------------------------------------------------
    def _new_stream(self, device: int) -> SimStream:
        stream = SimStream(self, device, ptr=0x1000 + len(self.streams) + 1)
        self.streams[stream.ptr] = stream
        return stream

    def stream_of(self, ptr: int) -> SimStream:
        if ptr == LEGACY:
            return self.legacy[self.current[-1]]
        return self.streams[ptr]

    def _event_record(self, event_ptr: int, stream_ptr: int) -> None:
        self.events[event_ptr].record(self.stream_of(stream_ptr))

    def _copy(self, stream_ptr: int, dst: int, dst_dev: int | None, src: int, src_dev: int | None,
              n: int) -> None:
        stream = self.stream_of(stream_ptr)
        assert stream.device == self.current[-1], "copy issued on a stream of another device"
        assert self._find(dst, n)[0].device == dst_dev, "destination is not on the named device"
        assert self._find(src, n)[0].device == src_dev, "source is not on the named device"
        stream.ops.append(("copy", (dst, src, n)))

    def _memcpy_async(self, dst: int, src: int, n: int, kind: int, stream_ptr: int) -> None:
        assert kind in (1, 2), kind
        gpu = self.stream_of(stream_ptr).device
        self._copy(stream_ptr, dst, gpu if kind == 1 else None, src, None if kind == 1 else gpu, n)

    def _memcpy_peer_async(self, dst: int, dst_dev: int, src: int, src_dev: int, n: int,
                           stream_ptr: int) -> None:
        self._copy(stream_ptr, dst, dst_dev, src, src_dev, n)

    def step(self) -> bool:
        """Run the head of one runnable stream, chosen at random; False if none can run."""
        runnable = [s for s in self.streams.values() if s.ops and s.head_can_run()]
        if not runnable:
            assert not any(s.ops for s in self.streams.values()), "deadlock: every stream waits"
            return False
        self.rng.choice(runnable).run_head()
        return True

    def run_all(self) -> None:
        while self.step():
            pass


class SimStream:
    def __init__(self, sim: SimCuda, device: int, ptr: int) -> None:
        self.sim, self.device, self.ptr = sim, device, ptr
        self.ops: collections.deque[tuple[str, Any]] = collections.deque()

    def head_can_run(self) -> bool:
        kind, arg = self.ops[0]
        return kind != "wait" or arg is None or arg.done

    def run_head(self) -> None:
        kind, arg = self.ops.popleft()
        if kind == "copy":
            dst, src, n = arg
            self.sim.write(dst, self.sim.read(src, n))
        elif kind == "record":
            arg.done = True
        elif kind == "write":  # a producer kernel
            ptr, data = arg
            self.sim.write(ptr, data)

    def wait_event(self, event: SimEvent) -> None:
        self.ops.append(("wait", event.latest))  # a wait sees the record made before it

    def synchronize(self) -> None:
        while self.ops:
            assert self.sim.step(), "stream cannot finish"


class SimEvent:
    def __init__(self, sim: SimCuda, device: int) -> None:
        self.sim, self.device = sim, device
        self.latest: _Record | None = None
        self.ptr = 0x9000_0000 + len(sim.events)
        sim.events[self.ptr] = self

    def record(self, stream: SimStream) -> None:
        assert stream.device == self.device, "event recorded on a stream of another device"
        assert stream.device == self.sim.current[-1], "record outside the stream's device"
        self.latest = _Record()
        stream.ops.append(("record", self.latest))

    @property
    def done(self) -> bool:
        for _ in range(self.sim.rng.randint(0, 3)):  # time passes while the host polls
            self.sim.step()
        return self.latest is None or self.latest.done


@pytest.fixture
def sim(monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> Iterator[SimCuda]:
    s = SimCuda(len(GPUS), seed=getattr(request, "param", 0))
    monkeypatch.setitem(sys.modules, "cupy", s.module)
    yield s


def copy_and_read_back(sim: SimCuda, paths: list, *, pending_source_fill: bool,
                       seed: int) -> tuple[bytes, bytes]:
    """Copy SIZE random bytes over ``paths``; returns (expected, landed)."""
    src_node, dst_node = paths[0][0][0], paths[0][0][-1]
    data = random.Random(seed).randbytes(SIZE)
    src = sim.alloc(SIZE, None if src_node == HOST else src_node, fill=0)
    dst = sim.alloc(SIZE, None if dst_node == HOST else dst_node, fill=0xEE)
    if pending_source_fill:
        # like `src[:] = rng.integers(...)` in CuPy: queued on the default stream, not yet run
        sim.legacy[src_node].ops.append(("write", (src, data)))
    else:
        sim.write(src, data)
    executor = CudaChunkExecutor(GPUS, staging=STAGING)
    links = node_links(GPUS, pcie_bandwidth_bytes_per_s=55 * GB, p2p_bandwidth_bytes_per_s=390 * GB)
    sched = TransferScheduler(links, executor=executor, clock=MonotonicClock(), settings=SETTINGS)
    done: list[object] = []
    sched.submit(TransferRequest("t", FunctionIdentity("wf", "f"), make_route(paths, SIZE),
                                 src_address=src, dst_address=dst), done.append)
    run_to_completion(sched, executor)
    assert len(done) == 1
    landed = sim.read(dst, SIZE)  # read when the last chunk is reported: nothing may be pending
    executor.close()
    return data, landed


ROUTES = [
    [((0, 1), 1.0)],
    [((0, 2, 1), 1.0)],
    [((0, 1), 2.0), ((0, 2, 1), 1.0), ((0, 3, 1), 1.0)],
    [((HOST, 0), 1.0), ((HOST, 1, 0), 1.0), ((HOST, 2, 0), 1.0), ((HOST, 3, 0), 1.0)],
    [((0, HOST), 1.0), ((0, 1, HOST), 1.0)],
    [((HOST, 1, 2, 0), 1.0)],  # two relays: a chunk in two slots at once
]


@pytest.mark.parametrize("paths", ROUTES, ids=lambda p: "+".join("-".join(map(str, n)) for n, _ in p))
@pytest.mark.parametrize("sim", range(6), indirect=True, ids=lambda s: f"seed{s}")
def test_chunks_land_exactly_whatever_order_the_streams_run_in(sim: SimCuda, paths: list) -> None:
    expected, landed = copy_and_read_back(sim, paths, pending_source_fill=False, seed=sim.rng.randrange(1 << 30))
    assert landed == expected


@pytest.mark.parametrize("sim", range(6), indirect=True, ids=lambda s: f"seed{s}")
@pytest.mark.parametrize("paths", [ROUTES[0], ROUTES[1], ROUTES[2], ROUTES[4]],
                         ids=["direct", "relay", "multipath", "d2h-relay"])
def test_copies_wait_for_a_source_still_being_written_on_the_default_stream(
        sim: SimCuda, paths: list) -> None:
    # The failure seen on the 4x H100 machine: without this ordering the first
    # chunks read the source's initial zeros and the later ones the new data.
    expected, landed = copy_and_read_back(sim, paths, pending_source_fill=True, seed=sim.rng.randrange(1 << 30))
    assert landed[:16] != bytes(16), "the start of the copy read the source before it was written"
    assert landed == expected


def test_final_hops_cover_every_byte_once_and_relays_reuse_slots_in_order(sim: SimCuda) -> None:
    issued: list[tuple[int, int, int]] = []  # (path, offset, size) in issue order

    class Recording(CudaChunkExecutor):
        def issue(self, chunk: Any, on_done: Any) -> None:
            issued.append((chunk.path_index, chunk.offset_bytes, chunk.size_bytes))
            super().issue(chunk, on_done)

    src = sim.alloc(SIZE, 0)
    dst = sim.alloc(SIZE, 1)
    executor = Recording(GPUS, staging=STAGING)
    links = node_links(GPUS, pcie_bandwidth_bytes_per_s=55 * GB, p2p_bandwidth_bytes_per_s=390 * GB)
    sched = TransferScheduler(links, executor=executor, clock=MonotonicClock(), settings=SETTINGS)
    sched.submit(TransferRequest("t", FunctionIdentity("wf", "f"),
                                 make_route([((0, 2, 1), 1.0)], SIZE),
                                 src_address=src, dst_address=dst))
    run_to_completion(sched, executor)
    covered = sorted((off, size) for _, off, size in issued)
    assert covered[0][0] == 0
    assert all(a + n == b for (a, n), (b, _) in itertools.pairwise(covered))
    assert covered[-1][0] + covered[-1][1] == SIZE
    assert [off for _, off, _ in issued] == sorted(off for _, off, _ in issued)  # first chunk first
    assert all(size <= SLOT_BYTES for _, _, size in issued)
    assert len(issued) > STAGING.slots_per_relay * 2  # the relay's slots were reused
