"""The memory policy's decisions: how big a pool may be, which objects leave it, and when they return.

Pure functions of their inputs (a clock value, pool figures, candidate objects), so
every decision is tested against simulated time and memory; `eviction` carries them
out on the data plane.

Policies (`--memory-policy`):

- ``static``: the pools of before: grow up to the limit, give back slabs idle for
  ``--idle-release``, fail a put with ``OutOfPoolMemory`` when full.
- ``elastic``: keep only what the traffic needs (``sizing``): empty memory beyond the
  functions' reservations (plus a floor while the GPU has memory to spare) goes back at
  once; the pools hold at most ``cap_share`` of what the GPU could give them (its free
  memory plus what they hold), so a model loading next to us shrinks the pool.
- ``elastic+eviction``: as elastic, and when memory is short, objects move out of the
  GPU instead of the put failing: first those the requests furthest back in the queue
  will read (the gateway says where each ref's reader is: ``hint``), to another GPU of
  the same node with room, else to the workflow's pinned host pool. They come back
  ahead of their reader's turn. Without hints the least recently used go first.
- ``lru``: as elastic+eviction but always least recently used first, and back only
  when read (the baseline the benchmark compares queue-awareness with).

Never moved: an object a reader is reading (an open lease, i.e. a mapped view), one
being copied, one whose writer's GPU work has not finished. Objects stay in their own
workflow's memory wherever they go, and one workflow's shortage frees another's
objects only down to what that workflow's own traffic reserves.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

POLICIES = ("static", "elastic", "elastic+eviction", "lru")
PolicyName = Literal["static", "elastic", "elastic+eviction", "lru"]

# Memory is "plentiful" (the floor is kept) while the GPU has at least this share free.
PLENTIFUL_FREE_SHARE = 0.25
# A peer GPU takes evicted objects only while its pools stay this far below its cap.
PEER_HEADROOM_SHARE = 0.2


@dataclass(frozen=True, slots=True)
class MemoryPolicy:
    # static until the elastic policies have been measured on GPUs (issue 12): the default is
    # the behaviour the benchmarks on the H200s measured.
    name: PolicyName = "static"
    floor_bytes: int = 300 << 20       # per GPU (shared by its workflows), kept while memory is plentiful
    cap_share: float = 0.5             # of the GPU's free memory plus what the pools hold
    restore_ahead: int = 2             # queue positions from the front whose objects are brought back
    restore_ahead_s: float = 0.5       # or due within this long (hints with a deadline)
    evict_wait_s: float = 2.0          # a put waits at most this long for eviction to make room
    restores_in_flight: int = 4        # proactive restores at once

    def problems(self) -> list[str]:
        out = []
        if self.name not in POLICIES:
            out.append(f"policy must be one of {', '.join(POLICIES)}, got {self.name!r}")
        if not 0 < self.cap_share <= 1:
            out.append(f"cap share must be in (0, 1], got {self.cap_share}")
        if self.floor_bytes < 0 or self.restore_ahead < 0 or self.restores_in_flight < 1:
            out.append("floor, restore_ahead must be >= 0 and restores_in_flight >= 1")
        if self.evict_wait_s < 0 or self.restore_ahead_s < 0:
            out.append("evict_wait_s and restore_ahead_s must be >= 0")
        return out

    @property
    def elastic(self) -> bool:
        return self.name != "static"

    @property
    def evicts(self) -> bool:
        return self.name in ("elastic+eviction", "lru")

    @property
    def queue_aware(self) -> bool:
        return self.name == "elastic+eviction"

    @property
    def restores_proactively(self) -> bool:
        return self.name == "elastic+eviction"


# --- sizes --------------------------------------------------------------------------------------

def cap_bytes(*, limit_bytes: int, share: float, free_bytes: int | None, held_bytes: int) -> int:
    """Most the pools at one GPU may hold: `share` of what the GPU could give them, within the limit."""
    if free_bytes is None:
        return limit_bytes
    return max(0, min(limit_bytes, int(share * (free_bytes + held_bytes))))


def plentiful(*, free_bytes: int | None, total_bytes: int | None) -> bool:
    if free_bytes is None or not total_bytes:
        return True
    return free_bytes >= PLENTIFUL_FREE_SHARE * total_bytes


def target_bytes(*, reserved_bytes: int, floor_bytes: int, plentiful: bool) -> int:
    """What one workflow's pool at one location keeps: its functions' reservations, at least the floor
    while memory is plentiful."""
    return max(reserved_bytes, floor_bytes) if plentiful else reserved_bytes


# --- which object goes first ----------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Hint:
    """Where the request that will read an object stands in its workflow's queue."""

    position: int                  # larger: further back (absolute tickets or relative places)
    due_s: float | None = None     # when it will be read, on the sidecar's clock
    at_s: float = 0.0              # when the hint arrived


@dataclass(frozen=True, slots=True)
class Candidate:
    """An object that could be moved: where it sits and what is known about its next read."""

    ref: str
    nbytes: int
    offset: int
    reserved: int
    last_used_s: float
    hint: Hint | None = None
    front: int = 0                 # the smallest position hinted in its workflow (the queue's front)


# An eviction key: larger means "leave first". Keys of different workflows compare by
# distance from each one's own queue front.
EvictionKey = tuple[float, float, float]


def eviction_key(c: Candidate, *, queue_aware: bool) -> EvictionKey:
    """Queue-aware: hinted objects behind the front first (furthest back first, then latest due),
    then unhinted ones (least recently used first), objects at the front last. Otherwise LRU."""
    lru = -c.last_used_s
    if not queue_aware or c.hint is None:
        return (1.0, lru, 0.0)
    distance = max(0, c.hint.position - c.front)
    due = c.hint.due_s if c.hint.due_s is not None else math.inf
    if distance == 0:
        return (0.0, due, lru)
    return (2.0 + distance, due, lru)


def restore_key(c: Candidate, *, queue_aware: bool) -> EvictionKey:
    """The order objects come back in: the reverse of eviction."""
    key = eviction_key(c, queue_aware=queue_aware)
    return (-key[0], -key[1], -key[2])


def due_soon(c: Candidate, *, now_s: float, policy: MemoryPolicy) -> bool:
    """Its reader's turn is near: bring it back even if that moves objects read later."""
    if c.hint is None:
        return False
    if c.hint.due_s is not None and c.hint.due_s - now_s <= policy.restore_ahead_s:
        return True
    return c.hint.position - c.front <= policy.restore_ahead


@dataclass(frozen=True, slots=True)
class Window:
    """A hole of `hole_bytes` at `offset` in one slab, made by moving `victims` out."""

    slab_id: int
    offset: int
    hole_bytes: int
    victims: tuple[Candidate, ...]
    worst: EvictionKey            # the most needed victim's key: higher is a cheaper window

    @property
    def moved_bytes(self) -> int:
        return sum(v.nbytes for v in self.victims)


_NO_VICTIM: EvictionKey = (math.inf, math.inf, math.inf)


def best_window(slab_id: int, size: int, live: Sequence[tuple[int, int, Candidate | None]], need: int, *,
                queue_aware: bool, protect_above: EvictionKey | None = None) -> Window | None:
    """The cheapest contiguous hole of `need` bytes in a slab, or None.

    `live`: (offset, reserved, candidate or None if it can't move) of each live range. The
    cheapest hole moves no object needed sooner than another hole would (by eviction key),
    then the fewest bytes. `protect_above`: objects whose key is not above it don't move.
    """
    ranges = sorted(live, key=lambda r: r[0])
    best: Window | None = None
    # Regions between immovable ranges; inside each, try every run of consecutive objects.
    region_start = 0
    bounds: list[tuple[int, int, list[tuple[int, int, Candidate]]]] = []
    movable: list[tuple[int, int, Candidate]] = []
    for offset, reserved, cand in ranges:
        if cand is None or (protect_above is not None
                            and eviction_key(cand, queue_aware=queue_aware) <= protect_above):
            bounds.append((region_start, offset, movable))
            region_start, movable = offset + reserved, []
        else:
            movable.append((offset, reserved, cand))
    bounds.append((region_start, size, movable))
    for start, end, objs in bounds:
        if end - start < need:
            continue
        n = len(objs)
        # Moving objects i..j-1 opens [end of object i-1 (or start), start of object j (or end)).
        for i in range(n + 1):
            left = start if i == 0 else objs[i - 1][0] + objs[i - 1][1]
            worst = _NO_VICTIM
            for j in range(i, n + 1):
                right = end if j == n else objs[j][0]
                if right - left >= need:
                    victims = tuple(o[2] for o in objs[i:j])
                    window = Window(slab_id, left, right - left, victims, worst)
                    if best is None or _cheaper(window, best):
                        best = window
                    break
                if j < n:
                    key = eviction_key(objs[j][2], queue_aware=queue_aware)
                    worst = min(worst, key)
    return best


def _cheaper(a: Window, b: Window) -> bool:
    if a.worst != b.worst:
        return a.worst > b.worst
    return a.moved_bytes < b.moved_bytes


@dataclass(frozen=True, slots=True)
class SlabChoice:
    slab_id: int
    size: int
    victims: tuple[Candidate, ...]
    worst: EvictionKey


def slabs_to_free(slabs: Iterable[tuple[int, int, Sequence[Candidate | None]]], need: int, *,
                  queue_aware: bool) -> list[SlabChoice]:
    """Whole slabs to empty so that `need` bytes can be given back, cheapest first; [] if impossible.

    `slabs`: (slab id, size, its live objects, None for one that can't move). A slab with an
    immovable object can't be freed.
    """
    choices = []
    for slab_id, size, objs in slabs:
        if any(o is None for o in objs):
            continue
        movable = tuple(o for o in objs if o is not None)
        worst = min((eviction_key(o, queue_aware=queue_aware) for o in movable), default=_NO_VICTIM)
        choices.append(SlabChoice(slab_id, size, movable, worst))
    # The least needed first (highest key of its most needed object); among equals, the largest slab.
    choices.sort(key=lambda c: (c.worst, c.size), reverse=True)
    picked, freed = [], 0
    for choice in choices:
        if freed >= need:
            break
        picked.append(choice)
        freed += choice.size
    return picked if freed >= need else []


# --- where an object goes ------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class PeerRoom:
    gpu: int
    headroom_bytes: int      # what its pools may still grow by (cap and quota)
    cap_bytes: int


def choose_peer(peers: Iterable[PeerRoom], nbytes: int) -> int | None:
    """An idle GPU that can take `nbytes` and stay well below its cap (most room first), or None."""
    fitting = [p for p in peers if p.headroom_bytes - nbytes >= PEER_HEADROOM_SHARE * p.cap_bytes]
    if not fitting:
        return None
    return max(fitting, key=lambda p: (p.headroom_bytes, -p.gpu)).gpu
