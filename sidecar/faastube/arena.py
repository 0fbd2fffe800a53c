"""Client-side sub-allocation inside the arenas the sidecar leases to this client.

An arena is a slab of the client's own domain that only this client writes. The
client places each object in it here, writes the bytes, and publishes the range with
one message; the sidecar tells it (a ``freed`` notice on a later reply) when a range
is free again, after every reader has let go. No round trip per object.

Pure bookkeeping: no sockets, no GPU.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

ALIGN_BYTES = 512            # must match the sidecar's pool alignment


def align_up(n: int, a: int = ALIGN_BYTES) -> int:
    return (n + a - 1) // a * a


class FreeList:
    """First-fit free ranges of one slab, coalesced on return (the sidecar's pools use it too)."""

    __slots__ = ("ranges",)

    def __init__(self, size: int) -> None:
        self.ranges: list[tuple[int, int]] = [(0, size)] if size else []    # sorted (offset, length)

    def take(self, reserved: int) -> int | None:
        for i, (off, length) in enumerate(self.ranges):
            if length >= reserved:
                if length == reserved:
                    del self.ranges[i]
                else:
                    self.ranges[i] = (off + reserved, length - reserved)
                return off
        return None

    def give(self, offset: int, reserved: int) -> None:
        i = bisect.bisect_left(self.ranges, (offset, 0))
        # Coalesce with the following and the preceding free ranges.
        if i < len(self.ranges) and offset + reserved == self.ranges[i][0]:
            reserved += self.ranges[i][1]
            del self.ranges[i]
        if i > 0 and self.ranges[i - 1][0] + self.ranges[i - 1][1] == offset:
            self.ranges[i - 1] = (self.ranges[i - 1][0], self.ranges[i - 1][1] + reserved)
        else:
            self.ranges.insert(i, (offset, reserved))

    def largest(self) -> int:
        return max((length for _, length in self.ranges), default=0)

    def total(self) -> int:
        return sum(length for _, length in self.ranges)


@dataclass(eq=False)
class Arena:
    slab_id: int
    size: int
    free: FreeList = field(init=False)
    used: dict[int, int] = field(default_factory=dict)           # offset -> reserved bytes
    idle_since: float = field(default_factory=time.monotonic)
    retiring: bool = False       # the sidecar took it back: nothing new goes in, unmapped once empty

    def __post_init__(self) -> None:
        self.free = FreeList(self.size)

    @property
    def empty(self) -> bool:
        return not self.used

    @property
    def free_bytes(self) -> int:
        return self.free.total()

    def take(self, nbytes: int) -> int | None:
        """First fit; the offset of `nbytes` (aligned) or None."""
        reserved = align_up(max(nbytes, 1))
        off = self.free.take(reserved)
        if off is not None:
            self.used[off] = reserved
        return off

    def give(self, offset: int) -> bool:
        """Return a range; False if nothing was allocated there (a stale or repeated notice)."""
        reserved = self.used.pop(offset, None)
        if reserved is None:
            return False
        self.free.give(offset, reserved)
        if not self.used:
            self.idle_since = time.monotonic()
        return True


class Arenas:
    """This client's arenas at one location."""

    def __init__(self, *, keep_empty: int = 2) -> None:
        self._arenas: dict[int, Arena] = {}
        self.keep_empty = keep_empty

    def __iter__(self) -> Iterator[Arena]:
        return iter(self._arenas.values())

    def __len__(self) -> int:
        return len(self._arenas)

    def __contains__(self, slab_id: int) -> bool:
        return slab_id in self._arenas

    def add(self, slab_id: int, size: int) -> None:
        if slab_id not in self._arenas:
            self._arenas[slab_id] = Arena(slab_id, size)

    def allocate(self, nbytes: int) -> tuple[int, int] | None:
        """(slab id, offset) of room for `nbytes`, preferring the fullest arena that fits."""
        reserved = align_up(max(nbytes, 1))
        fitting = [a for a in self._arenas.values() if not a.retiring and a.free.largest() >= reserved]
        for arena in sorted(fitting, key=lambda a: (a.empty, a.size)):
            offset = arena.take(nbytes)
            if offset is not None:
                return arena.slab_id, offset
        return None

    def give(self, slab_id: int, offset: int) -> bool:
        arena = self._arenas.get(slab_id)
        return arena is not None and arena.give(offset)

    def busy(self) -> bool:
        return any(not a.empty for a in self._arenas.values())

    def idle(self, *, older_than_s: float, larger_than: int) -> list[int]:
        """Empty arenas above `larger_than` bytes unused for `older_than_s`: slabs to give back.

        A pipeline reuses its big arenas at once; a client that stopped putting should not
        keep hundreds of megabytes of its workflow's quota leased."""
        now = time.monotonic()
        stale = [a for a in self._arenas.values()
                 if a.empty and a.size > larger_than and now - a.idle_since > older_than_s]
        for arena in stale:
            del self._arenas[arena.slab_id]
        return [a.slab_id for a in stale]

    def surplus(self) -> list[int]:
        """Empty arenas beyond `keep_empty` (the largest are kept), and retiring ones now empty: slabs to give back."""
        done = [a for a in self._arenas.values() if a.retiring and a.empty]
        empty = sorted((a for a in self._arenas.values() if a.empty and not a.retiring), key=lambda a: -a.size)
        extra = done + empty[self.keep_empty:]
        for arena in extra:
            del self._arenas[arena.slab_id]
        return [a.slab_id for a in extra]

    def drop(self, slab_id: int) -> None:
        self._arenas.pop(slab_id, None)

    def retire(self, slab_id: int) -> bool:
        """The sidecar took this arena back. True: unmap it now (nothing of ours is in it); else it
        stays mapped, for no new object, until what is in it was sealed and freed or discarded."""
        arena = self._arenas.get(slab_id)
        if arena is None:
            return True
        if arena.empty:
            del self._arenas[slab_id]
            return True
        arena.retiring = True
        return False
