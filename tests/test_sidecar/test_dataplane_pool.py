"""Slab pools: sub-allocation, growth, limits and shrinking, on real shared memory."""

from __future__ import annotations

import pytest
from faastube import errors
from faastube_sidecar.backends.host import HostBackend
from faastube_sidecar.pool import ALIGN_BYTES, Pool, PoolLimits

MiB = 1 << 20


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make_pool(**limits) -> tuple[Pool, Clock]:
    clock = Clock()
    return Pool("host", HostBackend(), PoolLimits(**{"slab_bytes": 4 * MiB, "max_bytes": 16 * MiB, **limits}),
                clock=clock), clock


def test_allocations_are_aligned_and_share_a_slab() -> None:
    pool, _ = make_pool()
    a, b = pool.allocate(100), pool.allocate(1000)
    assert a.slab_id == b.slab_id
    assert a.offset % ALIGN_BYTES == 0 and b.offset % ALIGN_BYTES == 0
    assert b.offset >= a.offset + 100
    assert pool.used_bytes == a.reserved + b.reserved
    pool.close()


def test_freed_neighbours_coalesce_so_a_large_block_fits_again() -> None:
    pool, _ = make_pool()
    allocs = [pool.allocate(MiB) for _ in range(4)]
    assert len(pool.slabs) == 1
    for a in (allocs[1], allocs[0], allocs[3], allocs[2]):
        pool.free(a)
    assert pool.used_bytes == 0
    big = pool.allocate(4 * MiB)
    assert big.slab_id == allocs[0].slab_id and len(pool.slabs) == 1
    pool.close()


def test_the_pool_grows_by_slabs_and_gives_objects_larger_than_a_slab_their_own() -> None:
    pool, _ = make_pool()
    pool.allocate(3 * MiB)
    pool.allocate(3 * MiB)
    assert len(pool.slabs) == 2
    big = pool.allocate(7 * MiB)
    assert pool.slabs[big.slab_id].size >= 7 * MiB > pool.limits.slab_bytes
    pool.close()


def test_running_out_of_pool_memory_is_a_catchable_error_and_changes_nothing() -> None:
    pool, _ = make_pool()
    pool.allocate(12 * MiB)
    before = (pool.reserved_bytes, pool.used_bytes)
    with pytest.raises(errors.OutOfPoolMemory, match="do not fit"):
        pool.allocate(8 * MiB)
    assert (pool.reserved_bytes, pool.used_bytes) == before
    assert pool.alloc_failures == 1
    pool.close()


def test_idle_empty_slabs_are_retired_then_freed_once_nobody_maps_them() -> None:
    pool, clock = make_pool(idle_release_s=10.0)
    a = pool.allocate(MiB)
    slab = pool.slabs[a.slab_id]
    slab.mappers.add(7)
    pool.free(a)
    clock.now = 5.0
    assert pool.collect() == []
    clock.now = 11.0
    assert pool.collect() == [a.slab_id]
    assert a.slab_id in pool.slabs, "still mapped by session 7"
    pool.unmapped_by(7)
    pool.collect()
    assert pool.slabs == {} and pool.reserved_bytes == 0
    pool.close()


def test_the_floor_keeps_slabs_reserved_when_idle() -> None:
    pool, clock = make_pool(min_bytes=4 * MiB, idle_release_s=1.0)
    pool.free(pool.allocate(MiB))
    clock.now = 100.0
    assert pool.collect() == []
    assert pool.reserved_bytes == 4 * MiB
    pool.close()


def test_retired_slabs_take_no_new_allocations() -> None:
    pool, clock = make_pool(idle_release_s=1.0)
    a = pool.allocate(MiB)
    pool.slabs[a.slab_id].mappers.add(1)
    pool.free(a)
    clock.now = 5.0
    pool.collect()
    b = pool.allocate(MiB)
    assert b.slab_id != a.slab_id
    pool.close()


def test_slabs_retired_under_pressure_are_announced_so_they_can_be_freed() -> None:
    pool, _ = make_pool(max_bytes=8 * MiB, idle_release_s=1e9)
    a = pool.allocate(MiB)
    pool.slabs[a.slab_id].mappers.add(3)     # a client still maps the (now empty) slab
    pool.free(a)
    assert pool.take_retired() == []
    with pytest.raises(errors.OutOfPoolMemory):
        pool.allocate(6 * MiB)               # room only once the empty slab is given back
    assert pool.take_retired() == [a.slab_id], "its mapper must be told to unmap"
    pool.unmapped_by(3)
    pool.allocate(6 * MiB)
    assert a.slab_id not in pool.slabs
    pool.close()
