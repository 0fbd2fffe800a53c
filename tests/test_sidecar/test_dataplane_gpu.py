"""The CUDA backend end to end: real sidecar, real client processes, real GPUs (skipped without one).

Covers the v2 data plane on GPUs: zero-copy same-GPU passing ordered by fence events (no
synchronize anywhere), peer copies between GPUs, host<->GPU, reads that end only after
the reader's GPU work, and tenancy: a workflow's pools and slabs never reach another.
"""

from __future__ import annotations

import mmap
import multiprocessing as mp
import os
import signal
import time

import numpy as np
import pytest

cp = pytest.importorskip("cupy")
try:
    GPUS = cp.cuda.runtime.getDeviceCount()
except Exception:  # noqa: BLE001 - no driver
    GPUS = 0
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(GPUS == 0, reason="needs a CUDA GPU")]

import faastube.client as ftc
from faastube import errors, protocol
from raw_client import RawClient

SECRET = np.frombuffer(b"B-SECRET" * 4, dtype=np.uint8)


@pytest.fixture
def cuda_sidecar(make_sidecar):
    return make_sidecar("--gpu-slab", "256Mi", "--gpu-pool-max", "4Gi", "--gpu-quota", "2Gi", "--gpu-arena", "64Mi",
                        backend="cuda")


def _busy_fill(x, value: float, rounds: int = 400) -> None:
    """Many small kernels that end with x == value: long enough to race anything unordered."""
    x.fill(0)
    for _ in range(rounds - 1):
        x += 0
    x += value


def test_same_gpu_put_and_get_is_zero_copy(cuda_sidecar) -> None:
    with ftc.connect(cuda_sidecar.socket_path, workflow="w") as p, ftc.connect(cuda_sidecar.socket_path,
                                                                            workflow="w") as r:
        a = cp.random.random((256, 1024), dtype=cp.float32)
        ref = p.put(a)
        b = r.get(ref, device=0)
        assert isinstance(b, cp.ndarray) and r.last_path == "local"
        assert bool(cp.all(a == b))
        w = p.empty((1024,), cp.int32, device=0)
        w.array[...] = cp.arange(1024, dtype=cp.int32)
        ref2 = p.seal(w)
        view = r.get(ref2, device=0)
        w.array[0] = 77                       # same memory: the reader sees the writer's bytes
        cp.cuda.Device(0).synchronize()
        assert int(view[0]) == 77


def _late_writer(path: str, conn) -> None:
    """Puts arrays whose last kernels are still queued; never synchronizes."""
    with ftc.connect(path, workflow="w", function="writer") as c:
        for i in range(5):
            x = cp.empty(1 << 22, dtype=cp.float32)
            _busy_fill(x, float(i + 1))
            ref = c.put(x, consumers=1)
            conn.send(ref)
            w = c.empty(1 << 22, cp.float32, device=0)
            _busy_fill(w.array, float(100 + i))
            conn.send(c.seal(w, consumers=1))
        assert conn.recv() == "done"


@pytest.mark.parametrize("device", [0, 1] if GPUS > 1 else [0])
def test_a_reader_sees_every_byte_of_a_put_still_being_written_without_any_synchronize(cuda_sidecar, device) -> None:
    ctx = mp.get_context("spawn")
    here, there = ctx.Pipe()
    writer = ctx.Process(target=_late_writer, args=(str(cuda_sidecar.socket_path), there))
    writer.start()
    try:
        with ftc.connect(cuda_sidecar.socket_path, workflow="w", function="reader") as r, cp.cuda.Device(device):
            for i in range(5):
                for expected in (i + 1, 100 + i):
                    view = r.get(here.recv(), device=device)
                    assert float(view.min()) == expected and float(view.max()) == expected
                    del view
            here.send("done")
    finally:
        writer.join(60)
    assert writer.exitcode == 0


def test_host_data_reaches_the_gpu_and_gpu_data_reaches_the_host(cuda_sidecar) -> None:
    with ftc.connect(cuda_sidecar.socket_path, workflow="w") as c:
        h = np.random.default_rng(0).random(1 << 20)
        ref = c.put(h)
        g = c.get(ref, device=0)
        assert c.last_path == "h2d" and isinstance(g, cp.ndarray)
        assert np.array_equal(cp.asnumpy(g), h)
        big = np.random.default_rng(1).random(48 << 17)       # 48 MiB: the transfer engine's size
        g2 = c.get(c.put(big), device=0)
        assert np.array_equal(cp.asnumpy(g2), big)
        x = cp.arange(1 << 20, dtype=cp.float64)
        ref2 = c.put(x)
        back = c.get(ref2, device="cpu")
        assert c.last_path == "d2h" and isinstance(back, np.ndarray) and not back.flags.writeable
        assert np.array_equal(back, np.arange(1 << 20, dtype=np.float64))


@pytest.mark.skipif(GPUS < 2, reason="needs two GPUs")
def test_another_gpu_gets_a_peer_copy_once_split_after_the_writers_fences(cuda_sidecar) -> None:
    with ftc.connect(cuda_sidecar.socket_path, workflow="w") as c:
        a = cp.empty(48 << 18, dtype=cp.float32)     # 48 MiB: put in two fenced halves
        _busy_fill(a, 3.0)
        a[-1] = 4.0
        ref = c.put(a)
        with cp.cuda.Device(1):
            b = c.get(ref, device=1)
            assert b.device.id == 1 and c.last_path in ("nvlink", "pcie", "peer")
            assert float(b[:-1].min()) == 3.0 and float(b[:-1].max()) == 3.0 and float(b[-1]) == 4.0
            c.get(ref, device=1)
            assert c.last_path == "local", "the replica on GPU 1 is reused: data crosses once"
        assert set(c.stat(ref).locations) == {"gpu:0", "gpu:1"}


def test_torch_cuda_tensors_go_in_and_come_out_without_host_copies(cuda_sidecar) -> None:
    torch = pytest.importorskip("torch")
    with ftc.connect(cuda_sidecar.socket_path, workflow="w") as c:
        t = torch.arange(4096, device="cuda:0", dtype=torch.float16)
        ref = c.put(t)
        out = torch.from_dlpack(c.get(ref, device=0))
        assert out.is_cuda and torch.equal(out, t)
        side = torch.cuda.Stream(device=0)
        with torch.cuda.stream(side):
            u = torch.full((1 << 20,), 5.0, device="cuda:0")
            ref2 = c.put(u)                          # queued on torch's current (side) stream
        assert float(torch.from_dlpack(c.get(ref2, device=0)).min()) == 5.0


def test_a_read_ends_only_after_the_readers_gpu_work_so_memory_is_not_recycled_under_it(make_sidecar) -> None:
    sc = make_sidecar("--gpu-arena", "1Mi", "--gpu-quota", "2Gi", backend="cuda")
    with ftc.connect(sc.socket_path, workflow="w") as p, ftc.connect(sc.socket_path, workflow="w") as r:
        n = 1 << 18                                  # 1 MiB: the writer wants this very range back
        writer_stream, reader_stream = cp.cuda.Stream(non_blocking=True), cp.cuda.Stream(non_blocking=True)
        with writer_stream:
            ref = p.put(cp.full(n, 1.0, cp.float32), consumers=1)
        with reader_stream:
            view = r.get(ref, device=0)
            total = cp.zeros((), cp.float32)
            for _ in range(300):                     # slow reads of the view, queued on the reader's stream
                total += view.sum() / 300
            r.release(ref)                           # reported once those reads are done, not before
            del view
        with writer_stream:
            for _ in range(20):
                p.put(cp.full(n, 9.0, cp.float32), consumers=1)
        reader_stream.synchronize()
        assert abs(float(total) - n) < 1e-2 * n, "the reader's kernels read recycled memory"


def _crashing_client(path: str, seed: int) -> None:
    c = ftc.connect(path, workflow="crash")
    c.empty((1 << 20,), np.float32, device=0)
    ref = c.put(cp.ones(1 << 18, cp.float32), ttl=0.5)
    c.get(ref, device=0)
    os.kill(os.getpid(), signal.SIGKILL)


def test_crashed_gpu_clients_give_their_pool_memory_back(cuda_sidecar) -> None:
    path = str(cuda_sidecar.socket_path)
    with ftc.connect(path, workflow="crash") as c:
        base = {p["location"]: p["used_bytes"] for p in c.stats()["pools"]}
        ctx = mp.get_context("spawn")
        for seed in range(4):
            proc = ctx.Process(target=_crashing_client, args=(path, seed))
            proc.start()
            proc.join(120)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            now = {p["location"]: p["used_bytes"] for p in c.stats()["pools"]}
            if now == base:
                break
            time.sleep(0.2)
        assert now == base
    assert cuda_sidecar.alive()


def test_out_of_pool_memory_on_a_gpu_is_an_error_not_a_crash(make_sidecar) -> None:
    sc = make_sidecar("--gpu-slab", "64Mi", "--gpu-pool-max", "128Mi", "--gpu-arena", "64Mi", backend="cuda")
    with ftc.connect(sc.socket_path, workflow="w") as c:
        with pytest.raises(errors.OutOfPoolMemory, match="quota|full"):
            c.empty((200 << 20,), np.uint8, device=0)
        c.ping()
    assert sc.alive()


# --- tenancy on the GPU ----------------------------------------------------------------------------

def _scan(raw: RawClient, intro: dict, pool_fd: int | None, state: dict) -> bytes:
    """Map a slab the way an attacker would (driver API), return its bytes."""
    from faastube.mapping import cuda_importer

    importer = cuda_importer()
    if pool_fd is not None:
        state["pool"] = intro["pool"]
        importer.import_pool(intro["pool"], 0, os.dup(pool_fd))
    # The attacker maps with its own pool, whatever the reply names.
    slab = importer.map_slab(state["pool"], intro["id"], intro["size"], 0, 0, intro["payload"])
    data = cp.ndarray((intro["size"],), cp.uint8,
                      memptr=cp.cuda.MemoryPointer(cp.cuda.UnownedMemory(slab.ptr, intro["size"], slab), 0))
    return cp.asnumpy(data).tobytes()


def test_a_workflow_can_map_nothing_of_another_workflows_gpu_memory(cuda_sidecar) -> None:
    path = cuda_sidecar.socket_path
    with ftc.connect(path, workflow="b") as b:
        secret = cp.asarray(np.tile(SECRET, 1 << 14))
        refs = [b.put(secret) for _ in range(8)]
        a = RawClient(path, workflow="a")
        try:
            for ref in refs:
                kind, reply, _ = a.call({"op": "get", "ref": ref, "location": "gpu:0"})
                assert kind is protocol.Kind.ERROR and reply["code"] == protocol.ErrorCode.PERMISSION_DENIED
            kind, reply, fds = a.call({"op": "arena", "location": "gpu:0", "nbytes": 1 << 20})
            assert kind is protocol.Kind.REPLY and len(fds) == 1, "a gets a pool of its own"
            state: dict = {}
            seen = _scan(a, reply["slab"], fds[0], state)
            assert SECRET.tobytes() not in seen and seen.count(0) == len(seen), "a fresh slab is wiped"
            # b's pool is not a's: even a's imported pool can't map b's allocations.
            kind, breply, _ = RawClient(path, workflow="b", function="spy").call(
                {"op": "get", "ref": refs[0], "location": "gpu:0"})
            with pytest.raises(errors.ProtocolError):
                _scan(a, breply["slab"], None, state)
        finally:
            a.close()


def test_gpu_memory_freed_by_one_workflow_reaches_another_only_wiped(make_sidecar) -> None:
    sc = make_sidecar("--gpu-arena", "256Mi", "--gpu-pool-max", "1Gi", "--gpu-quota", "1Gi", "--idle-release", "100ms",
                      backend="cuda")
    b = ftc.connect(sc.socket_path, workflow="b")
    secret = cp.asarray(np.tile(SECRET, (200 << 20) // SECRET.size))
    refs = [b.put(secret) for _ in range(3)]
    for ref in refs:
        b.free(ref)
    b.close()
    time.sleep(1.0)      # b's arenas retired and freed, its pool closed
    a = RawClient(sc.socket_path, workflow="a")
    try:
        state: dict = {}
        pool_fd = None
        for _ in range(3):
            kind, reply, fds = a.call({"op": "arena", "location": "gpu:0", "nbytes": 256 << 20})
            assert kind is protocol.Kind.REPLY, reply
            pool_fd = fds[0] if fds else None
            seen = _scan(a, reply["slab"], pool_fd, state)
            assert SECRET.tobytes()[:16] not in seen and seen.count(0) == len(seen)
    finally:
        a.close()


def test_host_replicas_of_gpu_objects_are_read_only_for_readers(cuda_sidecar) -> None:
    with ftc.connect(cuda_sidecar.socket_path, workflow="w") as c:
        ref = c.put(cp.arange(4096, dtype=cp.uint8))
        reader = RawClient(cuda_sidecar.socket_path, workflow="w", function="reader")
        try:
            kind, reply, fds = reader.call({"op": "get", "ref": ref, "location": "host"})
            assert kind is protocol.Kind.REPLY and reply["slab"]["writable"] is False
            with pytest.raises(PermissionError):
                mmap.mmap(fds[0], 4096, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            reader.close()
