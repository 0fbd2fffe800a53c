"""One memory pool per location (a GPU, or the host), grown and shrunk in slabs.

The backend hands out large *slabs* (an IPC-enabled CUDA pool allocation, or a
shared-memory segment); objects are sub-allocated inside them. A client maps each
slab once and then reaches every object in it by (slab, offset), so a `get` costs a
round trip and some pointer arithmetic, never a fresh IPC mapping (mapping costs
~0.25 ms on H100; a round trip is tens of microseconds).

Slabs that stay empty past an idle period are *retired*: no new allocations, and
the backend frees them once every client that mapped them has unmapped (CUDA
requires importers to unmap before the exporter frees).
"""

from __future__ import annotations

import bisect
import itertools
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from faastube import errors

logger = logging.getLogger(__name__)

ALIGN_BYTES = 512          # cupy and cuBLAS like 256-byte alignment; 512 keeps chunks DMA friendly
LARGE_ROUND_BYTES = 2 << 20

H = TypeVar("H")


class SlabBackend(Protocol[H]):
    """What a pool needs from a backend: make and destroy slabs at one location."""

    def create_slab(self, location: str, nbytes: int) -> H: ...

    def destroy_slab(self, handle: H) -> None: ...


def align_up(n: int, a: int) -> int:
    return (n + a - 1) // a * a


@dataclass(eq=False)
class Slab(Generic[H]):
    id: int
    location: str
    size: int
    handle: H
    free: list[tuple[int, int]] = field(default_factory=list)   # sorted (offset, length)
    used_bytes: int = 0
    allocations: int = 0
    mappers: set[int] = field(default_factory=set)              # session ids that mapped it
    retired: bool = False
    idle_since: float = 0.0

    def __post_init__(self) -> None:
        self.free = [(0, self.size)]

    def try_alloc(self, nbytes: int) -> int | None:
        """First fit; returns the offset or None."""
        for i, (off, length) in enumerate(self.free):
            if length >= nbytes:
                if length == nbytes:
                    del self.free[i]
                else:
                    self.free[i] = (off + nbytes, length - nbytes)
                self.used_bytes += nbytes
                self.allocations += 1
                return off
        return None

    def release(self, offset: int, nbytes: int, now: float) -> None:
        i = bisect.bisect_left(self.free, (offset, 0))
        # Coalesce with the following and the preceding free blocks.
        if i < len(self.free) and offset + nbytes == self.free[i][0]:
            nbytes += self.free[i][1]
            del self.free[i]
        if i > 0 and self.free[i - 1][0] + self.free[i - 1][1] == offset:
            offset, nbytes = self.free[i - 1][0], self.free[i - 1][1] + nbytes
            self.free[i - 1] = (offset, nbytes)
        else:
            self.free.insert(i, (offset, nbytes))
        self.allocations -= 1
        self.used_bytes = self.size - sum(length for _, length in self.free)
        if self.allocations == 0:
            self.idle_since = now


@dataclass(frozen=True, slots=True)
class Allocation:
    slab_id: int
    location: str
    offset: int
    nbytes: int          # bytes asked for
    reserved: int        # bytes taken from the slab (aligned)


@dataclass(frozen=True, slots=True)
class PoolLimits:
    slab_bytes: int = 256 << 20        # growth step
    max_bytes: int = 8 << 30           # the pool never reserves more than this
    min_bytes: int = 0                 # keep at least this much reserved when idle
    idle_release_s: float = 30.0       # empty slabs older than this are retired


@dataclass(frozen=True, slots=True)
class PoolStats:
    location: str
    reserved_bytes: int
    used_bytes: int
    slabs: int
    allocations: int


_slab_ids = itertools.count(1)


class Pool(Generic[H]):
    """Sub-allocates objects in slabs at one location."""

    def __init__(self, location: str, backend: SlabBackend[H], limits: PoolLimits,
                 *, clock: Callable[[], float] = time.monotonic) -> None:
        self.location = location
        self._backend = backend
        self.limits = limits
        self._clock = clock
        self.slabs: dict[int, Slab[H]] = {}
        self.alloc_failures = 0
        self._unannounced: list[int] = []      # retired, but their mappers not told yet

    # --- accounting ---------------------------------------------------------------------------

    @property
    def reserved_bytes(self) -> int:
        return sum(s.size for s in self.slabs.values())

    @property
    def used_bytes(self) -> int:
        return sum(s.used_bytes for s in self.slabs.values())

    def stats(self) -> PoolStats:
        return PoolStats(self.location, self.reserved_bytes, self.used_bytes, len(self.slabs),
                         sum(s.allocations for s in self.slabs.values()))

    # --- allocation ---------------------------------------------------------------------------

    def allocate(self, nbytes: int) -> Allocation:
        reserved = align_up(max(nbytes, 1), ALIGN_BYTES)
        for slab in self.slabs.values():
            if slab.retired:
                continue
            off = slab.try_alloc(reserved)
            if off is not None:
                return Allocation(slab.id, self.location, off, nbytes, reserved)
        slab = self._grow(reserved)
        off = slab.try_alloc(reserved)
        if off is None:  # pragma: no cover - a fresh slab always fits what it was sized for
            raise errors.InternalError(f"fresh slab {slab.id} cannot hold {reserved} bytes")
        return Allocation(slab.id, self.location, off, nbytes, reserved)

    def _grow(self, reserved: int) -> Slab[H]:
        size = max(self.limits.slab_bytes, align_up(reserved, LARGE_ROUND_BYTES))
        if self.reserved_bytes + size > self.limits.max_bytes:
            # Make room by freeing empty slabs nobody maps any more, then try again.
            self.collect(force=True)
        if self.reserved_bytes + size > self.limits.max_bytes:
            self.alloc_failures += 1
            raise errors.OutOfPoolMemory(
                f"pool {self.location}: {reserved} bytes do not fit (used {self.used_bytes} of "
                f"{self.reserved_bytes} reserved, limit {self.limits.max_bytes})")
        try:
            handle = self._backend.create_slab(self.location, size)
        except errors.OutOfPoolMemory:
            self.alloc_failures += 1
            raise
        slab = Slab(next(_slab_ids), self.location, size, handle, idle_since=self._clock())
        self.slabs[slab.id] = slab
        logger.debug("pool %s: new slab %d of %d bytes", self.location, slab.id, size)
        return slab

    def free(self, alloc: Allocation) -> None:
        slab = self.slabs.get(alloc.slab_id)
        if slab is None:  # pragma: no cover - the object table never frees twice
            raise errors.InternalError(f"allocation in unknown slab {alloc.slab_id}")
        slab.release(alloc.offset, alloc.reserved, self._clock())

    # --- mapping and shrinking ----------------------------------------------------------------

    def slab(self, slab_id: int) -> Slab[H]:
        return self.slabs[slab_id]

    def unmapped_by(self, session_id: int, slab_ids: Iterable[int] | None = None) -> None:
        for slab in self.slabs.values():
            if slab_ids is None or slab.id in slab_ids:
                slab.mappers.discard(session_id)

    def take_retired(self) -> list[int]:
        """Slabs retired since the last call: their mappers must be told to unmap."""
        out, self._unannounced = self._unannounced, []
        return [slab_id for slab_id in out if slab_id in self.slabs]

    def collect(self, *, force: bool = False) -> list[int]:
        """Retire idle empty slabs above the floor; destroy retired slabs nobody maps.

        Returns the ids of slabs newly retired; they are also queued for `take_retired`.
        """
        now = self._clock()
        newly_retired: list[int] = []
        reserved = self.reserved_bytes
        for slab in sorted(self.slabs.values(), key=lambda s: s.idle_since):
            if slab.retired or slab.allocations:
                continue
            if not force and now - slab.idle_since < self.limits.idle_release_s:
                continue
            if reserved - slab.size < self.limits.min_bytes and not force:
                continue
            slab.retired = True
            reserved -= slab.size
            newly_retired.append(slab.id)
        self._unannounced.extend(s.id for s in self.slabs.values() if s.id in newly_retired and s.mappers)
        for slab in list(self.slabs.values()):
            if slab.retired and not slab.mappers and not slab.allocations:
                del self.slabs[slab.id]
                self._backend.destroy_slab(slab.handle)
                logger.debug("pool %s: freed slab %d", self.location, slab.id)
        return newly_retired

    def close(self) -> None:
        for slab in self.slabs.values():
            try:
                self._backend.destroy_slab(slab.handle)
            except Exception:
                logger.exception("pool %s: freeing slab %d failed", self.location, slab.id)
        self.slabs.clear()
