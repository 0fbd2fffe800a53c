"""Objects and their lifetimes: the one place that decides when an object dies.

An object is *released* when it is freed, when its declared consumers have all
finished reading it, or at its expiry. Its memory goes back to its pool only once no
reader still holds a view of it (a *lease*) and no copy touches it, so releasing an
object never pulls memory out from under a reader.

A read counts toward ``consumers`` when its lease ends normally: the client released
it, or said goodbye (``bye``) with it still open. A connection that dies without a
goodbye (a crash) ends its leases without counting them. Reads ended with
``consumed=False`` (a call that failed and will be retried) don't count either.

Pure bookkeeping, no I/O: the data plane asks, this module answers and calls
``free_memory(record)`` exactly once per object, when its memory may be reused.
"""

from __future__ import annotations

import asyncio
import heapq
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from faastube import errors
from faastube.locations import Location

from faastube_sidecar.elastic import Hint
from faastube_sidecar.identity import Domain, Identity
from faastube_sidecar.pool import Allocation

# A fence: (event id, end offset) pairs; the bytes up to each end are ready once that event is.
Fence = tuple[tuple[int, int], ...]

# How many released refs are remembered, so a late get is told what happened to its object.
TOMBSTONES = 1 << 16


@dataclass(eq=False, slots=True)
class Replica:
    alloc: Allocation
    fence: Fence | None = None          # GPU readers order themselves after these events
    landing: asyncio.Future[None] | None = None   # the sidecar's copy into it, while in flight
    function: str | None = None         # the function whose execution allocated it (traffic sizing)
    evicted: bool = False               # a copy made to move the object out of its home GPU


@dataclass(eq=False)
class ObjectRecord:
    ref: str
    owner: Identity
    nbytes: int
    dtype: str
    shape: tuple[int, ...]
    replicas: dict[Location, Replica]        # the first one is where it was published
    publisher: int | None                    # session id of the writer
    created_s: float
    expiry_s: float
    consumers_left: int | None = None        # None: no declared consumers
    leases: dict[int, int] = field(default_factory=dict)   # session id -> open reads
    released: bool = False                   # gone from the table; memory waits for leases and copies
    copies_in_flight: int = 0                # replicas being written, or copies reading from us
    last_used_s: float = 0.0                 # published or last read (least-recently-used order)
    hint: Hint | None = None                 # where its reader stands in the workflow's queue
    home: Location | None = None             # evicted from here; None while it is where it was put
    moving: bool = False                     # an eviction or restore of it is in flight

    @property
    def domain(self) -> Domain:
        return self.owner.domain

    @property
    def origin(self) -> Location:
        return next(iter(self.replicas))

    def busy(self) -> bool:
        return bool(self.leases) or self.copies_in_flight > 0

    def lease_count(self) -> int:
        return sum(self.leases.values())


class Lifetimes:
    """ref -> ObjectRecord, leases per session, expiry, and what happened to released refs."""

    def __init__(self, free_memory: Callable[[ObjectRecord], None]) -> None:
        self._free_memory = free_memory
        self._objects: dict[str, ObjectRecord] = {}
        self._expiry: list[tuple[float, str]] = []
        self.draining: dict[str, ObjectRecord] = {}     # released, memory still leased or copied
        self._gone: OrderedDict[str, str] = OrderedDict()
        self._leases: dict[int, Counter[str]] = {}      # session id -> ref -> open reads

    def __len__(self) -> int:
        return len(self._objects)

    def __iter__(self) -> Iterator[ObjectRecord]:
        return iter(self._objects.values())

    # --- birth --------------------------------------------------------------------------------

    def publish(self, record: ObjectRecord) -> None:
        if record.ref in self._objects or record.ref in self.draining or record.ref in self._gone:
            raise errors.InvalidRequest(f"publish: ref {record.ref} is already in use; use a fresh one")
        self._objects[record.ref] = record
        heapq.heappush(self._expiry, (record.expiry_s, record.ref))

    # --- lookup -------------------------------------------------------------------------------

    def find(self, ref: str) -> ObjectRecord | None:
        return self._objects.get(ref)

    def lookup(self, ref: str) -> ObjectRecord:
        record = self._objects.get(ref)
        if record is None:
            raise errors.RefNotFound(ref, self._gone.get(ref, "unknown to this sidecar"))
        return record

    def fate(self, ref: str) -> str | None:
        """Why a ref is gone ('freed', 'consumed', 'expired', ...), or None if never seen."""
        return self._gone.get(ref)

    def forget_fate(self, ref: str) -> None:
        """A ref of another node read here again: its earlier copy's tombstone no longer applies."""
        self._gone.pop(ref, None)

    # --- reads --------------------------------------------------------------------------------

    def open_lease(self, record: ObjectRecord, session_id: int) -> None:
        record.leases[session_id] = record.leases.get(session_id, 0) + 1
        self._leases.setdefault(session_id, Counter())[record.ref] += 1

    def end_lease(self, session_id: int, ref: str, *, counted: bool, reads: int = 1) -> bool:
        """End one read of `ref` by the session, counting as `reads` of its declared reads if
        `counted` (a peer's read serves that many readers on its node); False if it held none."""
        held = self._leases.get(session_id)
        if not held or held.get(ref, 0) <= 0:
            return False
        held[ref] -= 1
        if held[ref] <= 0:
            del held[ref]
        record = self._objects.get(ref) or self.draining.get(ref)
        if record is None:
            return True
        left = record.leases.get(session_id, 0) - 1
        if left > 0:
            record.leases[session_id] = left
        else:
            record.leases.pop(session_id, None)
        if counted and not record.released and record.consumers_left is not None:
            record.consumers_left -= reads
            if record.consumers_left <= 0:
                self.release(record, "consumed by its declared readers")
                return True
        self._settle(record)
        return True

    def leases_of(self, session_id: int) -> Counter[str]:
        return self._leases.get(session_id, Counter())

    def end_session(self, session_id: int, *, clean: bool) -> None:
        """A client left: its open reads end, and count only if it said goodbye."""
        held = self._leases.get(session_id)
        if held:
            for ref, count in list(held.items()):
                for _ in range(count):
                    self.end_lease(session_id, ref, counted=clean)
        self._leases.pop(session_id, None)

    # --- copies -------------------------------------------------------------------------------

    def copy_started(self, record: ObjectRecord, to: Location) -> None:
        record.copies_in_flight += 1

    def copy_finished(self, record: ObjectRecord, to: Location) -> None:
        record.copies_in_flight -= 1
        self._settle(record)

    # --- death --------------------------------------------------------------------------------

    def release(self, record: ObjectRecord, reason: str) -> None:
        """The object is gone for new readers; its memory follows when nothing uses it."""
        if record.released:
            return
        self._objects.pop(record.ref, None)
        record.released = True
        self._gone[record.ref] = reason
        if len(self._gone) > TOMBSTONES:
            self._gone.popitem(last=False)
        if record.busy():
            self.draining[record.ref] = record
        else:
            self._free_memory(record)

    def _settle(self, record: ObjectRecord) -> None:
        if record.released and not record.busy() and self.draining.pop(record.ref, None) is not None:
            self._free_memory(record)

    def expire(self, now_s: float) -> int:
        expired = 0
        while self._expiry and self._expiry[0][0] <= now_s:
            expiry_s, ref = heapq.heappop(self._expiry)
            record = self._objects.get(ref)
            # Stale heap entries (expiry moved, or object gone) are skipped.
            if record is not None and record.expiry_s == expiry_s:
                self.release(record, f"expired (its ttl ran out {now_s - expiry_s:.3g}s ago)")
                expired += 1
        return expired

    def release_all(self, reason: str) -> None:
        for record in list(self._objects.values()):
            self.release(record, reason)
        for session_id in list(self._leases):
            self.end_session(session_id, clean=False)
