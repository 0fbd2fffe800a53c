"""Queue-aware eviction and restore on the data plane, with the host backend's simulated GPUs.

The GPUs are shared memory here, so every byte really moves: which object leaves first,
where it goes (an idle peer GPU, else the workflow's host pool), that a read of an
evicted object returns its bytes, and when objects come back. Free memory is simulated
(`SimulatedMemory`): "another process" takes and gives back GPU memory.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from dataplane_doubles import (
    ALICE,
    ALICE_READER,
    MALLORY,
    ArenaWriter,
    Clock,
    close_fds,
    read,
    session,
)
from faastube import errors
from faastube.locations import HOST, gpu
from faastube_sidecar.backends import CopyTicket, Span
from faastube_sidecar.backends.host import HostBackend
from faastube_sidecar.dataplane import DataPlane, DataPlaneConfig
from faastube_sidecar.devicememory import SimulatedMemory
from faastube_sidecar.elastic import MemoryPolicy
from faastube_sidecar.identity import Domain, Identity
from faastube_sidecar.pool import PoolLimits

MiB = 1 << 20
GPU0, GPU1 = gpu(0), gpu(1)
QUEUE = MemoryPolicy(name="elastic+eviction", floor_bytes=0, evict_wait_s=0.2)


def plane(*, policy: MemoryPolicy = QUEUE, gpu_max: int = 4 * MiB, arena: int = 4 * MiB, total: int = 64 * MiB,
          backend: HostBackend | None = None) -> tuple[DataPlane, SimulatedMemory, Clock]:
    clock = Clock()
    gpu_limits = PoolLimits(slab_bytes=MiB, max_bytes=gpu_max, arena_bytes=arena, quota_bytes=gpu_max)
    host_limits = PoolLimits(slab_bytes=MiB, max_bytes=64 * MiB, arena_bytes=MiB, quota_bytes=32 * MiB)
    memory = SimulatedMemory(2, total)
    config = DataPlaneConfig(default_ttl_s=60.0, gpu_limits=gpu_limits, host_limits=host_limits,
                             publish_grace_s=0.05, memory=policy)
    dp = DataPlane(backend or HostBackend(simulated_gpus=2), config, device_memory=memory, clock=clock)
    memory.used_by_us = lambda g: dp.budgets[gpu(g)].total
    dp.refresh_memory()
    return dp, memory, clock


def blob(i: int, nbytes: int = MiB) -> bytes:
    return bytes([i % 251]) * nbytes


async def fill(w: ArenaWriter, n: int, **publish: Any) -> list[str]:
    return [await w.put(blob(i), **publish) for i in range(n)]


def where(dp: DataPlane, ref: str) -> set[str]:
    return {str(loc) for loc in dp.lifetimes.lookup(ref).replicas}


async def test_a_full_gpu_moves_out_the_object_read_furthest_back_in_the_queue() -> None:
    dp, _, _ = plane()
    w = ArenaWriter(dp, session(dp, ALICE), GPU0)
    refs = await fill(w, 4)
    dp.hint(w.s, {"hints": [{"ref": r, "position": p} for r, p in zip(refs, (5, 9, 7, 6))]})
    before = dp.lifetimes.lookup(refs[1]).replicas[GPU0].alloc
    new = await w.put(blob(9))
    assert where(dp, refs[1]) == {"gpu:1"}, "position 9 is read last: it leaves, to the idle GPU"
    assert all(where(dp, r) == {"gpu:0"} for r in (refs[0], refs[2], refs[3], new))
    placed = dp.lifetimes.lookup(new).replicas[GPU0].alloc
    assert (placed.slab_id, placed.offset) == (before.slab_id, before.offset), "the put took the hole it left"
    assert dp.evictor.evictions[(GPU0, GPU1, "queue")] == 1
    stat, _ = dp.stat(w.s, {"ref": refs[1]})
    assert stat["state"] == "evicted"


async def test_the_front_of_the_queue_goes_last_and_without_hints_the_least_recently_used_goes_first() -> None:
    dp, _, clock = plane()
    w = ArenaWriter(dp, session(dp, ALICE), GPU0)
    reader = session(dp, ALICE_READER)
    refs = []
    for i in range(4):
        refs.append(await w.put(blob(i)))
        clock.now += 1
    await read(dp, reader, refs[0], GPU0)       # refs[0] is now the most recently used
    await w.put(blob(7))
    assert where(dp, refs[1]) == {"gpu:1"}, "no hints: least recently used first"
    assert dp.evictor.evictions[(GPU0, GPU1, "lru")] == 1
    # With hints, the front of the queue (the smallest position) stays even when least recently used.
    dp.hint(w.s, {"hints": [{"ref": refs[2], "position": 3}, {"ref": refs[3], "position": 4},
                            {"ref": refs[0], "position": 4}]})
    await w.put(blob(8))
    gone = [r for r in (refs[0], refs[2], refs[3]) if "gpu:0" not in where(dp, r)]
    assert len(gone) == 1 and gone[0] in (refs[0], refs[3]), "position 3 is the front: it stays"


async def test_the_lru_policy_ignores_hints() -> None:
    dp, _, clock = plane(policy=MemoryPolicy(name="lru", floor_bytes=0, evict_wait_s=0.2))
    w = ArenaWriter(dp, session(dp, ALICE), GPU0)
    refs = []
    for i in range(4):
        refs.append(await w.put(blob(i)))
        clock.now += 1
    dp.hint(w.s, {"hints": [{"ref": r, "position": p} for r, p in zip(refs, (9, 1, 1, 1))]})
    await w.put(blob(5))
    assert "gpu:0" not in where(dp, refs[0]), "the oldest goes, whatever the queue says"
    assert dp.evictor.evictions[(GPU0, GPU1, "lru")] == 1


async def test_objects_go_to_the_host_when_no_peer_gpu_has_room() -> None:
    dp, _, _ = plane()
    w0 = ArenaWriter(dp, session(dp, ALICE), GPU0)
    w1 = ArenaWriter(dp, session(dp, Identity("ns", "wf-a", "other")), GPU1)
    await fill(w1, 4)                           # GPU 1 is as full as GPU 0
    refs = await fill(w0, 4)
    await w0.put(blob(5))
    evicted = [r for r in refs if "gpu:0" not in where(dp, r)]
    assert len(evicted) == 1 and where(dp, evicted[0]) == {"host"}
    assert dp.evictor.evictions[(GPU0, HOST, "lru")] == 1
    assert dp.budgets[GPU1].total == 4 * MiB, "the full peer took nothing"


async def test_a_get_of_an_evicted_object_brings_its_bytes_back_with_its_own_path_label() -> None:
    policy = MemoryPolicy(name="lru", floor_bytes=0, evict_wait_s=0.2)    # no proactive restore here
    dp, memory, _ = plane(policy=policy, gpu_max=64 * MiB, arena=4 * MiB)
    memory.hold(0, 56 * MiB)     # 8 MiB free: the cap is half of that plus what we hold
    memory.hold(1, 64 * MiB)     # no peer room: evicted objects go to the host
    dp.refresh_memory()
    assert dp.budgets[GPU0].limit_bytes == 4 * MiB
    w = ArenaWriter(dp, session(dp, ALICE), GPU0)
    reader = session(dp, ALICE_READER)
    refs = await fill(w, 5)
    evicted = [r for r in refs if where(dp, r) == {"host"}]
    assert len(evicted) == 1
    data, path = await read(dp, reader, evicted[0], HOST)
    assert data == blob(refs.index(evicted[0])) and path == "local", "the host copy serves a CPU reader as is"
    memory.hold(0, 0)            # the other process let go: room at home
    dp.refresh_memory()
    data, path = await read(dp, reader, evicted[0], GPU0)
    assert data == blob(refs.index(evicted[0])) and path == "restore"
    assert dp.lifetimes.lookup(evicted[0]).home is None and dp.evictor.restores[(GPU0, "read")] == 1
    dp.sweep()
    await dp.evictor.settle()
    assert where(dp, evicted[0]) == {"gpu:0"}, "the host copy goes once nobody reads it"


async def test_evicted_objects_come_back_ahead_of_their_readers_turn_as_memory_frees() -> None:
    dp, memory, _ = plane(gpu_max=64 * MiB)
    memory.hold(0, 56 * MiB)
    memory.hold(1, 64 * MiB)
    dp.refresh_memory()
    w = ArenaWriter(dp, session(dp, ALICE), GPU0)
    reader = session(dp, ALICE_READER)
    refs = await fill(w, 4, consumers=1)
    dp.hint(w.s, {"hints": [{"ref": r, "position": p} for r, p in zip(refs, (1, 2, 3, 4))]})
    late = await fill(w, 2, consumers=1)
    # Each late put moved out the object read furthest back (hinted objects behind the front go
    # before the one just put, which had no hint yet).
    assert {r for r in refs + late if "gpu:0" not in where(dp, r)} == {refs[2], refs[3]}
    assert where(dp, refs[3]) == {"host"}
    dp.hint(w.s, {"hints": [{"ref": r, "position": p} for r, p in zip(late, (5, 6))]})
    # The other process lets go and the front is read (and consumed): memory frees, and the
    # evicted objects come home, the soonest needed first, before anyone asks for them.
    memory.hold(0, 0)
    dp.refresh_memory()
    for r in refs[:2]:
        await read(dp, reader, r, GPU0)
    await dp.evictor.settle()
    assert where(dp, refs[2]) == {"gpu:0"} and where(dp, refs[3]) == {"gpu:0"}
    assert dp.evictor.restores[(GPU0, "proactive")] == 2
    assert sum(dp.evictor.evictions.values()) == 2, "nothing else had to move for them"
    data, path = await read(dp, reader, refs[2], GPU0)
    assert data == blob(2) and path == "local", "it was back before its reader came"


async def test_only_objects_near_their_turn_come_back_into_a_gpu_still_short_of_memory() -> None:
    dp, memory, _ = plane(gpu_max=64 * MiB, arena=2 * MiB)
    memory.hold(0, 48 * MiB)     # the cap: 8 MiB, four arenas of one object each
    memory.hold(1, 64 * MiB)
    dp.refresh_memory()
    w = ArenaWriter(dp, session(dp, ALICE), GPU0)
    refs = [await w.put(blob(i, 2 * MiB), ttl_s=3600) for i in range(4)]
    dp.hint(w.s, {"hints": [{"ref": r, "position": p} for r, p in zip(refs, (1, 2, 3, 9))]})
    late = await w.put(blob(4, 2 * MiB), ttl_s=3600)
    dp.hint(w.s, {"hints": [{"ref": late, "position": 8}]})
    assert where(dp, refs[3]) == {"host"}
    dp.sweep()
    await dp.evictor.settle()
    assert where(dp, refs[3]) == {"host"}, "position 9 is far from its turn: it stays out"

    async def writer_keeps_working() -> None:     # an active function: it calls, so it hears of retired slabs
        while True:
            w.notices(dp.ping(w.s, {})[0])
            await asyncio.sleep(0.002)

    pump = asyncio.create_task(writer_keeps_working())
    try:
        # The queue moved on: it is now one place behind the front, so it comes back, and the
        # object read after it (position 8 -> 10) makes room for it; nothing needed sooner moves.
        dp.hint(w.s, {"hints": [{"ref": refs[3], "position": 2}, {"ref": late, "position": 10}]})
        await dp.evictor.settle()
    finally:
        pump.cancel()
    assert "gpu:0" in where(dp, refs[3]) and where(dp, late) == {"host"}
    assert all(where(dp, r) == {"gpu:0"} for r in refs[:3])
    data, path = await read(dp, session(dp, ALICE_READER), refs[3], GPU0)
    assert data == blob(3, 2 * MiB) and path == "local"


async def test_an_object_being_read_never_moves_and_a_full_gpu_of_them_refuses_the_put() -> None:
    dp, _, _ = plane()
    w = ArenaWriter(dp, session(dp, ALICE), GPU0)
    reader = session(dp, ALICE_READER)
    refs = await fill(w, 4)
    for r in refs:
        reply, fds = dp.get_local(reader, {"ref": r, "location": GPU0})  # leases stay open: views mapped
        close_fds(fds)
    with pytest.raises(errors.OutOfPoolMemory, match="no object could leave"):
        await w.put(blob(5))
    assert all(where(dp, r) == {"gpu:0"} for r in refs)
    dp.release(reader, {"refs": refs[:1]})
    await w.put(blob(5))
    assert "gpu:0" not in where(dp, refs[0]), "the one whose read ended could go"


class SlowCopies(HostBackend):
    """Copies land only when the test says so: a window for reads to start meanwhile."""

    def __init__(self) -> None:
        super().__init__(simulated_gpus=2)
        self.pending: list[asyncio.Future[None]] = []

    def submit_copy(self, dst: Span, src: Span, *, after: Any, domain: Domain,
                    requester: tuple[str, str] | None = None) -> CopyTicket:
        ticket = super().submit_copy(dst, src, after=after, domain=domain, requester=requester)
        slow: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.pending.append(slow)
        return CopyTicket(ticket.path, slow)

    def land(self) -> None:
        for f in self.pending:
            if not f.done():
                f.set_result(None)
        self.pending.clear()


async def test_a_read_that_starts_while_an_object_is_being_moved_keeps_it_where_it_is() -> None:
    backend = SlowCopies()
    dp, _, _ = plane(backend=backend)
    w = ArenaWriter(dp, session(dp, ALICE), GPU0)
    reader = session(dp, ALICE_READER)
    refs = await fill(w, 4)
    dp.hint(w.s, {"hints": [{"ref": r, "position": p} for r, p in zip(refs, (1, 9, 2, 3))]})
    put = asyncio.create_task(w.put(blob(5)))
    for _ in range(5):
        await asyncio.sleep(0)
    assert dp.lifetimes.lookup(refs[1]).moving
    reply, fds = dp.get_local(reader, {"ref": refs[1], "location": GPU0})    # a read starts mid-move
    close_fds(fds)
    assert reply["path"] == "local"
    backend.land()
    for _ in range(20):
        await asyncio.sleep(0)
        backend.land()
    assert "gpu:0" in where(dp, refs[1]), "the reader's object stayed"
    assert dp.evictor.aborted >= 1
    dp.release(reader, {"refs": [refs[1]]})
    for _ in range(50):
        await asyncio.sleep(0.01)
        backend.land()
        if put.done():
            break
    await put
    assert sum("gpu:0" not in where(dp, r) for r in refs) == 1


async def test_another_workflow_can_neither_read_an_evicted_object_nor_steer_its_eviction() -> None:
    dp, _, _ = plane()
    w = ArenaWriter(dp, session(dp, ALICE), GPU0)
    thief = session(dp, MALLORY)
    refs = await fill(w, 4)
    dp.hint(w.s, {"hints": [{"ref": r, "position": p} for r, p in zip(refs, (1, 2, 3, 9))]})
    await w.put(blob(5))
    (evicted,) = [r for r in refs if "gpu:0" not in where(dp, r)]
    assert evicted == refs[3]
    for location in (HOST, GPU0, GPU1):
        with pytest.raises(errors.PermissionDenied):
            await dp.get(thief, {"ref": evicted, "location": location})
    with pytest.raises(errors.PermissionDenied):
        dp.stat(thief, {"ref": evicted})
    # Hints naming another workflow's refs change nothing and reveal nothing.
    reply, _ = dp.hint(thief, {"hints": [{"ref": r, "position": 0} for r in refs]})
    assert reply["applied"] == 0
    assert [dp.lifetimes.lookup(r).hint.position for r in refs] == [1, 2, 3, 9]
    # The evicted copy lives in the owner's own pool, in a slab only its workflow is introduced to.
    record = dp.lifetimes.lookup(evicted)
    (replica,) = record.replicas.values()
    assert dp.pool_of_slab(replica.alloc.slab_id).domain == ALICE.domain


async def test_one_workflows_shortage_frees_anothers_memory_only_beyond_that_workflows_own_target() -> None:
    dp, memory, clock = plane(gpu_max=64 * MiB, arena=2 * MiB)
    memory.hold(1, 64 * MiB)      # no peer room
    memory.hold(0, 48 * MiB)      # cap: 8 MiB on GPU 0
    dp.refresh_memory()
    a = ArenaWriter(dp, session(dp, ALICE), GPU0)
    b = ArenaWriter(dp, session(dp, MALLORY), GPU0)
    b_refs = await fill(b, 4, ttl_s=86400)   # 2 arenas of B, live, its traffic reserves them
    a_refs = await fill(a, 4, ttl_s=86400)
    dp.sweep()
    assert dp.excess_bytes(MALLORY.domain, GPU0) == 0, "B's own traffic reserves all it holds"
    await a.put(blob(5))                     # A's pressure: only A's objects move
    assert all(where(dp, r) == {"gpu:0"} for r in b_refs)
    assert sum("gpu:0" not in where(dp, r) for r in a_refs) == 1
    # Much later, B's reservation has lapsed (no request within its window): what B holds beyond
    # its target may now go to make room for A, and B's evicted objects stay B's.
    clock.now += 600
    dp.sweep()
    assert dp.excess_bytes(MALLORY.domain, GPU0) > 0
    big = asyncio.create_task(a.put(blob(6, 2 * MiB + 512)))
    for _ in range(100):
        await asyncio.sleep(0.005)
        b.notices(dp.ping(b.s, {})[0])       # B's client learns its slab was taken back, unmaps
        if big.done():
            break
    await big
    moved_b = [r for r in b_refs if "gpu:0" not in where(dp, r)]
    assert moved_b, "B's slab beyond its target was emptied"
    for r in moved_b:
        (replica,) = dp.lifetimes.lookup(r).replicas.values()
        assert dp.pool_of_slab(replica.alloc.slab_id).domain == MALLORY.domain
        data, path = await read(dp, session(dp, Identity("ns", "wf-b", "reader")), r, HOST)
        assert data == blob(b_refs.index(r))


async def test_the_pool_shrinks_under_its_cap_when_another_process_takes_gpu_memory() -> None:
    dp, memory, _ = plane(gpu_max=64 * MiB, arena=2 * MiB)
    memory.hold(1, 64 * MiB)
    w = ArenaWriter(dp, session(dp, ALICE), GPU0)
    refs = await fill(w, 6)
    for slab_id in list(w.arenas._arenas):
        w.arenas._arenas[slab_id].idle_since = 0     # the writer is done with them
    assert dp.budgets[GPU0].total == 6 * MiB
    memory.hold(0, 56 * MiB)      # a model loads next to us: 2 MiB free, the cap drops to 4 MiB
    dp.sweep()
    await dp.evictor.settle()
    w.notices(dp.ping(w.s, {})[0])   # the writer unmaps what was taken back
    dp.sweep()
    await dp.evictor.settle()
    assert dp.budgets[GPU0].total <= dp.budgets[GPU0].limit_bytes == 4 * MiB
    assert sum(where(dp, r) == {"host"} for r in refs) >= 2
    for r in refs:
        data, _ = await read(dp, session(dp, ALICE_READER), r, HOST)
        assert data == blob(refs.index(r))


async def test_the_static_policy_never_moves_anything_and_refuses_the_put() -> None:
    dp, _, _ = plane(policy=MemoryPolicy(name="static"))
    w = ArenaWriter(dp, session(dp, ALICE), GPU0)
    refs = await fill(w, 4)
    with pytest.raises(errors.OutOfPoolMemory):
        await w.put(blob(5))
    assert all(where(dp, r) == {"gpu:0"} for r in refs)
    assert not dp.evictor.evictions


async def test_the_elastic_policy_without_eviction_refuses_the_put_too() -> None:
    dp, _, _ = plane(policy=MemoryPolicy(name="elastic"))
    w = ArenaWriter(dp, session(dp, ALICE), GPU0)
    await fill(w, 4)
    with pytest.raises(errors.OutOfPoolMemory):
        await w.put(blob(5))


async def test_when_everything_on_a_gpu_is_being_read_a_put_borrows_past_the_cap_and_gives_it_back() -> None:
    dp, memory, _ = plane(gpu_max=64 * MiB)
    memory.hold(0, 56 * MiB)          # 8 MiB free: the cap is 4 MiB
    memory.hold(1, 64 * MiB)
    dp.refresh_memory()
    w = ArenaWriter(dp, session(dp, ALICE), GPU0)
    reader = session(dp, ALICE_READER)
    refs = await fill(w, 4)
    for r in refs:
        close_fds(dp.get_local(reader, {"ref": r, "location": GPU0})[1])    # all four being read
    other = ArenaWriter(dp, session(dp, Identity("ns", "wf-a", "other")), GPU0)
    late = await other.put(blob(5))
    assert where(dp, late) == {"gpu:0"}, "nothing could move, so the put grew past the cap instead of failing"
    assert dp.budgets[GPU0].total > dp.budgets[GPU0].limit_bytes and dp.evictor.borrowed == 1
    memory.hold(0, 60 * MiB)          # and never past what the device has free
    with pytest.raises(errors.OutOfPoolMemory):
        await ArenaWriter(dp, session(dp, Identity("ns", "wf-a", "third")), GPU0).put(blob(6))
    memory.hold(0, 56 * MiB)
    # The reads end: what went past the cap moves out again.
    dp.release(reader, {"refs": refs})
    for _ in range(5):
        dp.sweep()
        await dp.evictor.settle()
        for writer in (w, other):
            writer.notices(dp.ping(writer.s, {})[0])
    assert dp.budgets[GPU0].total <= dp.budgets[GPU0].limit_bytes
    for r in [*refs, late]:
        data, _ = await read(dp, reader, r, HOST)
        assert data == blob(refs.index(r) if r in refs else 5)


@pytest.mark.parametrize(("policy", "expected"), [(QUEUE, 2 * MiB), (MemoryPolicy(name="static"), 16 * MiB)])
async def test_an_elastic_pool_sizes_a_writers_arenas_from_its_traffic(policy: MemoryPolicy, expected: int) -> None:
    dp, _, _ = plane(policy=policy, gpu_max=64 * MiB, arena=16 * MiB)
    w = ArenaWriter(dp, session(dp, ALICE), GPU0)
    ref = await w.put(blob(0, 256 << 10))
    assert dp.pool_of_slab(dp.lifetimes.lookup(ref).replicas[GPU0].alloc.slab_id).slab(
        dp.lifetimes.lookup(ref).replicas[GPU0].alloc.slab_id).size == 16 * MiB, "no traffic seen yet"
    reply, fds = dp.arena(w.s, {"location": GPU0, "nbytes": 4096})
    close_fds(fds)
    assert reply["arena"]["size"] == expected, "256 KiB at a time, one alive: 2 MiB arenas, not 16"
