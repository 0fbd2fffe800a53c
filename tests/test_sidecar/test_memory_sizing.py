"""Traffic sizing statistics and the memory policy's pure decisions, on a simulated clock."""

from __future__ import annotations

import pytest
from faastube_sidecar import elastic
from faastube_sidecar.devicememory import SimulatedMemory
from faastube_sidecar.elastic import Candidate, Hint, MemoryPolicy
from faastube_sidecar.sizing import Samples, SizingSettings, TrafficSizing

MiB = 1 << 20


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_99th_percentile_is_the_nearest_rank_of_the_last_samples() -> None:
    s = Samples(100)
    for v in range(1, 101):
        s.add(float(v))
    assert s.quantile(0.99) == 99.0 and s.quantile(1.0) == 100.0 and s.quantile(0.5) == 50.0
    for _ in range(100):
        s.add(1.0)               # the old values age out
    assert s.quantile(0.99) == 1.0 and len(s) == 100
    assert Samples(4).quantile(0.99) == 0.0


def test_a_reservation_is_size_times_concurrency_and_lasts_one_window_after_the_last_execution() -> None:
    clock = Clock()
    sizing: TrafficSizing[str] = TrafficSizing(SizingSettings(min_intervals=3), clock=clock)
    for i in range(10):
        sizing.observe("detect", 100 * MiB, 1 + i % 3)     # concurrency 1, 2, 3, ...
        clock.now += 2.0
    clock.now -= 2.0
    r = sizing.reservation("detect")
    assert r is not None
    assert (r.size_bytes, r.concurrency, r.window_s) == (100 * MiB, 3, 2.0)
    assert r.reserved_bytes == 300 * MiB
    clock.now += 1.9
    assert sizing.reservation("detect").reserved_bytes == 300 * MiB
    clock.now += 0.2         # no request within R_window: the reservation goes
    assert sizing.reservation("detect").reserved_bytes == 0


def test_a_long_gap_in_one_percent_of_intervals_sets_the_window() -> None:
    clock = Clock()
    sizing: TrafficSizing[str] = TrafficSizing(SizingSettings(), clock=clock)
    for i in range(200):
        sizing.observe("f", MiB, 1)
        clock.now += 30.0 if i % 50 == 49 else 0.1
    r = sizing.reservation("f")
    assert r is not None and r.window_s == pytest.approx(30.0), "p99 of the intervals keeps even the rare gaps"


def test_before_enough_intervals_the_window_is_the_default_and_it_is_clamped() -> None:
    clock = Clock()
    settings = SizingSettings(default_window_s=30.0, min_window_s=0.5, max_window_s=60.0)
    sizing: TrafficSizing[str] = TrafficSizing(settings, clock=clock)
    sizing.observe("f", MiB, 1)
    assert sizing.reservation("f").window_s == 30.0
    for _ in range(5):
        sizing.observe("f", MiB, 1)         # simultaneous calls: a zero interval
    assert sizing.reservation("f").window_s == 0.5
    for _ in range(300):
        clock.now += 1000
        sizing.observe("f", MiB, 1)
    assert sizing.reservation("f").window_s == 60.0


def test_reservations_sum_per_pool_and_silent_functions_are_forgotten() -> None:
    clock = Clock()
    sizing: TrafficSizing[tuple[str, str]] = TrafficSizing(SizingSettings(), clock=clock)
    sizing.observe(("wf-a", "f"), 10 * MiB, 2)
    sizing.observe(("wf-a", "g"), 5 * MiB, 1)
    sizing.observe(("wf-b", "h"), 7 * MiB, 1)
    assert sizing.reserved_by(lambda k: k[0]) == {"wf-a": 25 * MiB, "wf-b": 7 * MiB}
    clock.now += 10 * 30.0 + 1
    assert sizing.reserved_by(lambda k: k[0]) == {}
    assert sizing.forget_idle() == 3 and len(sizing) == 0


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="quantile"):
        TrafficSizing(SizingSettings(quantile=0), clock=Clock())
    with pytest.raises(ValueError, match="min_window_s"):
        TrafficSizing(SizingSettings(min_window_s=10, default_window_s=5), clock=Clock())


# --- the policy's decisions -------------------------------------------------------------------------

def test_the_cap_is_a_share_of_free_plus_held_memory_within_the_limit() -> None:
    assert elastic.cap_bytes(limit_bytes=16 << 30, share=0.5, free_bytes=10 << 30, held_bytes=2 << 30) == 6 << 30
    assert elastic.cap_bytes(limit_bytes=4 << 30, share=0.5, free_bytes=10 << 30, held_bytes=2 << 30) == 4 << 30
    assert elastic.cap_bytes(limit_bytes=4 << 30, share=0.5, free_bytes=None, held_bytes=0) == 4 << 30


def test_the_floor_is_kept_only_while_memory_is_plentiful() -> None:
    assert elastic.plentiful(free_bytes=30, total_bytes=100)
    assert not elastic.plentiful(free_bytes=10, total_bytes=100)
    assert elastic.target_bytes(reserved_bytes=100, floor_bytes=300, plentiful=True) == 300
    assert elastic.target_bytes(reserved_bytes=500, floor_bytes=300, plentiful=True) == 500
    assert elastic.target_bytes(reserved_bytes=100, floor_bytes=300, plentiful=False) == 100


def test_simulated_memory_shrinks_as_the_pools_and_other_processes_take_it() -> None:
    held = {0: 0}
    memory = SimulatedMemory(1, 100, used_by_us=lambda g: held[g])
    assert memory.info(0).free_bytes == 100 and memory.info(1) is None
    held[0] = 30
    memory.hold(0, 50)
    assert memory.info(0).free_bytes == 20


def cand(ref: str, *, position: int | None = None, front: int = 0, used: float = 0.0, due: float | None = None,
         offset: int = 0, nbytes: int = MiB) -> Candidate:
    hint = None if position is None else Hint(position, due)
    return Candidate(ref, nbytes, offset, nbytes, used, hint, front)


def order(cands: list[Candidate], *, queue_aware: bool = True) -> list[str]:
    return [c.ref for c in sorted(cands, key=lambda c: elastic.eviction_key(c, queue_aware=queue_aware),
                                  reverse=True)]


def test_queue_aware_order_is_furthest_back_first_then_unhinted_by_age_then_the_front() -> None:
    cands = [cand("front", position=10, front=10), cand("next", position=11, front=10),
             cand("last", position=19, front=10), cand("old", used=1.0), cand("new", used=5.0)]
    assert order(cands) == ["last", "next", "old", "new", "front"]
    assert order(cands, queue_aware=False)[:2] == ["front", "next"], "LRU: by last use only (all 0.0 first)"


def test_a_later_deadline_breaks_a_tie_of_positions() -> None:
    cands = [cand("soon", position=3, due=1.0), cand("late", position=3, due=9.0), cand("none", position=3)]
    assert order(cands) == ["none", "late", "soon"]


def test_positions_of_different_workflows_compare_by_distance_from_each_front() -> None:
    a = cand("a", position=1005, front=1000)      # 5 behind its front
    b = cand("b", position=3, front=0)            # 3 behind its own
    assert order([b, a]) == ["a", "b"]


def test_an_object_near_its_turn_is_due_by_position_or_deadline() -> None:
    policy = MemoryPolicy(restore_ahead=2, restore_ahead_s=0.5)
    assert elastic.due_soon(cand("x", position=12, front=10), now_s=0, policy=policy)
    assert not elastic.due_soon(cand("x", position=13, front=10), now_s=0, policy=policy)
    assert elastic.due_soon(cand("x", position=99, front=10, due=10.4), now_s=10.0, policy=policy)
    assert not elastic.due_soon(cand("x"), now_s=0, policy=policy), "no hint: never urgent"


def test_the_cheapest_hole_moves_only_objects_read_later() -> None:
    # A slab of 8: [a 0-2 pos 1][b 2-4 pos 9][gap 4-5][c 5-7 pos 8][immovable 7-8]
    live = [(0, 2, cand("a", position=1, offset=0, nbytes=2)), (2, 2, cand("b", position=9, offset=2, nbytes=2)),
            (5, 2, cand("c", position=8, offset=5, nbytes=2)), (7, 1, None)]
    w = elastic.best_window(1, 8, live, 3, queue_aware=True)
    assert w is not None and [v.ref for v in w.victims] == ["b"] and (w.offset, w.hole_bytes) == (2, 3)
    w = elastic.best_window(1, 8, live, 5, queue_aware=True)
    assert w is not None and {v.ref for v in w.victims} == {"b", "c"} and w.offset == 2
    assert elastic.best_window(1, 8, live, 8, queue_aware=True) is None, "the immovable object splits the slab"
    w = elastic.best_window(1, 8, live, 1, queue_aware=True)
    assert w is not None and w.victims == () and w.offset == 4, "a gap big enough moves nothing"
    protect = elastic.eviction_key(cand("x", position=8), queue_aware=True)
    w = elastic.best_window(1, 8, live, 3, queue_aware=True, protect_above=protect)
    assert w is not None and [v.ref for v in w.victims] == ["b"]
    assert elastic.best_window(1, 8, live, 5, queue_aware=True, protect_above=protect) is None


def test_whole_slabs_to_free_are_the_least_needed_and_none_with_an_immovable_object() -> None:
    slabs = [(1, 4, [cand("a", position=1)]), (2, 4, [cand("b", position=9), cand("c", position=7)]),
             (3, 4, [cand("d", position=8), None]), (4, 2, [])]
    picked = elastic.slabs_to_free(slabs, 6, queue_aware=True)
    assert [p.slab_id for p in picked] == [4, 2], "empty first, then the one read latest"
    assert elastic.slabs_to_free(slabs, 11, queue_aware=True) == [], "slab 3 can't go: not enough"


def test_a_peer_takes_evicted_objects_only_with_room_to_spare() -> None:
    peers = [elastic.PeerRoom(1, 100, 100), elastic.PeerRoom(2, 30, 100), elastic.PeerRoom(3, 50, 100)]
    assert elastic.choose_peer(peers, 40) == 1
    assert elastic.choose_peer(peers[1:], 10) == 3
    assert elastic.choose_peer(peers[1:], 40) is None


def test_policies_say_what_they_do() -> None:
    assert not MemoryPolicy(name="static").elastic
    assert MemoryPolicy(name="elastic").elastic and not MemoryPolicy(name="elastic").evicts
    assert MemoryPolicy(name="lru").evicts and not MemoryPolicy(name="lru").queue_aware
    full = MemoryPolicy(name="elastic+eviction")
    assert full.evicts and full.queue_aware and full.restores_proactively
    assert MemoryPolicy(name="bogus").problems()  # type: ignore[arg-type]
    assert MemoryPolicy(cap_share=0).problems()
