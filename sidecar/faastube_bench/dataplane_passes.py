"""The function processes of the data-plane benchmark, and what each does in one pass.

A pair is two real processes, each with its own connection to the sidecar (and its
own CUDA context when it uses a GPU), linked by one multiprocessing pipe. Every
method hands its message to the other process over that same pipe, and the floor
is that pipe alone, so the methods differ only in what they do around it.

One pass, on CLOCK_MONOTONIC (one clock for every process of the machine):

    producer: prepare (untimed) | t0 | publish | t_sent | send ........... wait for the ack
    consumer: ............................. receive | t_recv | fetch + sync | t_end | check, release | ack

pass = t_end - t0, put = t_sent - t0, get = t_end - t_recv. `prepare` writes this
pass's marker value into the next of several rotating source buffers and
synchronizes; `check` reads the markers back on the consumer, outside the timing.
The producer starts the next pass only after the ack: one pass in flight per pair.
"""

from __future__ import annotations

import itertools
import mmap
import os
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from faastube_bench import dataplane_report as report

ACK, ABORT, STOPPED = b"k", b"!", b"s"
STOP_BYTES = b""                 # end of a cell, for methods whose messages are bytes (None when pickled)
REF_BYTES = 35                   # a tube ref today ("ft-" + 32 hex digits): the floor's message
D2D, D2H = 3, 2                  # cudaMemcpyKind
_PEER_ALREADY_ENABLED = 704      # cudaErrorPeerAccessAlreadyEnabled


def now_ns() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


def marker(i: int) -> int:
    """The byte pass i writes at its markers: 1..251, never 0 (fresh memory often is)."""
    return i % 251 + 1


def marker_offsets(nbytes: int) -> tuple[int, int, int]:
    return 0, nbytes // 2, nbytes - 1


# --- what the driver sends ----------------------------------------------------------------------

@dataclass(frozen=True)
class WorkerSpec:
    role: str                    # "producer" | "consumer"
    index: int                   # pair number
    device: int | None           # CUDA ordinal; None: a CPU function (sees no GPU at all)
    socket_path: str
    spin_us: float


@dataclass(frozen=True)
class CellPlan:
    pattern: str
    method: str
    size_bytes: int
    warmup: int                  # untimed passes first
    max_passes: int              # timed passes at most
    min_passes: int              # timed passes at least, whatever the budget
    budget_s: float              # after min_passes, stop once timing has taken this long
    rotate: int                  # buffers used in turn, so copies don't read from cache
    src_device: int | None = None   # raw copy only: where from / to (None: host memory)
    dst_device: int | None = None


@dataclass(frozen=True)
class LoopPlan:
    """Concurrency: a put -> pipe -> get -> release loop until end_ns, counting passes from start_ns."""

    size_bytes: int
    warmup: int
    rotate: int
    check_every: int             # the consumer checks markers of every n-th pass


# --- memory on either side ----------------------------------------------------------------------

class Memory(Protocol):
    location: int | str          # what the client's `device=` takes

    def array(self, nbytes: int) -> Any: ...
    def mark(self, a: Any, value: int) -> None: ...
    def marks(self, a: Any) -> tuple[int, ...]: ...
    def sync(self) -> None: ...
    def release_cache(self) -> None: ...


class HostMemory:
    location: int | str = "cpu"

    def array(self, nbytes: int) -> np.ndarray:
        a = np.empty(nbytes, np.uint8)
        a.fill(0)                                    # fault every page in now, not in a timed pass
        return a

    def mark(self, a: Any, value: int) -> None:
        for off in marker_offsets(a.nbytes):
            a[off] = value

    def marks(self, a: Any) -> tuple[int, ...]:
        return tuple(int(a[off]) for off in marker_offsets(a.nbytes))

    def sync(self) -> None:
        pass

    def release_cache(self) -> None:
        pass


class GpuMemory:
    """CuPy on one device, on CuPy's current stream of that device (what the client orders on)."""

    def __init__(self, ordinal: int) -> None:
        import cupy

        self._cp = cupy
        self.location: int | str = ordinal
        self.ordinal = ordinal
        with cupy.cuda.Device(ordinal):
            self.stream = cupy.cuda.get_current_stream()
        self._host = np.zeros(3, np.uint8)

    def array(self, nbytes: int) -> Any:
        with self._cp.cuda.Device(self.ordinal):
            a = self._cp.zeros(nbytes, self._cp.uint8)
        self.sync()
        return a

    def mark(self, a: Any, value: int) -> None:
        mark_device(int(a.data.ptr), a.nbytes, value, self.stream.ptr)

    def marks(self, a: Any) -> tuple[int, ...]:
        return read_device_marks(int(a.data.ptr), a.nbytes, self._host)

    def sync(self) -> None:
        self.stream.synchronize()

    def release_cache(self) -> None:
        self._cp.get_default_memory_pool().free_all_blocks()


def mark_device(ptr: int, nbytes: int, value: int, stream_ptr: int) -> None:
    """Three one-byte memsets on `stream`: no kernel to compile, a few microseconds."""
    import cupy

    for off in marker_offsets(nbytes):
        cupy.cuda.runtime.memsetAsync(ptr + off, value, 1, stream_ptr)


def read_device_marks(ptr: int, nbytes: int, host: np.ndarray) -> tuple[int, ...]:
    import cupy

    for k, off in enumerate(marker_offsets(nbytes)):
        cupy.cuda.runtime.memcpy(host.ctypes.data + k, ptr + off, 1, D2H)
    return tuple(int(x) for x in host)


class Segment:
    """A shared-memory file (tmpfs), mapped: the host-centric baseline's object store slot."""

    _names = itertools.count()

    def __init__(self, path: str, nbytes: int, *, create: bool) -> None:
        self.path = path
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(path, flags, 0o600)
        try:
            if create:
                os.ftruncate(fd, nbytes)
            self._map = mmap.mmap(fd, nbytes)
        finally:
            os.close(fd)
        self.array: np.ndarray = np.frombuffer(self._map, np.uint8, nbytes)
        if create:
            self.array.fill(0)                       # fault its pages in now

    @classmethod
    def create(cls, nbytes: int) -> Segment:
        base = "/dev/shm" if os.path.isdir("/dev/shm") else os.environ.get("TMPDIR", "/tmp")
        return cls(os.path.join(base, f"ftb-{os.getpid()}-{next(cls._names)}"), nbytes, create=True)

    def close(self, *, unlink: bool = False) -> None:
        self.array = np.empty(0, np.uint8)           # drop our view first: mmap won't close under one
        try:
            self._map.close()
        except BufferError:
            pass                                     # a view is still alive: the mapping goes with it
        if unlink:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


# --- the methods: one class per side -------------------------------------------------------------

class Producer(Protocol):
    pickled: bool                # the message is pickled (torch's CUDA IPC) rather than sent as bytes

    def prepare(self, i: int, value: int) -> None: ...
    def publish(self, i: int, value: int) -> Any: ...
    def close(self) -> None: ...


class Consumer(Protocol):
    pickled: bool

    def fetch(self, i: int, message: Any) -> Any: ...
    def check(self, data: Any, value: int) -> bool: ...
    def finish(self, message: Any) -> None: ...
    def close(self) -> None: ...


class FloorProducer:
    pickled = False

    def __init__(self) -> None:
        self._message = b"r" * REF_BYTES

    def prepare(self, i: int, value: int) -> None:
        pass

    def publish(self, i: int, value: int) -> bytes:
        return self._message

    def close(self) -> None:
        pass


class FloorConsumer:
    pickled = False

    def fetch(self, i: int, message: Any) -> Any:
        return message

    def check(self, data: Any, value: int) -> bool:
        return len(data) == REF_BYTES

    def finish(self, message: Any) -> None:
        pass

    def close(self) -> None:
        pass


class TubePutProducer:
    """The producer's array already exists (its own memory); `put` copies it into the pool."""

    pickled = False

    def __init__(self, client: Any, mem: Memory, nbytes: int, rotate: int, *, sync: bool = True) -> None:
        self._client, self._mem, self._sync = client, mem, sync
        self._src = [mem.array(nbytes) for _ in range(rotate)]

    def prepare(self, i: int, value: int) -> None:
        self._mem.mark(self._src[i % len(self._src)], value)
        if self._sync:
            # Timed passes start with the source ready. (The concurrency loop skips this: the
            # put's copy is queued on the same stream, after the marker writes.)
            self._mem.sync()

    def publish(self, i: int, value: int) -> bytes:
        return self._client.put(self._src[i % len(self._src)], consumers=1).encode()

    def close(self) -> None:
        self._src = []
        self._mem.release_cache()


class TubeSealProducer:
    """The producer writes straight into pool memory (`empty`), then publishes it (`seal`).

    Its own computation is not data passing and is not timed; three marker writes
    stand for it (the only bytes the consumer checks).
    """

    pickled = False

    def __init__(self, client: Any, mem: Memory, nbytes: int) -> None:
        self._client, self._mem, self._nbytes = client, mem, nbytes

    def prepare(self, i: int, value: int) -> None:
        pass

    def publish(self, i: int, value: int) -> bytes:
        w = self._client.empty(self._nbytes, np.uint8, device=self._mem.location)
        self._mem.mark(w.array, value)
        return self._client.seal(w, consumers=1).encode()

    def close(self) -> None:
        pass


class TubeConsumer:
    pickled = False

    def __init__(self, client: Any, mem: Memory) -> None:
        self._client, self._mem = client, mem

    def fetch(self, i: int, message: Any) -> Any:
        x = self._client.get(message.decode(), device=self._mem.location)
        self._mem.sync()                             # a GPU get may still be copying: usable means synced
        return x

    def check(self, data: Any, value: int) -> bool:
        return self._mem.marks(data) == (value,) * 3

    def finish(self, message: Any) -> None:
        self._client.release(message.decode())

    def close(self) -> None:
        pass


class TorchProducer:
    """torch.multiprocessing as a user writes it: clone the output, send the tensor, done."""

    pickled = True

    def __init__(self, device: int, nbytes: int, rotate: int) -> None:
        import torch
        import torch.multiprocessing  # noqa: F401 - registers CUDA IPC pickling for the pipe

        self._torch = torch
        torch.cuda.set_device(device)
        self._dev = torch.device("cuda", device)
        self._stream = torch.cuda.current_stream(self._dev)
        self._src = [torch.zeros(nbytes, dtype=torch.uint8, device=self._dev) for _ in range(rotate)]

    def prepare(self, i: int, value: int) -> None:
        t = self._src[i % len(self._src)]
        mark_device(t.data_ptr(), t.numel(), value, self._stream.cuda_stream)
        self._stream.synchronize()

    def publish(self, i: int, value: int) -> Any:
        return self._src[i % len(self._src)].clone()

    def close(self) -> None:
        self._src = []
        self._torch.cuda.empty_cache()


class TorchConsumer:
    """Receive the IPC view (torch orders our stream after the producer's clone), `.to` another GPU."""

    pickled = True

    def __init__(self, device: int) -> None:
        import torch
        import torch.multiprocessing  # noqa: F401 - registers CUDA IPC unpickling for the pipe

        self._torch = torch
        torch.cuda.set_device(device)
        self._dev = torch.device("cuda", device)
        self._host = np.zeros(3, np.uint8)

    def fetch(self, i: int, message: Any) -> Any:
        y = message if message.device == self._dev else message.to(self._dev)
        self._torch.cuda.current_stream(self._dev).synchronize()
        return y

    def check(self, data: Any, value: int) -> bool:
        return read_device_marks(data.data_ptr(), data.numel(), self._host) == (value,) * 3

    def finish(self, message: Any) -> None:
        pass

    def close(self) -> None:
        self._torch.cuda.empty_cache()


class HostCentricProducer:
    """D2H into pageable memory, then into a shared-memory slot (two slots, reused)."""

    pickled = False

    def __init__(self, mem: Memory, nbytes: int, rotate: int) -> None:
        self._mem = mem
        self._gpu = not isinstance(mem, HostMemory)
        self._src = [mem.array(nbytes) for _ in range(rotate)]
        self._staging = HostMemory().array(nbytes) if self._gpu else None
        self._slots = [Segment.create(nbytes) for _ in range(2)]

    def prepare(self, i: int, value: int) -> None:
        self._mem.mark(self._src[i % len(self._src)], value)
        self._mem.sync()

    def publish(self, i: int, value: int) -> bytes:
        src = self._src[i % len(self._src)]
        slot = self._slots[i % len(self._slots)]
        if self._staging is not None:
            src.get(out=self._staging)               # pageable D2H (CuPy waits for it)
            np.copyto(slot.array, self._staging)
        else:
            np.copyto(slot.array, src)
        return slot.path.encode()

    def close(self) -> None:
        for slot in self._slots:
            slot.close(unlink=True)
        self._src = []
        self._mem.release_cache()


class HostCentricConsumer:
    """H2D straight from the shared-memory slot into the consumer's own buffer."""

    pickled = False

    def __init__(self, mem: Memory, nbytes: int, rotate: int) -> None:
        self._mem, self._nbytes = mem, nbytes
        self._gpu = not isinstance(mem, HostMemory)
        self._dst = [mem.array(nbytes) for _ in range(rotate)]
        self._slots: dict[bytes, Segment] = {}

    def fetch(self, i: int, message: Any) -> Any:
        slot = self._slots.get(message)
        if slot is None:                             # first sight (a warm-up pass): map it once
            slot = self._slots[message] = Segment(message.decode(), self._nbytes, create=False)
        dst = self._dst[i % len(self._dst)]
        if self._gpu:
            dst.set(slot.array)                      # pageable H2D
            self._mem.sync()
        else:
            np.copyto(dst, slot.array)
        return dst

    def check(self, data: Any, value: int) -> bool:
        return self._mem.marks(data) == (value,) * 3

    def finish(self, message: Any) -> None:
        pass

    def close(self) -> None:
        for slot in self._slots.values():
            slot.close()
        self._dst = []
        self._mem.release_cache()


def make_producer(method: str, client: Any, mem: Memory, device: int | None, plan: CellPlan) -> Producer:
    if method == report.FLOOR:
        return FloorProducer()
    if method == report.TUBE_PUT:
        return TubePutProducer(client, mem, plan.size_bytes, plan.rotate)
    if method == report.TUBE_SEAL:
        return TubeSealProducer(client, mem, plan.size_bytes)
    if method == report.HOST_CENTRIC:
        return HostCentricProducer(mem, plan.size_bytes, plan.rotate)
    if method == report.TORCH_IPC and device is not None:
        return TorchProducer(device, plan.size_bytes, plan.rotate)
    raise ValueError(f"no producer for {method} on {'the host' if device is None else f'GPU {device}'}")


def make_consumer(method: str, client: Any, mem: Memory, device: int | None, plan: CellPlan) -> Consumer:
    if method == report.FLOOR:
        return FloorConsumer()
    if method in report.TUBE_METHODS:
        return TubeConsumer(client, mem)
    if method == report.HOST_CENTRIC:
        return HostCentricConsumer(mem, plan.size_bytes, plan.rotate)
    if method == report.TORCH_IPC and device is not None:
        return TorchConsumer(device)
    raise ValueError(f"no consumer for {method} on {'the host' if device is None else f'GPU {device}'}")


# --- the loops ---------------------------------------------------------------------------------

def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=6)}"


def _stop(peer: Any, pickled: bool) -> None:
    """End the cell: tell the consumer, then skip its acks until it confirms."""
    if pickled:
        peer.send(None)
    else:
        peer.send_bytes(STOP_BYTES)
    while peer.recv_bytes() != STOPPED:
        pass


def produce(producer: Producer, peer: Any, *, warmup: int, should_stop: Callable[[int], bool]) -> dict[str, Any]:
    """Passes until `should_stop(timed passes so far)`; t0 and t_sent of every acked pass."""
    send = peer.send if producer.pickled else peer.send_bytes
    t0s: list[int] = []
    sents: list[int] = []
    acks: list[int] = []
    error = None
    i = 0
    try:
        while not (i >= warmup and should_stop(i - warmup)):
            value = marker(i)
            producer.prepare(i, value)
            t0 = now_ns()
            message = producer.publish(i, value)
            t_sent = now_ns()
            send(message)
            ack = peer.recv_bytes()
            message = None                          # torch: the clone lives until the consumer is done
            if ack != ACK:
                error = "the consumer gave up (see its error)"
                break
            t0s.append(t0)
            sents.append(t_sent)
            acks.append(now_ns())
            i += 1
    except Exception as e:  # noqa: BLE001 - reported to the driver with its traceback
        error = _describe(e)
    finally:
        _stop(peer, producer.pickled)
    return {"t0": t0s, "t_sent": sents, "t_ack": acks, "error": error}


def consume(consumer: Consumer, peer: Any, *, check_every: int = 1) -> dict[str, Any]:
    recv = peer.recv if consumer.pickled else peer.recv_bytes
    recvs: list[int] = []
    ends: list[int] = []
    bad = 0
    error = None
    i = 0
    while True:
        message = recv()
        t_recv = now_ns()
        if (message is None) if consumer.pickled else (len(message) == 0):
            break
        if error is not None:
            message = None                          # drain until the producer's stop
            continue
        try:
            data = consumer.fetch(i, message)
            t_end = now_ns()
            if i % check_every == 0 and not consumer.check(data, marker(i)):
                bad += 1
            consumer.finish(message)
        except Exception as e:  # noqa: BLE001 - reported to the driver with its traceback
            error = _describe(e)
            message = data = None
            peer.send_bytes(ABORT)
            continue
        message = data = None                       # let go of views (torch: before the ack)
        recvs.append(t_recv)
        ends.append(t_end)
        peer.send_bytes(ACK)
        i += 1
    peer.send_bytes(STOPPED)
    return {"t_recv": recvs, "t_end": ends, "bad": bad, "error": error}


def cell_budget(plan: CellPlan) -> Callable[[int], bool]:
    """Stop after max_passes, or once min_passes are done and timing took budget_s."""
    started: list[float] = []

    def should_stop(timed: int) -> bool:
        if timed == 0:
            started[:] = [time.monotonic()]
            return False
        if timed >= plan.max_passes:
            return True
        return timed >= plan.min_passes and time.monotonic() - started[0] >= plan.budget_s
    return should_stop


# --- in-process measurements -------------------------------------------------------------------

def raw_copy(plan: CellPlan) -> dict[str, Any]:
    """One copy per pass inside one process: wall time incl. sync, and CUDA events where on a GPU."""
    walls: list[float] = []
    gpus: list[float] = []
    bad = 0
    note = "memcpy (np.copyto)"
    if plan.src_device is None or plan.dst_device is None:
        host = HostMemory()
        srcs = [host.array(plan.size_bytes) for _ in range(plan.rotate)]
        dsts = [host.array(plan.size_bytes) for _ in range(plan.rotate)]
        should_stop = cell_budget(plan)
        i = 0
        while not (i >= plan.warmup and should_stop(i - plan.warmup)):
            k = i % plan.rotate
            host.mark(srcs[k], marker(i))
            t0 = time.perf_counter()
            np.copyto(dsts[k], srcs[k])
            t1 = time.perf_counter()
            bad += host.marks(dsts[k]) != (marker(i),) * 3
            if i >= plan.warmup:
                walls.append(t1 - t0)
            i += 1
        return {"wall_s": walls, "gpu_s": [], "bad": bad, "note": note}

    import cupy

    rt = cupy.cuda.runtime
    src_dev, dst_dev = plan.src_device, plan.dst_device
    if src_dev != dst_dev:
        # Without peer access CUDA stages the copy through the host: this is the NVLink ceiling.
        if not (rt.deviceCanAccessPeer(dst_dev, src_dev) and rt.deviceCanAccessPeer(src_dev, dst_dev)):
            note = "peer copy WITHOUT peer access (staged by the driver)"
        else:
            note = "peer copy (cudaMemcpyPeerAsync, peer access on)"
            for a, b in ((src_dev, dst_dev), (dst_dev, src_dev)):
                with cupy.cuda.Device(a):
                    try:
                        rt.deviceEnablePeerAccess(b)
                    except rt.CUDARuntimeError as e:
                        if e.status != _PEER_ALREADY_ENABLED:
                            raise
    else:
        note = "device to device (cudaMemcpyAsync)"
    src_mem, dst_mem = GpuMemory(src_dev), GpuMemory(dst_dev)
    gsrcs = [src_mem.array(plan.size_bytes) for _ in range(plan.rotate)]
    gdsts = [dst_mem.array(plan.size_bytes) for _ in range(plan.rotate)]
    with cupy.cuda.Device(dst_dev):
        stream = cupy.cuda.Stream(non_blocking=True)
        start, end = cupy.cuda.Event(), cupy.cuda.Event()
        should_stop = cell_budget(plan)
        i = 0
        while not (i >= plan.warmup and should_stop(i - plan.warmup)):
            k = i % plan.rotate
            src_mem.mark(gsrcs[k], marker(i))
            src_mem.sync()
            t0 = time.perf_counter()
            start.record(stream)
            if src_dev == dst_dev:
                rt.memcpyAsync(gdsts[k].data.ptr, gsrcs[k].data.ptr, plan.size_bytes, D2D, stream.ptr)
            else:
                rt.memcpyPeerAsync(gdsts[k].data.ptr, dst_dev, gsrcs[k].data.ptr, src_dev, plan.size_bytes,
                                   stream.ptr)
            end.record(stream)
            stream.synchronize()
            t1 = time.perf_counter()
            bad += dst_mem.marks(gdsts[k]) != (marker(i),) * 3
            if i >= plan.warmup:
                walls.append(t1 - t0)
                gpus.append(cupy.cuda.get_elapsed_time(start, end) / 1e3)
            i += 1
    del gsrcs, gdsts
    src_mem.release_cache()
    return {"wall_s": walls, "gpu_s": gpus, "bad": bad, "note": note}


def ping(client: Any, warmup: int, n: int) -> list[float]:
    for _ in range(warmup):
        client.ping()
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        client.ping()
        out.append(time.perf_counter() - t0)
    return out


# --- the process ---------------------------------------------------------------------------------

class _Loop:
    """A concurrency pair's side, kept between the warm-up command and the timed run."""

    def __init__(self, producer: Producer | None, consumer: Consumer | None, plan: LoopPlan) -> None:
        self.producer, self.consumer, self.plan = producer, consumer, plan


def serve(control: Any, peer: Any, spec: WorkerSpec) -> None:
    """A function process: connect, say ready, run the driver's commands until "stop"."""
    if spec.device is None:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""      # a CPU function: no GPU, no CUDA context
    try:
        import faastube

        if spec.device is not None:
            import cupy

            cupy.cuda.Device(spec.device).use()      # the function's own GPU, as in its pod
        mem: Memory = GpuMemory(spec.device) if spec.device is not None else HostMemory()
        client = faastube.connect(spec.socket_path, workflow="bench-dataplane",
                                  function=f"{spec.role}-{spec.index}", spin_us=spec.spin_us)
    except Exception as e:  # noqa: BLE001 - reported to the driver
        control.send(("error", _describe(e)))
        return
    info: dict[str, Any] = {"pid": os.getpid(), "backend": client.backend}
    if spec.device is not None:
        import cupy

        props = cupy.cuda.runtime.getDeviceProperties(spec.device)
        info.update(device_name=props["name"].decode(errors="replace"),
                    cuda_runtime=cupy.cuda.runtime.runtimeGetVersion(),
                    cuda_driver=cupy.cuda.runtime.driverGetVersion(), cupy=cupy.__version__)
    control.send(("ready", info))
    loop: _Loop | None = None
    try:
        while True:
            cmd, arg = control.recv()
            if cmd == "stop":
                break
            result: Any = None
            try:
                if cmd == "cell":
                    result = _cell(spec, client, mem, peer, arg)
                elif cmd == "raw":
                    result = raw_copy(arg)
                elif cmd == "ping":
                    result = ping(client, *arg)
                elif cmd == "stats":
                    result = client.stats()
                elif cmd == "loop-warm":
                    loop = _loop_warm(spec, client, mem, peer, arg)
                elif cmd == "loop-run":
                    if loop is None:
                        raise RuntimeError("loop-run before loop-warm")
                    result = _loop_run(loop, peer, *arg)
                    loop = None
                else:
                    raise ValueError(f"unknown command {cmd!r}")
            except Exception as e:  # noqa: BLE001 - reported to the driver, which goes on
                control.send(("error", _describe(e)))
            else:
                control.send(("ok", result))
    except (EOFError, KeyboardInterrupt):
        pass                                         # the driver went away
    finally:
        client.close()


def _cell(spec: WorkerSpec, client: Any, mem: Memory, peer: Any, plan: CellPlan) -> dict[str, Any]:
    if spec.role == "producer":
        producer = make_producer(plan.method, client, mem, spec.device, plan)
        try:
            return produce(producer, peer, warmup=plan.warmup, should_stop=cell_budget(plan))
        finally:
            producer.close()
    consumer = make_consumer(plan.method, client, mem, spec.device, plan)
    try:
        return consume(consumer, peer)
    finally:
        consumer.close()


def _loop_warm(spec: WorkerSpec, client: Any, mem: Memory, peer: Any, plan: LoopPlan) -> _Loop:
    cell = CellPlan("loop", report.TUBE_PUT, plan.size_bytes, plan.warmup, 0, 0, 0.0, plan.rotate)
    if spec.role == "producer":
        producer = TubePutProducer(client, mem, plan.size_bytes, plan.rotate, sync=False)
        out = produce(producer, peer, warmup=plan.warmup, should_stop=lambda timed: True)
        if out["error"]:
            raise RuntimeError(out["error"])
        return _Loop(producer, None, plan)
    consumer = make_consumer(report.TUBE_PUT, client, mem, spec.device, cell)
    out = consume(consumer, peer)
    if out["error"]:
        raise RuntimeError(out["error"])
    return _Loop(None, consumer, plan)


def _loop_run(loop: _Loop, peer: Any, start_ns: int, end_ns: int) -> dict[str, Any]:
    if loop.consumer is not None:
        try:
            out = consume(loop.consumer, peer, check_every=loop.plan.check_every)
        finally:
            loop.consumer.close()
        return {"bad": out["bad"], "error": out["error"]}
    producer = loop.producer
    if producer is None:
        raise RuntimeError("a concurrency side with neither producer nor consumer")
    delay = (start_ns - now_ns()) / 1e9
    if delay > 0:
        time.sleep(delay)
    try:
        out = produce(producer, peer, warmup=0, should_stop=lambda timed: now_ns() >= end_ns)
    finally:
        producer.close()
    passes = sum(1 for t in out["t_ack"] if start_ns <= t <= end_ns)
    return {"passes": passes, "error": out["error"]}
