"""Chunked and multi-path copies on real GPUs: random data, poisoned destinations, paths recorded.

Also the CUDA backend's front end (``ScheduledTransfers``): small copies as one direct copy,
large ones over every path its cost model pays for. Skipped without CuPy or a GPU. On the
4x H100 machine:
    python3 -m pytest -q tests/test_sidecar/test_cuda_executor_copies.py
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

cp = pytest.importorskip("cupy")
try:
    _GPUS = cp.cuda.runtime.getDeviceCount()
except cp.cuda.runtime.CUDARuntimeError:
    _GPUS = 0
if _GPUS < 1:
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from faastube_bench.pinned_ring import PinnedHostRing
from faastube_sidecar.backends.cuda_transfers import ScheduledTransfers
from faastube_sidecar.transfers.cuda_executor import (
    CudaChunkExecutor,
    CudaTransferEngine,
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
    TransferResult,
    TransferScheduler,
    make_route,
)

pytestmark = pytest.mark.gpu
GB = 1e9
GPUS = list(range(min(_GPUS, 4)))
multigpu = pytest.mark.skipif(len(GPUS) < 2, reason="needs two or more GPUs")
SETTINGS = SchedulerSettings(chunk_bytes=4 << 20, max_inflight_chunks_per_link=4)
STAGING = StagingSettings(slots_per_relay=3, slot_bytes=4 << 20)


@pytest.fixture(scope="module")
def ring() -> Iterator[PinnedHostRing]:
    with PinnedHostRing(256 << 20) as r:
        yield r


@pytest.fixture
def executor() -> Iterator[CudaChunkExecutor]:
    ex = CudaChunkExecutor(GPUS, staging=STAGING)
    yield ex
    ex.close()


def run(executor: CudaChunkExecutor, request: TransferRequest) -> TransferResult:
    links = node_links(GPUS, pcie_bandwidth_bytes_per_s=55 * GB, p2p_bandwidth_bytes_per_s=390 * GB)
    sched = TransferScheduler(links, executor=executor, clock=MonotonicClock(), settings=SETTINGS)
    done: list[TransferResult] = []
    sched.submit(request, done.append)
    run_to_completion(sched, executor)
    return done[0]


def device_buffer(gpu: int, size: int, fill: int) -> Any:
    with cp.cuda.Device(gpu):
        buf = cp.full(size, fill, dtype=cp.uint8)
        cp.cuda.Device(gpu).synchronize()
    return buf


def random_host(ring: PinnedHostRing, size: int, seed: int) -> tuple[Any, Any]:
    piece = ring.allocate(size)
    view = ring.view(piece)
    view[:] = np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)
    return piece, view


# An odd size so the last chunk of each path is partial.
SIZE = (37 << 20) + 12345


def h2d_case(ring: PinnedHostRing, executor: CudaChunkExecutor, paths: list, target: int) -> str:
    piece, src = random_host(ring, SIZE, seed=len(paths))
    dst = device_buffer(target, SIZE, 0xAB)
    try:
        req = TransferRequest("h2d", FunctionIdentity("wf", "f"), make_route(paths, SIZE),
                              src_address=ring.address_of(piece), dst_address=dst.data.ptr)
        result = run(executor, req)
        assert np.array_equal(cp.asnumpy(dst), src)
    finally:
        ring.free(piece)
    return result.path_label


def test_chunked_pinned_host_to_gpu_copy_is_exact(ring: PinnedHostRing,
                                                   executor: CudaChunkExecutor) -> None:
    assert h2d_case(ring, executor, [((HOST, 0), 1.0)], 0) == "h2d-direct"


@multigpu
def test_multipath_host_to_gpu_copy_through_relays_is_exact(ring: PinnedHostRing,
                                                            executor: CudaChunkExecutor) -> None:
    paths = [((HOST, 0), 1.0)] + [((HOST, r, 0), 1.0) for r in GPUS[1:]]
    label = h2d_case(ring, executor, paths, 0)
    assert label == f"h2d-multipath[{','.join(str(g) for g in GPUS)}]"


def test_chunked_gpu_to_host_copy_is_exact(ring: PinnedHostRing, executor: CudaChunkExecutor) -> None:
    src = device_buffer(0, SIZE, 0)
    with cp.cuda.Device(0):
        src[:] = cp.random.default_rng(7).integers(0, 256, SIZE, dtype=cp.uint8)
        cp.cuda.Device(0).synchronize()   # the source is complete before any copy reads it
    piece = ring.allocate(SIZE)
    out = ring.view(piece)
    out[:] = 0xCD
    try:
        paths = [((0, HOST), 1.0)] + ([((0, 1, HOST), 1.0)] if len(GPUS) > 1 else [])
        req = TransferRequest("d2h", FunctionIdentity("wf", "f"), make_route(paths, SIZE),
                              src_address=src.data.ptr, dst_address=ring.address_of(piece))
        result = run(executor, req)
        assert np.array_equal(out, cp.asnumpy(src))
        assert result.path_label == ("d2h-multipath[0,1]" if len(GPUS) > 1 else "d2h-direct")
    finally:
        ring.free(piece)


@multigpu
@pytest.mark.parametrize(("paths", "label"), [
    ([((0, 1), 1.0)], "nvlink-direct"),
    ([((0, 2, 1), 1.0)], "nvlink-relay[2]"),
    ([((0, 1), 2.0), ((0, 2, 1), 1.0), ((0, 3, 1), 1.0)], "nvlink-multipath[direct,2,3]"),
])
def test_gpu_to_gpu_direct_and_relayed_copies_are_exact(executor: CudaChunkExecutor, paths: list,
                                                        label: str) -> None:
    used = {g for p, _ in paths for g in p}
    if not used <= set(GPUS):
        pytest.skip(f"needs GPUs {sorted(used)}")
    src = device_buffer(0, SIZE, 0)
    with cp.cuda.Device(0):
        src[:] = cp.random.default_rng(11).integers(0, 256, SIZE, dtype=cp.uint8)
        cp.cuda.Device(0).synchronize()   # the source is complete before any copy reads it
    dst = device_buffer(1, SIZE, 0xEE)
    req = TransferRequest("p2p", FunctionIdentity("wf", "f"), make_route(paths, SIZE),
                          src_address=src.data.ptr, dst_address=dst.data.ptr)
    result = run(executor, req)
    assert result.path_label.replace("pcie", "nvlink") == label  # pairs without NVLink say pcie
    assert np.array_equal(cp.asnumpy(dst), cp.asnumpy(src))


def test_engine_thread_runs_concurrent_transfers_from_other_threads(ring: PinnedHostRing) -> None:
    links = node_links(GPUS, pcie_bandwidth_bytes_per_s=55 * GB, p2p_bandwidth_bytes_per_s=390 * GB)
    size = 9 << 20
    pieces, dsts, srcs = [], [], []
    with CudaTransferEngine(GPUS, links, settings=SETTINGS, staging=STAGING) as engine:
        futures = []
        for i in range(3):
            piece, src = random_host(ring, size, seed=100 + i)
            dst = device_buffer(0, size, 0x11)
            pieces.append(piece), dsts.append(dst), srcs.append(src)
            req = TransferRequest(f"t{i}", FunctionIdentity("wf", f"f{i}"),
                                  make_route([((HOST, 0), 1.0)], size),
                                  src_address=ring.address_of(piece), dst_address=dst.data.ptr)
            futures.append(engine.submit(req))
        results = [f.result(timeout=30) for f in futures]
        stats = engine.scheduler.stats()
    for src, dst in zip(srcs, dsts):
        assert np.array_equal(cp.asnumpy(dst), src)
    for piece in pieces:
        ring.free(piece)
    assert {r.path_label for r in results} == {"h2d-direct"}
    assert sum(s.bytes_total for s in stats.values()) == 3 * size


@pytest.fixture(scope="module")
def scheduled() -> Iterator[ScheduledTransfers]:
    try:
        st = ScheduledTransfers.for_local_node(GPUS)
    except Exception as e:  # noqa: BLE001 - no NVML here: the front end cannot plan
        pytest.skip(f"no NVML topology: {e}")
    yield st
    st.close()


def test_a_small_copy_through_the_backend_is_one_direct_copy_and_exact(
        ring: PinnedHostRing, scheduled: ScheduledTransfers) -> None:
    size = (1 << 20) + 123
    piece, src = random_host(ring, size, seed=21)
    dst = device_buffer(0, size, 0xAB)
    try:
        transfer = scheduled.start(src=HOST, dst=0, src_address=ring.address_of(piece),
                                   dst_address=dst.data.ptr, nbytes=size)
        assert transfer.direct and transfer.label == "h2d-direct"
        transfer.wait()
        assert np.array_equal(cp.asnumpy(dst), src)
    finally:
        ring.free(piece)


@pytest.mark.parametrize("direction", ["h2d", "d2h"])
def test_a_large_copy_through_the_backend_is_split_as_planned_and_exact(
        ring: PinnedHostRing, scheduled: ScheduledTransfers, direction: str) -> None:
    size = (96 << 20) + 12345
    piece = ring.allocate(size)
    host = ring.view(piece)
    dev = device_buffer(0, size, 0xAB)
    try:
        if direction == "h2d":
            host[:] = np.random.default_rng(22).integers(0, 256, size, dtype=np.uint8)
            src, dst, s_addr, d_addr = HOST, 0, ring.address_of(piece), dev.data.ptr
        else:
            host[:] = 0xCD
            with cp.cuda.Device(0):  # queued on the default stream, not synchronized: the
                dev[:] = cp.random.default_rng(23).integers(0, 256, size, dtype=cp.uint8)  # copy orders after it
            src, dst, s_addr, d_addr = 0, HOST, dev.data.ptr, ring.address_of(piece)
        plan = scheduled.plan(src, dst, size)
        transfer = scheduled.start(src=src, dst=dst, src_address=s_addr, dst_address=d_addr, nbytes=size)
        assert not transfer.direct  # longer than the engine's window: never one plain copy
        transfer.wait(timeout_s=60)
        assert np.array_equal(cp.asnumpy(dev), host)
        if len(plan.paths) > 1:
            assert "multipath" in transfer.label
    finally:
        ring.free(piece)
