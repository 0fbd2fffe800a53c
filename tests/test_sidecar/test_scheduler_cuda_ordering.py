"""The CUDA executor's ordering logic (hops, lanes, staging slots, events) on a simulated CUDA runtime.

The GPU test of a relayed GPU -> GPU copy once found the destination's first bytes
equal to the source's *initial* fill: the source was still being written by a
kernel on the default stream when the copies, on non-blocking streams, read it.
These tests run the real scheduler and the real ``CudaChunkExecutor`` against
``simcuda``, a small model of the CUDA semantics the executor relies on, whose
runnable work runs in a seeded random order, so any ordering the streams and
events do not enforce eventually goes wrong.
"""

from __future__ import annotations

import itertools
import random
import sys
from collections.abc import Iterator
from typing import Any

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
from simcuda import SimCuda

GB = 1e9
GPUS = [0, 1, 2, 3]
SLOT_BYTES = 64 << 10
SETTINGS = SchedulerSettings(chunk_bytes=SLOT_BYTES, max_inflight_chunks_per_link=4)
STAGING = StagingSettings(slots_per_relay=3, slot_bytes=SLOT_BYTES)
SIZE = 37 * SLOT_BYTES + 12345  # many chunks per relay (slot reuse), a partial last chunk


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
        sim.default_stream_write(src_node, src, data)
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


def test_link_and_lane_streams_never_serialize_with_the_default_stream(sim: SimCuda) -> None:
    copy_and_read_back(sim, ROUTES[3], pending_source_fill=False, seed=1)
    assert sim.copies and not any(c.stream_blocking for c in sim.copies)


def test_each_relay_runs_both_hops_of_its_path_host_to_gpu(sim: SimCuda) -> None:
    expected, landed = copy_and_read_back(sim, ROUTES[3], pending_source_fill=False, seed=2)
    assert landed == expected
    peer = [c for c in sim.copies if c.api == "memcpyPeerAsync"]
    assert peer and all(c.stream_device == c.src_device for c in peer)  # the relay pushes
    h2d = [c for c in sim.copies if c.api == "memcpyAsync"]
    assert all(c.stream_device == c.dst_device for c in h2d)
    assert {c.stream_device for c in h2d} == {0, 1, 2, 3}


def test_each_relay_runs_both_hops_of_its_path_gpu_to_host(sim: SimCuda) -> None:
    # GPU 0's copy engines serve only its own PCIe link: the relays pull over NVLink.
    paths = [((0, HOST), 1.0), ((0, 1, HOST), 1.0), ((0, 2, HOST), 1.0), ((0, 3, HOST), 1.0)]
    expected, landed = copy_and_read_back(sim, paths, pending_source_fill=True, seed=3)
    assert landed == expected
    peer = [c for c in sim.copies if c.api == "memcpyPeerAsync"]
    assert peer and all(c.stream_device == c.dst_device != 0 for c in peer)
    assert {c.stream_device for c in sim.copies if c.stream_device == 0} == {0}
    assert all(c.api == "memcpyAsync" for c in sim.copies if c.stream_device == 0)


def test_without_lanes_a_one_relay_chunk_takes_the_event_chained_path(
        sim: SimCuda, monkeypatch: pytest.MonkeyPatch) -> None:
    # Kept to compare against lanes on GPUs: GPU -> host relays are then pushed by the source.
    monkeypatch.setattr(sys.modules[__name__], "STAGING",
                        StagingSettings(slots_per_relay=3, slot_bytes=SLOT_BYTES, relay_lanes=False))
    paths = [((0, HOST), 1.0), ((0, 1, HOST), 1.0)]
    expected, landed = copy_and_read_back(sim, paths, pending_source_fill=True, seed=4)
    assert landed == expected
    peer = [c for c in sim.copies if c.api == "memcpyPeerAsync"]
    assert peer and all(c.stream_device == c.src_device == 0 for c in peer)
