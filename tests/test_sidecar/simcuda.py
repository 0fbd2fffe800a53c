"""A small model of the CUDA semantics the transfer executor relies on, standing in for ``cupy``.

FIFO streams; events (a wait sees the event's latest record); the legacy default stream
and its implicit synchronisation with *blocking* streams (work on a blocking stream waits
for the legacy stream's earlier work, and legacy work waits for every blocking stream's
earlier work); copies that move bytes only when they run. Runnable work is executed in a
seeded random order, so any ordering the code does not enforce eventually goes wrong.
Every copy call is recorded (``copies``), so tests can count them.

Used by the executor's ordering tests and the direct-copy tests: install it with
``monkeypatch.setitem(sys.modules, "cupy", sim.module)``.
"""

from __future__ import annotations

import collections
import ctypes
import dataclasses
import random
import threading
import types
from typing import Any, Self

import numpy as np

LEGACY = 1  # cudaStreamLegacy


@dataclasses.dataclass(eq=False)
class _Region:
    base: int
    data: bytearray | memoryview
    device: int | None  # None: host memory


@dataclasses.dataclass(eq=False)
class _Record:
    """One record of an event: done once the stream reaches it."""

    done: bool = False


@dataclasses.dataclass(frozen=True)
class CopyCall:
    """One ``memcpyAsync`` / ``memcpyPeerAsync`` call as the code issued it."""

    api: str  # "memcpyAsync" or "memcpyPeerAsync"
    stream_device: int
    stream_blocking: bool
    dst_device: int | None
    src_device: int | None
    nbytes: int


class SimCuda:
    """What the executor uses of ``cupy``: devices, streams, events, memory, copies."""

    def __init__(self, gpus: int, seed: int) -> None:
        self.rng = random.Random(seed)
        self.gpus = gpus
        self.lock = threading.RLock()  # the engine's thread polls while tests wait
        self.regions: list[_Region] = []
        self.next_address = 1 << 32
        self._current = threading.local()
        self.streams: dict[int, SimStream] = {}
        self.events: dict[int, SimEvent] = {}
        self.copies: list[CopyCall] = []
        self.host_by_address = False  # install_array_api: any host pointer is addressable
        self.legacy = {g: self._new_stream(g, blocking=False) for g in range(gpus)}
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
                return sim._new_stream(sim.current[-1], blocking=not non_blocking)

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

    def install_array_api(self) -> None:
        """Enough of CuPy's arrays and host registration to run the transfers benchmark.

        Device arrays are NumPy views of simulated device memory (writes to them take effect
        at once, like a kernel that already ran); host memory registered with
        ``hostRegister`` (the pinned ring) and any other host pointer a copy names (a NumPy
        array) are addressed through ctypes.
        """
        sim = self
        self.host_by_address = True

        class Array:
            def __init__(self, n: int) -> None:
                base = sim.alloc(n, sim.current[-1])
                region, _ = sim._find(base, n)
                self._np = np.frombuffer(region.data, dtype=np.uint8)
                self.data = types.SimpleNamespace(ptr=base)

            def __getitem__(self, key: Any) -> Any:
                return self._np[key]

            def __setitem__(self, key: Any, value: Any) -> None:
                self._np[key] = value

        rt = self.module.cuda.runtime
        rt.getDeviceProperties = lambda g: {"name": b"Simulated GPU", "totalGlobalMem": 1 << 34}
        rt.deviceGetPCIBusId = lambda g: f"0000:{g + 1:02x}:00.0"
        rt.hostRegister = lambda ptr, size, flags: self._register_host(ptr, size)
        rt.hostUnregister = lambda ptr: None
        self.module.empty = lambda n, dtype=None: Array(int(n))
        self.module.asnumpy = lambda x: np.array(x)
        self.module.uint8 = np.uint8

    def _register_host(self, ptr: int, size: int) -> None:
        view = memoryview((ctypes.c_ubyte * size).from_address(ptr)).cast("B")
        with self.lock:
            self.regions.append(_Region(ptr, view, None))

    @property
    def current(self) -> list[int]:
        """This thread's stack of current devices (CUDA's current device is per thread)."""
        stack = getattr(self._current, "stack", None)
        if stack is None:
            stack = self._current.stack = [0]
        return stack

    # -- memory -----------------------------------------------------------------
    def alloc(self, size: int, device: int | None, fill: int = 0) -> int:
        with self.lock:
            base = self.next_address
            self.next_address += size + (1 << 20)
            self.regions.append(_Region(base, bytearray([fill]) * size, device))
            return base

    def _find(self, ptr: int, size: int, *, host: bool = False) -> tuple[_Region, int]:
        for r in self.regions:
            if r.base <= ptr and ptr + size <= r.base + len(r.data):
                return r, ptr - r.base
        if host and self.host_by_address:  # pageable host memory
            self._register_host(ptr, size)
            return self._find(ptr, size)
        raise AssertionError(f"[{ptr:#x}, +{size}) is not inside one allocation")

    def read(self, ptr: int, size: int) -> bytes:
        region, off = self._find(ptr, size)
        return bytes(region.data[off:off + size])

    def write(self, ptr: int, data: bytes) -> None:
        region, off = self._find(ptr, len(data))
        region.data[off:off + len(data)] = data

    def default_stream_write(self, device: int, ptr: int, data: bytes) -> None:
        """A producer kernel queued on ``device``'s legacy default stream, not yet run."""
        with self.lock:
            self.legacy[device].push(("write", (ptr, data)))

    # -- streams and events ------------------------------------------------------
    def _new_stream(self, device: int, *, blocking: bool) -> SimStream:
        with self.lock:
            stream = SimStream(self, device, ptr=0x1000 + len(self.streams) + 1, blocking=blocking)
            self.streams[stream.ptr] = stream
            return stream

    def stream_of(self, ptr: int) -> SimStream:
        if ptr == LEGACY:
            return self.legacy[self.current[-1]]
        return self.streams[ptr]

    def _event_record(self, event_ptr: int, stream_ptr: int) -> None:
        self.events[event_ptr].record(self.stream_of(stream_ptr))

    def _copy(self, api: str, stream_ptr: int, dst: int, dst_dev: int | None, src: int,
              src_dev: int | None, n: int) -> None:
        with self.lock:
            stream = self.stream_of(stream_ptr)
            assert stream.device == self.current[-1], "copy issued on a stream of another device"
            assert self._find(dst, n, host=dst_dev is None)[0].device == dst_dev, \
                "destination is not on the named device"
            assert self._find(src, n, host=src_dev is None)[0].device == src_dev, \
                "source is not on the named device"
            self.copies.append(CopyCall(api, stream.device, stream.blocking, dst_dev, src_dev, n))
            stream.push(("copy", (dst, src, n)))

    def _memcpy_async(self, dst: int, src: int, n: int, kind: int, stream_ptr: int) -> None:
        assert kind in (1, 2), kind
        gpu = self.stream_of(stream_ptr).device
        self._copy("memcpyAsync", stream_ptr, dst, gpu if kind == 1 else None, src,
                   None if kind == 1 else gpu, n)

    def _memcpy_peer_async(self, dst: int, dst_dev: int, src: int, src_dev: int, n: int,
                           stream_ptr: int) -> None:
        self._copy("memcpyPeerAsync", stream_ptr, dst, dst_dev, src, src_dev, n)

    def step(self) -> bool:
        """Run the head of one runnable stream, chosen at random; False if none can run."""
        with self.lock:
            runnable = [s for s in self.streams.values() if s.ops and s.head_can_run()]
            if not runnable:
                assert not any(s.ops for s in self.streams.values()), "deadlock: every stream waits"
                return False
            self.rng.choice(runnable).run_head()
            return True

    def run_all(self) -> None:
        while self.step():
            pass

    def idle(self) -> bool:
        with self.lock:
            return not any(s.ops for s in self.streams.values())


class SimStream:
    def __init__(self, sim: SimCuda, device: int, ptr: int, *, blocking: bool) -> None:
        self.sim, self.device, self.ptr, self.blocking = sim, device, ptr, blocking
        self.ops: collections.deque[tuple[str, Any]] = collections.deque()

    @property
    def is_legacy(self) -> bool:
        return self.sim.legacy.get(self.device) is self

    def push(self, op: tuple[str, Any]) -> None:
        """Queue ``op`` with the legacy stream's implicit synchronisation."""
        with self.sim.lock:
            if self.blocking:
                marker = _Record()
                self.sim.legacy[self.device].push(("record", marker))
                self.ops.append(("wait", marker))
            elif self.is_legacy:
                for other in list(self.sim.streams.values()):
                    if other.blocking and other.device == self.device and other.ops:
                        marker = _Record()
                        other.ops.append(("record", marker))
                        self.ops.append(("wait", marker))
            self.ops.append(op)

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
        self.push(("wait", event.latest))  # a wait sees the record made before it

    def synchronize(self) -> None:
        while self.ops:
            assert self.sim.step(), "stream cannot finish"

    @property
    def done(self) -> bool:
        for _ in range(self.sim.rng.randint(0, 3)):  # time passes while the host polls
            self.sim.step()
        return not self.ops


class SimEvent:
    def __init__(self, sim: SimCuda, device: int) -> None:
        self.sim, self.device = sim, device
        self.latest: _Record | None = None
        with sim.lock:
            self.ptr = 0x9000_0000 + len(sim.events)
            sim.events[self.ptr] = self

    def record(self, stream: SimStream) -> None:
        assert stream.device == self.device, "event recorded on a stream of another device"
        assert stream.device == self.sim.current[-1], "record outside the stream's device"
        self.latest = _Record()
        stream.push(("record", self.latest))

    @property
    def done(self) -> bool:
        for _ in range(self.sim.rng.randint(0, 3)):  # time passes while the host polls
            self.sim.step()
        return self.latest is None or self.latest.done

    def synchronize(self) -> None:
        while not (self.latest is None or self.latest.done):
            assert self.sim.step(), "event can never fire"
