"""The CUDA backend's transfer front end on a simulated CUDA runtime: which copies bypass the engine.

A copy whose plan is the single direct link must cost what a user's own pinned copy
costs: one ``cudaMemcpyAsync`` issued by the caller, nothing else. Larger ones go
through the engine over every path that pays, and land exactly.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Iterator

import pytest
from faastube_sidecar.backends.cuda_transfers import EngineSettings, ScheduledTransfers
from faastube_sidecar.transfers.cuda_executor import EngineClosed
from faastube_sidecar.transfers.planner import CostModel
from faastube_sidecar.transfers.scheduler import (
    HOST,
    FunctionIdentity,
    LinkId,
    TransferError,
    TransferRequest,
    sized_route,
)
from faastube_spec import topology
from simcuda import SimCuda, SimEvent

KiB = 1 << 10
MiB = 1 << 20
# Small chunks keep the simulated memory small; the costs are scaled down with them, so
# that a 2 MiB copy is split like a 256 MiB one on the real box.
SMALL = EngineSettings(
    cost=CostModel(copy_latency_s=1e-6, engine_overhead_s=2e-6, path_issue_s=1e-6,
                   hop_latency_s=1e-6, relay_edge_bytes=16 * KiB),
    chunk_bytes=256 * KiB, max_inflight_chunks_per_link=2)


@pytest.fixture(params=[0, 1, 2], ids=lambda s: f"seed{s}")
def sim(monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> Iterator[SimCuda]:
    s = SimCuda(4, seed=request.param)
    monkeypatch.setitem(sys.modules, "cupy", s.module)
    yield s


def transfers_on(name: str, settings: EngineSettings = SMALL) -> ScheduledTransfers:
    node = topology.builtin_node(name)
    return ScheduledTransfers(node, {g: g for g in node.gpu_indices}, settings=settings)


@pytest.fixture
def lent(sim: SimCuda) -> Iterator[ScheduledTransfers]:
    st = transfers_on("lent-4xh100")
    yield st
    st.close()


def buffers(sim: SimCuda, src: object, dst: object, size: int, seed: int) -> tuple[int, int, bytes]:
    data = random.Random(seed).randbytes(size)
    src_ptr = sim.alloc(size, None if src == HOST else int(src))  # type: ignore[call-overload]
    dst_ptr = sim.alloc(size, None if dst == HOST else int(dst), fill=0xEE)  # type: ignore[call-overload]
    sim.write(src_ptr, data)
    return src_ptr, dst_ptr, data


def engine_link_bytes(st: ScheduledTransfers) -> dict[LinkId, int]:
    return {k: v for k, v in st.engine.scheduler.link_bytes().items() if v}


@pytest.mark.parametrize(("src", "dst"), [(HOST, 0), (2, HOST), (0, 3)])
def test_a_small_copy_is_exactly_one_copy_call_issued_by_the_caller(
        sim: SimCuda, lent: ScheduledTransfers, src: object, dst: object) -> None:
    size = 100 * KiB + 7
    src_ptr, dst_ptr, data = buffers(sim, src, dst, size, seed=1)
    preallocated = len(sim.copies)
    transfer = lent.start(src=src, dst=dst, src_address=src_ptr, dst_address=dst_ptr,  # type: ignore[arg-type]
                          nbytes=size)
    assert transfer.direct and not lent.wants_engine(src, dst, size)  # type: ignore[arg-type]
    calls = sim.copies[preallocated:]
    assert len(calls) == 1  # issued before start() returned: no thread hop, no chunks
    assert calls[0].api == ("memcpyPeerAsync" if HOST not in (src, dst) else "memcpyAsync")
    assert calls[0].nbytes == size and calls[0].stream_blocking
    transfer.wait()
    assert sim.read(dst_ptr, size) == data
    assert engine_link_bytes(lent) == {}  # the scheduler never saw it
    assert transfer.label in ("h2d-direct", "d2h-direct", "nvlink-direct")


@pytest.mark.parametrize(("src", "dst"), [(1, HOST), (1, 2)])
def test_a_small_copy_waits_for_its_source_still_being_written_on_the_default_stream(
        sim: SimCuda, lent: ScheduledTransfers, src: int, dst: object) -> None:
    size = 64 * KiB
    src_ptr, dst_ptr, old = buffers(sim, src, dst, size, seed=2)
    new = bytes(b ^ 0x5A for b in old)
    sim.default_stream_write(src, src_ptr, new)  # like `x[:] = ...` in CuPy, not run yet
    transfer = lent.start(src=src, dst=dst, src_address=src_ptr, dst_address=dst_ptr,  # type: ignore[arg-type]
                          nbytes=size)
    transfer.wait()
    assert sim.read(dst_ptr, size) == new


def test_a_direct_copy_submitted_the_old_way_completes_its_future(
        sim: SimCuda, lent: ScheduledTransfers) -> None:
    size = 32 * KiB
    src_ptr, dst_ptr, data = buffers(sim, HOST, 1, size, seed=3)
    label, future = lent.submit(src=HOST, dst=1, src_address=src_ptr, dst_address=dst_ptr, nbytes=size,
                                workflow="wf", function="f")
    assert label == "h2d-direct"
    assert future.result(timeout=30) is None
    assert sim.read(dst_ptr, size) == data


@pytest.mark.parametrize(("src", "dst", "label"), [
    (HOST, 0, "h2d-multipath[0,1,2,3]"),
    (2, HOST, "d2h-multipath[2,0,1,3]"),
])
def test_a_large_copy_is_split_over_every_pcie_link_and_lands_exactly(
        sim: SimCuda, lent: ScheduledTransfers, src: object, dst: object, label: str) -> None:
    size = 2 * MiB + 12345
    src_ptr, dst_ptr, data = buffers(sim, src, dst, size, seed=4)
    assert lent.wants_engine(src, dst, size)  # type: ignore[arg-type]
    transfer = lent.start(src=src, dst=dst, src_address=src_ptr, dst_address=dst_ptr,  # type: ignore[arg-type]
                          nbytes=size)
    assert not transfer.direct and transfer.label == label
    transfer.wait(timeout_s=60)
    assert sim.read(dst_ptr, size) == data
    direction = "h2d" if src == HOST else "d2h"
    assert set(engine_link_bytes(lent)) == {LinkId(f"{direction}:{g}") for g in range(4)}
    sizes = transfer.plan.sizes_bytes
    assert sum(sizes) == size and sizes[0] == max(sizes)  # the direct link starts first: most bytes


def test_a_single_link_copy_longer_than_the_engines_window_is_chunked_through_the_engine(
        sim: SimCuda) -> None:
    # One PCIe path (no NVLink relays): the plan is direct at every size, but a copy longer than
    # the chunks the engine keeps in flight would block that link's FIFO copy engine.
    st = transfers_on("4x-a10")
    try:
        size = 4 * SMALL.direct_max_bytes
        src_ptr, dst_ptr, data = buffers(sim, HOST, 1, size, seed=5)
        before = len(sim.copies)
        transfer = st.start(src=HOST, dst=1, src_address=src_ptr, dst_address=dst_ptr, nbytes=size)
        assert not transfer.direct and transfer.label == "h2d-direct"
        transfer.wait(timeout_s=60)
        assert sim.read(dst_ptr, size) == data
        assert len(sim.copies) - before == size // SMALL.chunk_bytes
        assert engine_link_bytes(st) == {LinkId("h2d:1"): size}
    finally:
        st.close()


def test_the_split_threshold_is_where_start_stops_copying_directly(
        sim: SimCuda, lent: ScheduledTransfers) -> None:
    threshold = lent.split_threshold_bytes(HOST, 0)
    assert threshold is not None and threshold <= SMALL.direct_max_bytes
    assert not lent.wants_engine(HOST, 0, threshold - 1)
    assert lent.wants_engine(HOST, 0, threshold)
    assert len(lent.plan(HOST, 0, threshold).paths) > 1


def test_default_settings_keep_the_copy_the_issue_measured_off_the_engine() -> None:
    # 1 MiB through the engine ran at 5 GB/s against 33 GB/s for one pinned copy.
    node = topology.builtin_node("lent-4xh100")
    from faastube_sidecar.transfers import planner

    base = planner.plan_paths(node, HOST, 0)
    settings = EngineSettings()
    threshold = planner.split_threshold_bytes(base, catalog=planner.PathCatalog.for_topology(node),
                                              cost=settings.cost)
    assert threshold is not None and MiB < 4 * MiB < threshold <= settings.direct_max_bytes


def test_the_engine_reports_a_duplicate_id_through_its_future_and_keeps_the_first(
        sim: SimCuda, lent: ScheduledTransfers) -> None:
    size = 2 * MiB
    src_ptr, dst_ptr, data = buffers(sim, HOST, 0, size, seed=6)
    route = sized_route([((HOST, 0), size)])
    request = TransferRequest("same", FunctionIdentity("wf", "f"), route, src_address=src_ptr,
                              dst_address=dst_ptr)
    first = lent.engine.submit(request)
    second = lent.engine.submit(request)
    with pytest.raises(TransferError, match="already in progress"):
        second.result(timeout=30)
    assert first.result(timeout=30).path_label == "h2d-direct"
    assert sim.read(dst_ptr, size) == data


def test_a_cuda_error_while_polling_fails_every_waiting_transfer_instead_of_hanging(
        sim: SimCuda, lent: ScheduledTransfers, monkeypatch: pytest.MonkeyPatch) -> None:
    size = 2 * MiB
    src_ptr, dst_ptr, _data = buffers(sim, HOST, 0, size, seed=7)

    def broken(self: object) -> bool:
        raise RuntimeError("cudaErrorLaunchFailure")

    monkeypatch.setattr(SimEvent, "done", property(broken))
    transfer = lent.start(src=HOST, dst=0, src_address=src_ptr, dst_address=dst_ptr, nbytes=size)
    with pytest.raises(EngineClosed, match="cudaErrorLaunchFailure"):
        transfer.wait(timeout_s=30)
    with pytest.raises(EngineClosed):
        lent.start(src=HOST, dst=0, src_address=src_ptr, dst_address=dst_ptr, nbytes=size)
