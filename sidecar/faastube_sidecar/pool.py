"""Memory pools: one per (domain, location), grown and shrunk in slabs.

A *slab* is one backend allocation (a range of a GPU's IPC pool, or a shared-memory
segment) that belongs to exactly one domain for its whole life: a client is only
ever handed slabs of its own domain, so whatever it maps holds nothing of another
workflow. A fresh slab comes from the backend zeroed (CUDA slabs are wiped when
created; memfd pages are zero), so no slab shows another domain's old bytes.

Slabs come in two kinds:

- an *arena* is leased to one client (its writer), which sub-allocates its objects in
  it locally and publishes each with one message; the pool only checks that a
  published range lies inside the arena and overlaps no live object, and tells the
  writer when a range is free again. An arena whose writer left (or gave it back) is
  granted again, once empty, to another writer of the same domain, unless it is
  frozen.
- a *shared* slab is sub-allocated by the sidecar itself, for the copies it makes
  (a replica of an object on another GPU, or on the host).

Where the OS can enforce it (host memory), a slab is *frozen* once its writers have
mapped it (an arena at its first publish, a shared slab at birth): readers can then
only ever map it read-only.

Every byte a pool reserves is charged to a :class:`Budget` per location: the node's
limit for that location (lowered to a *cap* when the GPU's free memory shrinks, see
``elastic``) and each domain's quota. Empty slabs are retired, either once idle past
``idle_release_s`` (static pools) or as soon as the pool holds more than its *target*
(elastic pools: what the traffic reserves, see ``sizing``): no new use, and the
backend frees them once every client that mapped them has unmapped (CUDA requires
importers to unmap first).
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from faastube import errors
from faastube.arena import FreeList
from faastube.locations import Location

from faastube_sidecar.identity import Domain

logger = logging.getLogger(__name__)

ALIGN_BYTES = 512          # cupy and cuBLAS like 256-byte alignment; 512 keeps chunks DMA friendly
LARGE_ROUND_BYTES = 2 << 20

H = TypeVar("H")


class SlabBackend(Protocol[H]):
    """What a pool needs from a backend: make, freeze and destroy one domain's slabs at one location."""

    def create_slab(self, domain: Domain, location: Location, nbytes: int) -> H: ...

    def freeze_slab(self, handle: H) -> bool: ...

    def destroy_slab(self, handle: H) -> None: ...


def align_up(n: int, a: int) -> int:
    return (n + a - 1) // a * a


@dataclass(frozen=True, slots=True)
class Allocation:
    slab_id: int
    location: Location
    offset: int
    nbytes: int          # bytes of the object
    reserved: int        # bytes taken from the slab (aligned)


@dataclass(eq=False)
class Slab(Generic[H]):
    id: int
    domain: Domain
    location: Location
    size: int
    handle: H
    arena: bool                                   # sub-allocated by a client (else by the sidecar)
    writer: int | None = None                     # the session an arena is leased to
    live: dict[int, int] = field(default_factory=dict)          # offset -> reserved bytes in use
    starts: list[int] = field(default_factory=list)             # arenas: sorted offsets of `live`
    free: FreeList = field(init=False)                          # shared slabs: what the sidecar may place
    mappers: set[int] = field(default_factory=set)              # session ids that mapped it
    frozen: bool = False                          # no new writable mapping possible (host memory)
    retired: bool = False
    idle_since: float = 0.0

    def __post_init__(self) -> None:
        self.free = FreeList(0 if self.arena else self.size)

    @property
    def used_bytes(self) -> int:
        return sum(self.live.values())

    # --- shared slabs: first fit ---------------------------------------------------------------

    def take(self, reserved: int) -> int | None:
        off = self.free.take(reserved)
        if off is not None:
            self.live[off] = reserved
        return off

    def give_back(self, offset: int, reserved: int) -> None:
        self.free.give(offset, reserved)

    # --- arenas: ranges the writer chose ---------------------------------------------------------

    def overlaps(self, offset: int, reserved: int) -> bool:
        i = bisect.bisect_left(self.starts, offset)
        if i < len(self.starts) and self.starts[i] < offset + reserved:
            return True                     # the next live range starts inside ours
        if i > 0:
            before = self.starts[i - 1]
            return before + self.live[before] > offset     # the previous one reaches into ours
        return False

    def place(self, offset: int, reserved: int) -> None:
        self.live[offset] = reserved
        bisect.insort(self.starts, offset)

    def vacate(self, offset: int) -> bool:
        if self.live.pop(offset, None) is None:
            return False
        if self.arena:
            del self.starts[bisect.bisect_left(self.starts, offset)]
        return True


@dataclass(frozen=True, slots=True)
class PoolLimits:
    slab_bytes: int = 256 << 20        # growth step of the shared slabs
    max_bytes: int = 8 << 30           # the node's pools at this location never reserve more
    min_bytes: int = 0                 # keep at least this much reserved when idle (per domain)
    idle_release_s: float = 30.0       # empty slabs idle this long are retired
    arena_bytes: int = 64 << 20        # smallest arena granted to a writer
    quota_bytes: int | None = None     # most one domain may reserve here (None: max_bytes)


@dataclass(frozen=True, slots=True)
class PoolStats:
    location: Location
    reserved_bytes: int
    used_bytes: int
    slabs: int
    allocations: int


class Budget:
    """Bytes reserved at one location: the node's limit (or a lower cap) and each domain's quota."""

    def __init__(self, location: Location, limits: PoolLimits) -> None:
        self.location = location
        self.max_bytes = limits.max_bytes
        self.cap_bytes = limits.max_bytes          # lowered by the elastic policy as the device fills
        self.quota_bytes = min(limits.quota_bytes or limits.max_bytes, limits.max_bytes)
        self.total = 0
        self.by_domain: dict[Domain, int] = {}
        self.refusals = 0
        self.loan_bytes = 0      # may pass the cap by this much now: memory on its way back (see `lend`)

    @property
    def limit_bytes(self) -> int:
        return min(self.max_bytes, self.cap_bytes)

    @contextlib.contextmanager
    def lend(self, nbytes: int) -> Iterator[None]:
        """Let growth pass the cap (never the limit or a quota) by `nbytes` within the block.

        For memory already given up but not yet back: retired slabs wait for their mappers to
        unmap, and a reader should not wait for an idle client's next call. The pools return
        under the cap once those slabs are gone."""
        before, self.loan_bytes = self.loan_bytes, max(self.loan_bytes, nbytes)
        try:
            yield
        finally:
            self.loan_bytes = before

    def headroom(self, domain: Domain) -> int:
        """Bytes `domain` may still reserve here (node limit or cap, and its quota)."""
        return max(0, min(self.limit_bytes - self.total, self.quota_bytes - self.by_domain.get(domain, 0)))

    def quota_binds(self, domain: Domain, nbytes: int) -> bool:
        return self.by_domain.get(domain, 0) + nbytes > self.quota_bytes

    def check(self, domain: Domain, nbytes: int) -> str | None:
        """Why `nbytes` more can't be reserved for `domain`, or None if they can."""
        held = self.by_domain.get(domain, 0)
        if held + nbytes > self.quota_bytes:
            return (f"workflow {domain} would hold {held + nbytes} bytes at {self.location}, over its quota "
                    f"of {self.quota_bytes} (free or consume some of its objects, or raise the quota)")
        if self.total + nbytes > self.max_bytes:
            return (f"the node's {self.location} pools are full ({self.total} of {self.max_bytes} bytes "
                    f"reserved, {nbytes} more wanted)")
        if self.total + nbytes > self.cap_bytes + self.loan_bytes:
            return (f"the node's {self.location} pools are at their cap ({self.total} of {self.cap_bytes} bytes "
                    f"reserved, {nbytes} more wanted; the cap follows the device's free memory)")
        return None

    def charge(self, domain: Domain, nbytes: int) -> None:
        self.total += nbytes
        self.by_domain[domain] = self.by_domain.get(domain, 0) + nbytes

    def refund(self, domain: Domain, nbytes: int) -> None:
        self.total -= nbytes
        left = self.by_domain.get(domain, 0) - nbytes
        if left > 0:
            self.by_domain[domain] = left
        else:
            self.by_domain.pop(domain, None)


_slab_ids = itertools.count(1)


class Pool(Generic[H]):
    """One domain's slabs at one location."""

    def __init__(self, domain: Domain, location: Location, backend: SlabBackend[H], limits: PoolLimits,
                 budget: Budget, *, reclaim: Callable[[Location], None] | None = None,
                 on_slab: Callable[[int, Pool[H] | None], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.domain = domain
        self.location = location
        self._backend = backend
        self.limits = limits
        self.budget = budget
        # Called when the budget is short: free what can be freed at this location, in every domain.
        self._reclaim = reclaim
        # Told of each slab made (with this pool) and destroyed (None): the owner's slab index.
        self._on_slab = on_slab
        self._clock = clock
        self.slabs: dict[int, Slab[H]] = {}
        self.alloc_failures = 0
        self.releases: Counter[str] = Counter()   # slabs retired, by why: idle, target, pressure, evicted
        # Elastic pools grow their shared slabs by what is needed, not by `slab_bytes`: the sidecar's
        # copies come and go with the traffic, and an empty slab beyond the target goes back at once.
        self.grow_exact = False
        self._unannounced: list[int] = []      # retired, but their mappers not told yet

    # --- accounting ---------------------------------------------------------------------------

    @property
    def reserved_bytes(self) -> int:
        return sum(s.size for s in self.slabs.values())

    @property
    def used_bytes(self) -> int:
        return sum(s.used_bytes for s in self.slabs.values())

    @property
    def active_bytes(self) -> int:
        """Reserved bytes not on their way out (retired slabs wait only for their mappers)."""
        return sum(s.size for s in self.slabs.values() if not s.retired)

    def stats(self) -> PoolStats:
        return PoolStats(self.location, self.reserved_bytes, self.used_bytes, len(self.slabs),
                         sum(len(s.live) for s in self.slabs.values()))

    def __iter__(self) -> Iterator[Slab[H]]:
        return iter(self.slabs.values())

    def empty(self) -> bool:
        return not self.slabs

    # --- shared slabs (the sidecar's own copies) -------------------------------------------------

    def allocate(self, nbytes: int) -> Allocation:
        reserved = align_up(max(nbytes, 1), ALIGN_BYTES)
        for slab in self.slabs.values():
            if slab.arena or slab.retired:
                continue
            off = slab.take(reserved)
            if off is not None:
                return Allocation(slab.id, self.location, off, nbytes, reserved)
        # The usual slab, else just what this object needs, when memory is short.
        needed = align_up(reserved, LARGE_ROUND_BYTES)
        slab = self._grow(needed if self.grow_exact else max(self.limits.slab_bytes, needed), arena=False,
                          fallback=(needed,))
        off = slab.take(reserved)
        if off is None:  # pragma: no cover - a fresh slab always fits what it was sized for
            raise errors.InternalError(f"fresh slab {slab.id} cannot hold {reserved} bytes")
        return Allocation(slab.id, self.location, off, nbytes, reserved)

    # --- arenas -------------------------------------------------------------------------------

    def grant_arena(self, session_id: int, nbytes: int, *, usual_bytes: int | None = None) -> Slab[H]:
        """An empty arena of at least `nbytes` leased to `session_id` (reused within the domain first).

        `usual_bytes`: the size to grant when the object is smaller (default `arena_bytes`; elastic
        pools size it from the writer's traffic)."""
        needed = align_up(max(nbytes, 1), LARGE_ROUND_BYTES)
        usual = self.limits.arena_bytes if usual_bytes is None else min(usual_bytes, self.limits.arena_bytes)
        reusable = [s for s in self.slabs.values() if s.arena and s.writer is None and not s.frozen
                    and not s.retired and not s.live and s.size >= nbytes]
        if reusable:
            slab = min(reusable, key=lambda s: s.size)
        else:
            # The usual arena size, else just what this object needs, when memory is short.
            wanted = usual if nbytes <= usual else needed
            slab = self._grow(wanted, arena=True, fallback=(needed, align_up(max(nbytes, 1), ALIGN_BYTES)))
        slab.writer = session_id
        return slab

    def claim(self, session_id: int, slab_id: int, offset: int, nbytes: int) -> Allocation:
        """Record an object its writer placed in its arena; InvalidRequest if the range is not its own."""
        slab = self.slabs.get(slab_id)
        if slab is None or not slab.arena or slab.writer != session_id:
            raise errors.InvalidRequest(f"publish: slab {slab_id} is not an arena of this client at {self.location}")
        reserved = align_up(max(nbytes, 1), ALIGN_BYTES)
        if offset % ALIGN_BYTES or offset + reserved > slab.size:
            raise errors.InvalidRequest(
                f"publish: range [{offset}, {offset + reserved}) is not a {ALIGN_BYTES}-aligned range "
                f"inside slab {slab_id} of {slab.size} bytes")
        if slab.overlaps(offset, reserved):
            raise errors.InvalidRequest(f"publish: range at offset {offset} of slab {slab_id} overlaps a live object")
        if not slab.frozen:
            # The writer mapped its arena before publishing into it: from now on nobody else can.
            slab.frozen = self._backend.freeze_slab(slab.handle)
        slab.place(offset, reserved)
        return Allocation(slab.id, self.location, offset, nbytes, reserved)

    def return_arena(self, session_id: int, slab_id: int) -> bool:
        slab = self.slabs.get(slab_id)
        if slab is None or slab.writer != session_id:
            return False
        slab.writer = None
        if not slab.live:
            slab.idle_since = self._clock()
        return True

    def writer_left(self, session_id: int) -> None:
        now = self._clock()
        for slab in self.slabs.values():
            if slab.writer == session_id:
                slab.writer = None
                if not slab.live:
                    slab.idle_since = now

    # --- both kinds ---------------------------------------------------------------------------

    def free(self, alloc: Allocation) -> int | None:
        """Give an object's bytes back; returns the arena writer to tell, if any."""
        slab = self.slabs.get(alloc.slab_id)
        if slab is None or not slab.vacate(alloc.offset):
            raise errors.InternalError(f"pool {self.domain}@{self.location}: freeing an unknown range "
                                       f"{alloc.slab_id}:{alloc.offset}")
        if not slab.arena:
            slab.give_back(alloc.offset, alloc.reserved)
        if not slab.live:
            slab.idle_since = self._clock()
        return slab.writer

    def slab(self, slab_id: int) -> Slab[H]:
        return self.slabs[slab_id]

    def _grow(self, size: int, *, arena: bool, fallback: tuple[int, ...] = ()) -> Slab[H]:
        refusal = self.budget.check(self.domain, size)
        if refusal is not None:
            # Make room by freeing empty slabs nobody maps any more, then try again.
            self.collect(force=True)
            if self._reclaim is not None:
                self._reclaim(self.location)
            refusal = self.budget.check(self.domain, size)
        for smaller in fallback:
            if refusal is None or smaller >= size:
                break
            if self.budget.check(self.domain, smaller) is None:
                size, refusal = smaller, None
        if refusal is not None:
            self.alloc_failures += 1
            self.budget.refusals += 1
            raise errors.OutOfPoolMemory(f"{size} bytes do not fit: {refusal}")
        try:
            handle = self._backend.create_slab(self.domain, self.location, size)
        except errors.OutOfPoolMemory:
            self.alloc_failures += 1
            raise
        self.budget.charge(self.domain, size)
        slab = Slab(next(_slab_ids), self.domain, self.location, size, handle, arena, idle_since=self._clock())
        if not arena:
            slab.frozen = self._backend.freeze_slab(handle)     # only the sidecar writes its own slabs
        self.slabs[slab.id] = slab
        if self._on_slab is not None:
            self._on_slab(slab.id, self)
        logger.debug("pool %s@%s: new %s slab %d of %d bytes", self.domain, self.location,
                     "arena" if arena else "shared", slab.id, size)
        return slab

    # --- mapping and shrinking ----------------------------------------------------------------

    def unmapped_by(self, session_id: int, slab_ids: Iterable[int] | None = None) -> None:
        for slab in self.slabs.values():
            if slab_ids is None or slab.id in slab_ids:
                slab.mappers.discard(session_id)

    def take_retired(self) -> list[int]:
        """Slabs retired since the last call: their mappers must be told to unmap."""
        out, self._unannounced = self._unannounced, []
        return [slab_id for slab_id in out if slab_id in self.slabs]

    def collect(self, *, force: bool = False, keep_bytes: int | None = None,
                leased_idle_s: float | None = None) -> list[int]:
        """Retire empty slabs the pool need not keep; destroy retired slabs nobody maps.

        Static (`keep_bytes` None): slabs idle past `idle_release_s`, above `min_bytes`.
        Elastic: every empty slab beyond `keep_bytes` (the pool's target), at once. `force`
        (memory is short): every empty slab. Arenas leased to a writer are the writer's,
        retired only when `leased_idle_s` is given and they have been empty that long
        (the writer is told, and unmaps). Returns the ids of slabs newly retired; they are
        also queued for `take_retired`.
        """
        now = self._clock()
        newly_retired: list[int] = []
        active = self.active_bytes
        for slab in sorted(self.slabs.values(), key=lambda s: s.idle_since):
            if slab.retired or slab.live:
                continue
            if slab.writer is not None and (leased_idle_s is None or now - slab.idle_since < leased_idle_s):
                continue
            if force:
                reason = "pressure"
            elif keep_bytes is not None:
                if active - slab.size < keep_bytes:
                    continue
                reason = "target"
            else:
                if now - slab.idle_since < self.limits.idle_release_s or active - slab.size < self.limits.min_bytes:
                    continue
                reason = "idle"
            self.retire(slab, reason)
            active -= slab.size
            newly_retired.append(slab.id)
        for slab in list(self.slabs.values()):
            if slab.retired and not slab.mappers and not slab.live:
                self._destroy(slab)
        return newly_retired

    def retire(self, slab: Slab[H], reason: str) -> None:
        """No new use of this slab; it is destroyed once empty and unmapped by everyone."""
        if slab.retired:
            return
        slab.retired = True
        self.releases[reason] += 1
        if slab.mappers:
            self._unannounced.append(slab.id)

    def _destroy(self, slab: Slab[H]) -> None:
        del self.slabs[slab.id]
        if self._on_slab is not None:
            self._on_slab(slab.id, None)
        self.budget.refund(self.domain, slab.size)
        self._backend.destroy_slab(slab.handle)
        logger.debug("pool %s@%s: freed slab %d", self.domain, self.location, slab.id)

    def close(self) -> None:
        for slab in list(self.slabs.values()):
            try:
                self._destroy(slab)
            except Exception:
                logger.exception("pool %s@%s: freeing slab %d failed", self.domain, self.location, slab.id)
        self.slabs.clear()
