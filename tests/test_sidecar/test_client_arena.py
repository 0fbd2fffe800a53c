"""The client's arena allocator: first fit, coalescing, stale notices, surplus arenas."""

from __future__ import annotations

from faastube.arena import ALIGN_BYTES, Arenas, FreeList


def test_ranges_are_aligned_and_coalesce_when_given_back() -> None:
    free = FreeList(4096)
    a, b, c = free.take(1024), free.take(1024), free.take(2048)
    assert (a, b, c) == (0, 1024, 2048) and free.take(1) is None
    free.give(b, 1024)
    free.give(a, 1024)
    assert free.ranges == [(0, 2048)]
    free.give(c, 2048)
    assert free.ranges == [(0, 4096)] and free.largest() == 4096


def test_objects_go_to_the_fullest_arena_that_fits() -> None:
    arenas = Arenas()
    arenas.add(1, 8192)
    arenas.add(2, 8192)
    first = arenas.allocate(100)
    assert first is not None and first[1] % ALIGN_BYTES == 0
    second = arenas.allocate(100)
    assert second is not None and second[0] == first[0], "the arena already in use is filled first"
    assert arenas.busy()


def test_a_stale_or_repeated_notice_changes_nothing() -> None:
    arenas = Arenas()
    arenas.add(1, 4096)
    slab, offset = arenas.allocate(512)
    assert arenas.give(slab, offset) and not arenas.give(slab, offset)
    assert not arenas.give(99, 0)


def test_empty_arenas_beyond_two_are_given_back_smallest_first() -> None:
    arenas = Arenas()
    for slab, size in ((1, 1 << 20), (2, 4 << 20), (3, 2 << 20)):
        arenas.add(slab, size)
    assert arenas.surplus() == [1]
    assert {a.slab_id for a in arenas} == {2, 3}


def test_big_empty_arenas_left_idle_are_given_back(monkeypatch) -> None:
    import faastube.arena as arena_module

    clock = [100.0]
    monkeypatch.setattr(arena_module.time, "monotonic", lambda: clock[0])
    arenas = Arenas()
    arenas.add(1, 1 << 20)       # the usual size: kept
    arenas.add(2, 1 << 30)       # a big one: kept while in use, given back once idle
    slab, offset = arenas.allocate(1 << 29)
    assert slab == 2
    clock[0] += 60
    assert arenas.idle(older_than_s=5, larger_than=1 << 20) == []
    arenas.give(slab, offset)
    assert arenas.idle(older_than_s=5, larger_than=1 << 20) == []
    clock[0] += 6
    assert arenas.idle(older_than_s=5, larger_than=1 << 20) == [2]
    assert [a.slab_id for a in arenas] == [1]
