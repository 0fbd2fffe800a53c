"""Probe the CUDA primitives the v2 data plane relies on, before building on them.

Run on the GPU machine: ``python3 bench/probe_dataplane_v2.py [--out DIR]``. Prints one
line per finding and writes probe-dataplane-v2.json. Questions it answers:

1. round-trip floor between two Python processes (Unix socketpair, blocking and spinning;
   multiprocessing pipe);
2. does a fresh allocation in a new IPC pool show bytes freed from another pool of the
   same process (must slabs be wiped)? what do memset and pool creation cost?
3. can a process *record* an IPC event created by another process, and does the creator's
   stream then wait for that record (events owned by the sidecar, recorded by producers)?
   what do open/record/wait/query cost?
4. what does wrapping pool memory as a CuPy array cost?
5. importing a pool allocation through the driver API (cuMemPoolImportPointer), cost;
6. does a chunked D2D copy overlapped with a chunked peer copy (per-chunk events) beat the
   two copies in sequence (128 MiB, 1 GiB)?
"""

from __future__ import annotations

import argparse
import ctypes
import json
import multiprocessing as mp
import os
import socket
import statistics
import sys
import time
from typing import Any

MiB = 1 << 20
RESULTS: dict[str, Any] = {}


def note(key: str, value: Any) -> None:
    RESULTS[key] = value
    print(f"{key}: {value}", flush=True)


def us(samples: list[float]) -> dict[str, float]:
    s = sorted(samples)
    return {"median_us": round(statistics.median(s) * 1e6, 2), "p99_us": round(s[int(len(s) * 0.99) - 1] * 1e6, 2)}


# --- 1. round trips ------------------------------------------------------------------------------

def _echo(sock: socket.socket, spin: bool) -> None:
    while True:
        if spin:
            while True:
                try:
                    data = sock.recv(256, socket.MSG_DONTWAIT)
                    break
                except BlockingIOError:
                    continue
        else:
            data = sock.recv(256)
        if not data or data == b"q":
            return
        sock.send(data)


def probe_round_trips() -> None:
    for spin in (False, True):
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        child = mp.get_context("fork").Process(target=_echo, args=(b, spin))
        child.start()
        b.close()
        samples = []
        msg = b"x" * 120
        for i in range(3000):
            t = time.perf_counter()
            a.send(msg)
            if spin:
                while True:
                    try:
                        a.recv(256, socket.MSG_DONTWAIT)
                        break
                    except BlockingIOError:
                        continue
            else:
                a.recv(256)
            if i >= 500:
                samples.append(time.perf_counter() - t)
        a.send(b"q")
        child.join()
        note(f"rt_socketpair_{'spin' if spin else 'block'}", us(samples))
    parent, child_end = mp.get_context("fork").Pipe()

    def pipe_echo(conn: Any) -> None:
        while True:
            m = conn.recv()
            if m is None:
                return
            conn.send(m)

    child = mp.get_context("fork").Process(target=pipe_echo, args=(child_end,))
    child.start()
    samples = []
    for i in range(3000):
        t = time.perf_counter()
        parent.send("ft-abcdefghijklmnopqrstuvwxyz")
        parent.recv()
        if i >= 500:
            samples.append(time.perf_counter() - t)
    parent.send(None)
    child.join()
    note("rt_mp_pipe", us(samples))


# --- helpers --------------------------------------------------------------------------------------

def drv() -> Any:
    from cuda.bindings import driver
    return driver


def check(result: Any) -> Any:
    err = result[0]
    if int(err) != 0:
        raise RuntimeError(f"CUDA driver error {err}")
    return result[1] if len(result) == 2 else result[1:]


# --- 2. pools, wipes ------------------------------------------------------------------------------

def probe_pools() -> None:
    import cupy
    from cuda.core import Device, DeviceMemoryResource, DeviceMemoryResourceOptions

    dev = Device(0)
    dev.set_current()
    stream = dev.create_stream()
    t = time.perf_counter()
    mr_a = DeviceMemoryResource(dev, DeviceMemoryResourceOptions(ipc_enabled=True, max_size=8 << 30))
    note("pool_create_us", round((time.perf_counter() - t) * 1e6, 1))
    size = 512 * MiB
    found = []
    for _trial in range(3):
        buf = mr_a.allocate(size, stream=stream)
        stream.sync()
        cupy.cuda.runtime.memsetAsync(int(buf.handle), 0xAB, size, 0)
        cupy.cuda.runtime.deviceSynchronize()
        buf.close(stream)
        stream.sync()
        mr_a.close()
        mr_b = DeviceMemoryResource(dev, DeviceMemoryResourceOptions(ipc_enabled=True, max_size=8 << 30))
        buf_b = mr_b.allocate(size, stream=stream)
        stream.sync()
        view = cupy.ndarray((size,), dtype=cupy.uint8,
                            memptr=cupy.cuda.MemoryPointer(cupy.cuda.UnownedMemory(int(buf_b.handle), size, buf_b), 0))
        found.append(int((view == 0xAB).sum()))
        del view
        buf_b.close(stream)
        stream.sync()
        mr_a = mr_b
    note("old_bytes_seen_in_new_pool_of_512MiB", found)
    t = time.perf_counter()
    buf = mr_a.allocate(size, stream=stream)
    stream.sync()
    note("slab_alloc_512MiB_us", round((time.perf_counter() - t) * 1e6, 1))
    for n in (64 * MiB, 512 * MiB, 2048 * MiB):
        b = mr_a.allocate(n, stream=stream)
        stream.sync()
        times = []
        for _ in range(5):
            t = time.perf_counter()
            cupy.cuda.runtime.memsetAsync(int(b.handle), 0, n, 0)
            cupy.cuda.runtime.deviceSynchronize()
            times.append(time.perf_counter() - t)
        note(f"memset_{n // MiB}MiB_us", round(statistics.median(times) * 1e6, 1))
        b.close(stream)
    d = drv()
    t = time.perf_counter()
    for _ in range(100):
        data = check(d.cuMemPoolExportPointer(int(buf.handle)))
    note("export_pointer_us", round((time.perf_counter() - t) / 100 * 1e6, 2))
    raw = ctypes.string_at(data.getPtr(), 64)
    note("export_data_len", len(raw))
    buf.close(stream)
    mr_a.close()


# --- 3 and 5. cross-process: IPC events recorded by the importer; pointer import ------------------

def _importer(conn: Any) -> None:
    """Child: open the parent's event, run a long kernel, record the parent's event after it."""
    import cupy
    d = drv()
    cupy.cuda.Device(0).use()
    cupy.cuda.runtime.free(cupy.cuda.runtime.malloc(1))    # context
    out: dict[str, Any] = {}
    handle_bytes, pool_fd_payload = conn.recv()
    h = d.CUipcEventHandle()
    ctypes.memmove(h.getPtr(), handle_bytes, 64)
    t = time.perf_counter()
    event = check(d.cuIpcOpenEventHandle(h))
    out["ipc_open_event_us"] = round((time.perf_counter() - t) * 1e6, 1)
    s = cupy.cuda.Stream(non_blocking=True)
    big = cupy.empty(1 << 30, dtype=cupy.uint8)
    # ~50 ms of GPU work, then record the PARENT's event after it.
    with s:
        for _ in range(40):
            big.fill(1)
    check((d.cuEventRecord(event, s.ptr)[0], None))
    conn.send("recorded")
    # record/wait/query costs on an IPC event
    s2 = cupy.cuda.Stream(non_blocking=True)
    s.synchronize()
    rec, wait, query = [], [], []
    for _ in range(2000):
        t0 = time.perf_counter()
        d.cuEventRecord(event, s.ptr)
        t1 = time.perf_counter()
        d.cuStreamWaitEvent(s2.ptr, event, 0)
        t2 = time.perf_counter()
        d.cuEventQuery(event)
        t3 = time.perf_counter()
        rec.append(t1 - t0)
        wait.append(t2 - t1)
        query.append(t3 - t2)
    out["ipc_event_record"] = us(rec)
    out["ipc_event_stream_wait"] = us(wait)
    out["ipc_event_query"] = us(query)
    # pool import + pointer import through the driver API
    from multiprocessing import reduction
    pool_fd = reduction.recv_handle(conn)
    try:
        t = time.perf_counter()
        pool = check(d.cuMemPoolImportFromShareableHandle(
            pool_fd, d.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, 0))
        out["pool_import_us"] = round((time.perf_counter() - t) * 1e6, 1)
        export = d.CUmemPoolPtrExportData()
        ctypes.memmove(export.getPtr(), pool_fd_payload, 64)
        t = time.perf_counter()
        ptr = check(d.cuMemPoolImportPointer(pool, export))
        out["pointer_import_us"] = round((time.perf_counter() - t) * 1e6, 1)
        first = cupy.ndarray((16,), dtype=cupy.uint8,
                             memptr=cupy.cuda.MemoryPointer(cupy.cuda.UnownedMemory(int(ptr), 16, None), 0))
        out["imported_first_bytes"] = first.get().tolist()[:4]
        del first
        t = time.perf_counter()
        check((d.cuMemFree(ptr)[0], None))
        out["pointer_unmap_us"] = round((time.perf_counter() - t) * 1e6, 1)
    except Exception as e:  # noqa: BLE001
        out["pool_import_error"] = repr(e)
    conn.send(out)


def probe_ipc() -> None:
    import cupy
    from cuda.core import Device, DeviceMemoryResource, DeviceMemoryResourceOptions
    d = drv()
    cupy.cuda.Device(0).use()
    event = cupy.cuda.runtime.eventCreateWithFlags(0x2 | 0x4)
    handle = bytes(cupy.cuda.runtime.ipcGetEventHandle(event))
    dev = Device(0)
    dev.set_current()
    mr = DeviceMemoryResource(dev, DeviceMemoryResourceOptions(ipc_enabled=True, max_size=1 << 30))
    stream = dev.create_stream()
    buf = mr.allocate(1 << 20, stream=stream)
    stream.sync()
    cupy.cuda.runtime.memset(int(buf.handle), 7, 1 << 20)
    data = check(d.cuMemPoolExportPointer(int(buf.handle)))
    payload = ctypes.string_at(data.getPtr(), 64)
    ctx = mp.get_context("spawn")
    parent, child_end = ctx.Pipe()
    child = ctx.Process(target=_importer, args=(child_end,))
    child.start()
    parent.send((handle, payload))
    assert parent.recv() == "recorded"
    # Our stream waits on OUR event, recorded by the child after ~50 ms of its work.
    s = cupy.cuda.Stream(non_blocking=True)
    t = time.perf_counter()
    cupy.cuda.runtime.streamWaitEvent(s.ptr, event, 0)
    marker = cupy.cuda.runtime.eventCreateWithFlags(0x2)
    cupy.cuda.runtime.eventRecord(marker, s.ptr)
    cupy.cuda.runtime.eventSynchronize(marker)
    waited = time.perf_counter() - t
    note("creator_waits_for_importer_record_ms", round(waited * 1e3, 2))
    note("creator_wait_respected_importer_record", waited > 0.010)
    # The pool's fd travels with SCM_RIGHTS, as the sidecar sends it.
    from multiprocessing import reduction
    reduction.send_handle(parent, int(mr.allocation_handle.handle), child.pid)
    out = parent.recv()
    child.join(30)
    for k, v in out.items():
        note(k, v)
    buf.close(stream)


# --- 3b. can a third process query an event the creator made and another importer recorded? ---------

def _recorder(handle: bytes, conn: Any) -> None:
    import cupy
    d = drv()
    cupy.cuda.Device(0).use()
    cupy.cuda.runtime.free(cupy.cuda.runtime.malloc(1))
    h = d.CUipcEventHandle()
    ctypes.memmove(h.getPtr(), handle, 64)
    event = check(d.cuIpcOpenEventHandle(h))
    s = cupy.cuda.Stream(non_blocking=True)
    big = cupy.empty(1 << 30, dtype=cupy.uint8)
    conn.recv()
    with s:
        for _ in range(60):
            big.fill(1)
    check((d.cuEventRecord(event, s.ptr)[0], None))
    conn.send("recorded")
    s.synchronize()
    conn.send("done")
    conn.recv()


def _querier(handle: bytes, conn: Any) -> None:
    import cupy
    d = drv()
    cupy.cuda.Device(0).use()
    cupy.cuda.runtime.free(cupy.cuda.runtime.malloc(1))
    h = d.CUipcEventHandle()
    ctypes.memmove(h.getPtr(), handle, 64)
    event = check(d.cuIpcOpenEventHandle(h))
    out: dict[str, Any] = {}
    conn.send("ready")
    assert conn.recv() == "recorded"
    out["query_while_other_importers_work_runs"] = int(d.cuEventQuery(event)[0])
    assert conn.recv() == "done"
    out["query_after_it_finished"] = int(d.cuEventQuery(event)[0])
    s = cupy.cuda.Stream(non_blocking=True)
    plain, waited = [], []
    for _ in range(300):
        t = time.perf_counter()
        s.synchronize()
        plain.append(time.perf_counter() - t)
        t = time.perf_counter()
        d.cuStreamWaitEvent(s.ptr, event, 0)
        s.synchronize()
        waited.append(time.perf_counter() - t)
    out["sync_plain"] = us(plain[50:])
    out["sync_after_ipc_event_wait"] = us(waited[50:])
    conn.send(out)


def probe_query() -> None:
    import cupy
    cupy.cuda.Device(0).use()
    event = cupy.cuda.runtime.eventCreateWithFlags(0x2 | 0x4)
    handle = bytes(cupy.cuda.runtime.ipcGetEventHandle(event))
    ctx = mp.get_context("spawn")
    a_here, a_there = ctx.Pipe()
    b_here, b_there = ctx.Pipe()
    rec = ctx.Process(target=_recorder, args=(handle, a_there))
    que = ctx.Process(target=_querier, args=(handle, b_there))
    rec.start()
    que.start()
    assert b_here.recv() == "ready"
    a_here.send("go")
    assert a_here.recv() == "recorded"
    note("creator_query_while_importer_work_runs (600 = not ready)", int(cupy.cuda.runtime.eventQuery(event)))
    b_here.send("recorded")
    assert a_here.recv() == "done"
    b_here.send("done")
    out = b_here.recv()
    for k, v in out.items():
        note(k, v)
    a_here.send("bye")
    rec.join(30)
    que.join(30)


# --- 4. CuPy views --------------------------------------------------------------------------------

def probe_views() -> None:
    import cupy
    cupy.cuda.Device(0).use()
    base = cupy.empty(64 * MiB, dtype=cupy.uint8)
    ptr = base.data.ptr
    n = 1 << 20
    times = []
    for _ in range(3000):
        t = time.perf_counter()
        mem = cupy.cuda.UnownedMemory(ptr + 4096, n, base, device_id=0)
        a = cupy.ndarray((n // 4,), dtype=cupy.float32, memptr=cupy.cuda.MemoryPointer(mem, 0))
        times.append(time.perf_counter() - t)
        del a
    note("cupy_view_unowned", us(times[500:]))
    times = []
    for _ in range(3000):
        t = time.perf_counter()
        a = base[4096:4096 + n].view(cupy.float32)
        times.append(time.perf_counter() - t)
        del a
    note("cupy_view_slice", us(times[500:]))
    try:
        import torch
        a = cupy.ndarray((n // 4,), dtype=cupy.float32,
                         memptr=cupy.cuda.MemoryPointer(cupy.cuda.UnownedMemory(ptr, n, base, device_id=0), 0))
        times = []
        for _ in range(2000):
            t = time.perf_counter()
            x = torch.from_dlpack(a)
            times.append(time.perf_counter() - t)
            del x
        note("torch_from_dlpack", us(times[500:]))
    except Exception as e:  # noqa: BLE001
        note("torch_from_dlpack", repr(e))
    rt = cupy.cuda.runtime
    s = cupy.cuda.Stream(non_blocking=True)
    e = rt.eventCreateWithFlags(0x2)
    cur = cupy.cuda.get_current_stream()
    dst = cupy.empty(n, dtype=cupy.uint8)
    times = []
    for _ in range(3000):
        t = time.perf_counter()
        rt.eventRecord(e, cur.ptr)
        rt.streamWaitEvent(s.ptr, e, 0)
        rt.memcpyAsync(dst.data.ptr, ptr, n, 4, s.ptr)
        rt.eventRecord(e, s.ptr)
        times.append(time.perf_counter() - t)
    s.synchronize()
    note("put_issue_sequence_4_calls", us(times[500:]))


# --- 6. overlapped chunked copies ---------------------------------------------------------------

def probe_overlap() -> None:
    import cupy
    rt = cupy.cuda.runtime
    if rt.getDeviceCount() < 2:
        note("overlap", "skipped: one GPU")
        return
    for i, j in ((0, 1), (1, 0)):
        with cupy.cuda.Device(i):
            try:
                rt.deviceEnablePeerAccess(j)
            except rt.CUDARuntimeError:
                pass
    for size in (128 * MiB, 1024 * MiB):
        with cupy.cuda.Device(0):
            user = cupy.ones(size, dtype=cupy.uint8)
            pool0 = cupy.empty(size, dtype=cupy.uint8)
            s0 = cupy.cuda.Stream(non_blocking=True)
            events = [rt.eventCreateWithFlags(0x2) for _ in range(8)]
        with cupy.cuda.Device(1):
            pool1 = cupy.empty(size, dtype=cupy.uint8)
            s1 = cupy.cuda.Stream(non_blocking=True)
        for chunks in (1, 2, 4, 8):
            times = []
            for _ in range(8):
                cupy.cuda.Device(0).synchronize()
                cupy.cuda.Device(1).synchronize()
                t = time.perf_counter()
                step = size // chunks
                with cupy.cuda.Device(0):
                    for c in range(chunks):
                        rt.memcpyAsync(pool0.data.ptr + c * step, user.data.ptr + c * step, step, 4, s0.ptr)
                        rt.eventRecord(events[c], s0.ptr)
                with cupy.cuda.Device(1):
                    for c in range(chunks):
                        rt.streamWaitEvent(s1.ptr, events[c], 0)
                        rt.memcpyPeerAsync(pool1.data.ptr + c * step, 1, pool0.data.ptr + c * step, 0, step, s1.ptr)
                    s1.synchronize()
                times.append(time.perf_counter() - t)
            med = statistics.median(times[2:])
            note(f"put_then_peer_{size // MiB}MiB_chunks{chunks}",
                 {"us": round(med * 1e6, 1), "GBps": round(size / med / 1e9, 1)})
        del user, pool0, pool1


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
    parser.add_argument("--only", nargs="*", help="probes to run (default: all)")
    args = parser.parse_args()
    only = set(args.only or ())
    for name, fn in (("round_trips", probe_round_trips), ("pools", probe_pools), ("ipc", probe_ipc),
                     ("query", probe_query), ("views", probe_views), ("overlap", probe_overlap)):
        if only and name not in only:
            continue
        t = time.perf_counter()
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - one failed probe must not hide the others
            import traceback
            traceback.print_exc()
            note(f"{name}_error", repr(e))
        print(f"  [{name} took {time.perf_counter() - t:.1f} s]", flush=True)
    try:
        import cupy
        RESULTS["card"] = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    except Exception:  # noqa: BLE001
        pass
    with open(os.path.join(args.out, "probe-dataplane-v2.json"), "w") as f:
        json.dump(RESULTS, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
