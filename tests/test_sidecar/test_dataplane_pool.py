"""Slab pools: domains, arenas, shared sub-allocation, budgets and shrinking, on real shared memory."""

from __future__ import annotations

import pytest
from faastube import errors
from faastube.locations import HOST
from faastube_sidecar.backends.host import HostBackend
from faastube_sidecar.identity import Domain
from faastube_sidecar.pool import ALIGN_BYTES, Budget, Pool, PoolLimits

MiB = 1 << 20
A, B = Domain("ns", "a"), Domain("ns", "b")


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make_pool(domain: Domain = A, budget: Budget | None = None, **limits) -> tuple[Pool, Clock]:
    clock = Clock()
    spec = PoolLimits(**{"slab_bytes": 4 * MiB, "max_bytes": 16 * MiB, "arena_bytes": 2 * MiB, **limits})
    return Pool(domain, HOST, HostBackend(), spec, budget or Budget(HOST, spec), clock=clock), clock


def test_shared_allocations_are_aligned_and_share_a_slab() -> None:
    pool, _ = make_pool()
    a, b = pool.allocate(100), pool.allocate(1000)
    assert a.slab_id == b.slab_id
    assert a.offset % ALIGN_BYTES == 0 and b.offset % ALIGN_BYTES == 0 and b.offset >= a.offset + 100


def test_freed_neighbours_coalesce_so_a_large_block_fits_again() -> None:
    pool, _ = make_pool()
    blocks = [pool.allocate(MiB) for _ in range(4)]
    for b in blocks:
        pool.free(b)
    big = pool.allocate(4 * MiB)
    assert big.slab_id == blocks[0].slab_id and big.offset == 0


def test_objects_larger_than_a_slab_get_their_own() -> None:
    pool, _ = make_pool()
    big = pool.allocate(6 * MiB)
    assert pool.slab(big.slab_id).size >= 6 * MiB


def test_arenas_are_leased_whole_and_never_shared_with_the_sidecars_own_copies() -> None:
    pool, _ = make_pool()
    arena = pool.grant_arena(7, 100)
    assert arena.arena and arena.writer == 7 and arena.size == 2 * MiB
    copy = pool.allocate(100)
    assert copy.slab_id != arena.id


def test_a_large_put_gets_an_arena_of_its_size() -> None:
    pool, _ = make_pool()
    arena = pool.grant_arena(7, 5 * MiB + 1)
    assert arena.size == 6 * MiB


def test_claims_must_be_aligned_inside_the_arena_and_clear_of_live_objects() -> None:
    pool, _ = make_pool()
    arena = pool.grant_arena(7, 100)
    pool.claim(7, arena.id, 0, 1000)
    with pytest.raises(errors.InvalidRequest, match="overlaps"):
        pool.claim(7, arena.id, 512, 10)
    with pytest.raises(errors.InvalidRequest, match="aligned"):
        pool.claim(7, arena.id, 1030, 10)
    with pytest.raises(errors.InvalidRequest, match="not an arena of this client"):
        pool.claim(8, arena.id, 4096, 10)
    alloc = pool.claim(7, arena.id, 1024, 10)
    assert pool.free(alloc) == 7, "the writer is the one to tell"


def test_an_unused_arena_returns_to_the_domain_when_its_writer_leaves() -> None:
    pool, _ = make_pool()
    arena = pool.grant_arena(7, 100)
    pool.writer_left(7)
    assert pool.grant_arena(9, 100).id == arena.id


def test_an_arena_published_into_is_frozen_and_never_handed_out_for_writing_again() -> None:
    pool, clock = make_pool(idle_release_s=1.0)
    arena = pool.grant_arena(7, 100)
    alloc = pool.claim(7, arena.id, 0, 100)
    assert arena.frozen and arena.handle.frozen, "host memory: sealed against new writable mappings"
    pool.writer_left(7)
    assert pool.grant_arena(8, 100).id != arena.id, "not while an object lives in it"
    pool.free(alloc)
    assert pool.grant_arena(9, 100).id != arena.id, "nor once empty: a new writer could not map it"
    clock.now += 5
    assert arena.id in pool.collect(), "it is retired instead"


def test_the_sidecars_own_host_slabs_are_frozen_from_birth() -> None:
    pool, _ = make_pool()
    alloc = pool.allocate(100)
    slab = pool.slab(alloc.slab_id)
    assert slab.frozen
    with pytest.raises(errors.InternalError, match="frozen"):
        slab.handle.export_fd(writable=True)


def test_a_domain_over_its_quota_is_refused_while_others_still_allocate() -> None:
    limits = PoolLimits(slab_bytes=4 * MiB, max_bytes=16 * MiB, arena_bytes=2 * MiB, quota_bytes=4 * MiB)
    budget = Budget(HOST, limits)
    a, _ = make_pool(A, budget, quota_bytes=4 * MiB)
    b, _ = make_pool(B, budget, quota_bytes=4 * MiB)
    a.grant_arena(1, MiB)
    a.grant_arena(2, MiB)
    with pytest.raises(errors.OutOfPoolMemory, match="ns/a .*over its quota"):
        a.grant_arena(3, MiB)
    assert a.alloc_failures == 1 and len(a.slabs) == 2
    b.grant_arena(4, MiB)
    assert budget.by_domain == {A: 4 * MiB, B: 2 * MiB}


def test_the_node_limit_holds_across_domains() -> None:
    limits = PoolLimits(slab_bytes=4 * MiB, max_bytes=6 * MiB, arena_bytes=2 * MiB)
    budget = Budget(HOST, limits)
    a, _ = make_pool(A, budget, max_bytes=6 * MiB)
    b, _ = make_pool(B, budget, max_bytes=6 * MiB)
    a.allocate(4 * MiB)
    with pytest.raises(errors.OutOfPoolMemory, match="pools are full"):
        b.allocate(4 * MiB)


def test_idle_empty_slabs_are_retired_then_freed_once_nobody_maps_them() -> None:
    pool, clock = make_pool(idle_release_s=10.0)
    a = pool.allocate(MiB)
    slab = pool.slab(a.slab_id)
    slab.mappers.add(1)
    pool.free(a)
    assert pool.collect() == []
    clock.now += 11
    assert pool.collect() == [slab.id]
    assert pool.take_retired() == [slab.id]
    assert slab.id in pool.slabs, "still mapped by session 1"
    pool.unmapped_by(1)
    pool.collect()
    assert pool.reserved_bytes == 0 and pool.budget.total == 0


def test_arenas_held_by_a_writer_are_never_retired() -> None:
    pool, clock = make_pool(idle_release_s=1.0)
    arena = pool.grant_arena(7, 100)
    clock.now += 100
    assert pool.collect() == []
    pool.return_arena(7, arena.id)
    clock.now += 100
    assert pool.collect() == [arena.id]


def test_the_floor_keeps_slabs_reserved_when_idle() -> None:
    pool, clock = make_pool(min_bytes=4 * MiB, idle_release_s=1.0)
    pool.free(pool.allocate(MiB))
    clock.now += 5
    assert pool.collect() == [] and pool.reserved_bytes == 4 * MiB


def test_running_out_of_memory_frees_unmapped_empty_slabs_first() -> None:
    pool, _ = make_pool(slab_bytes=2 * MiB, max_bytes=8 * MiB)
    blocks = [pool.allocate(2 * MiB) for _ in range(4)]
    pool.free(blocks[0])
    pool.free(blocks[1])
    pool.allocate(4 * MiB)      # only fits once the two empty slabs are given back
    assert pool.reserved_bytes == 8 * MiB and len(pool.slabs) == 3
